"""``invoke drill``: Murphy's law, rehearsed - a fault at a random moment of a real failover, then the ledger."""

from __future__ import annotations

import random

from invoke import Exit, task
from rich.table import Table
from rich.text import Text

from ..drills import BY_NAME, SCENARIOS, names
from ..errors import ConfigError
from .common import console, human, parse_int, print_json, say, settings, stack_settings, task_errors

MAX_RUNS = 1000


def parse_scenarios(raw) -> list[str]:
    """``--scenario``: one name, several (comma-separated), or ``all``; an unknown one names the valid ones."""
    if raw is None or raw is True or not str(raw).strip():
        raise ConfigError(f"--scenario is required (or --list); choose from: {', '.join(names())}, all")
    wanted = [n.strip() for n in str(raw).split(",") if n.strip()]
    if wanted == ["all"]:
        return names()
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise ConfigError(f"unknown scenario {unknown[0]!r}; choose from: {', '.join(names())}, all")
    return list(dict.fromkeys(wanted))


def plan_for(scenarios: list[str], hop: int | None) -> list[tuple[str, int]]:
    """(scenario, hop) pairs: the hop asked for, else every hop each scenario has (hop 1 first)."""
    if hop is not None:
        missing = [n for n in scenarios if hop not in BY_NAME[n].hops]
        if missing:
            raise ConfigError(f"scenario {missing[0]} has no hop {hop} (its hops: "
                              f"{', '.join(map(str, BY_NAME[missing[0]].hops))})")
        return [(n, hop) for n in scenarios]
    return [(n, h) for h in (1, 2) for n in scenarios if h in BY_NAME[n].hops]


def render_list(show) -> None:
    table = Table(title="drill scenarios")
    for col in ("scenario", "hops", "what goes wrong", "what the failover must do"):
        table.add_column(col)
    for s in SCENARIOS:
        table.add_row(s.name, ",".join(map(str, s.hops)), Text(s.description), Text(s.expected))
    show.print(table)


def render_summary(result: dict, show) -> None:
    table = Table(title=f"drills (seed {result['seed']})")
    for col in ("scenario", "hop", "runs", "completed", "fell back", "stopped", "lost", "duplicates",
                "post-fence writes", "not as expected", "median s"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for row in result["summary"]:
        bad = row["failed"]
        table.add_row(row["scenario"], str(row["hop"]), str(row["runs"]), str(row["completed"]),
                      str(row["fell_back"]), str(row["stopped"]),
                      *(Text(str(row[k]), style="bold red" if row[k] else "") for k in ("lost", "duplicates",
                                                                                     "post_fence")),
                      Text(str(bad), style="bold red" if bad else ""), f"{row['median_seconds']:g}")
    show.print(table)
    for r in result["runs"]:
        if not r["ok"]:
            why = "; ".join(r.get("errors") or []) or (
                f"first run {r.get('first_outcome')} (expected {' or '.join(r.get('expected') or [])})"
                if not r.get("outcome_ok") else "lost, duplicate or post-fence writes")
            show.print(Text(f"FAILED {r['scenario']} hop {r['hop']} seed {r['seed']}: {why}; replay: invoke drill "
                            f"--scenario {r['scenario']} --hop {r['hop']} --seed {r['seed']}"
                            + (f"; evidence in {r['kept']}" if r.get("kept") else "")))


@task(help={"scenario": "a scenario (see --list), several separated by commas, or all",
            "hop": "1 (Heroku -> EC2) or 2 (EC2 -> Aurora); default: every hop the scenario has",
            "runs": "runs of each scenario, each at its own random moment (default 1)",
            "seed": "the first run's seed (run i uses seed + i); default: a random one, printed - the same seed "
                    "replays the same moment and choices",
            "list": "list the scenarios and what each must do",
            "json": "the results as JSON on stdout (progress on stderr)"})
@task_errors
def drill(c, scenario=None, hop=None, runs=None, seed=None, list=False, json=False):  # noqa: A002 - the flag is --list
    """Inject a fault at a random moment of a real failover on a fresh sandbox, then check the ledger.

    Each run copies a pristine sandbox (built once per invocation: hop 1 restored; hop 2 with hop 1 done and
    replicate-aurora streaming), fires the scenario's fault at a seeded random moment, heals it, runs the
    failover again if it stopped for the operator, and checks: acknowledged writes lost, duplicates, writes
    the old database accepted after the fence, and that the run completed, fell back or stopped as the
    scenario expects. Exit 0 when every run did; 1 otherwise; 2 for bad input.
    """
    show = human(json)
    if list:
        if json:
            print_json([s.listing() for s in SCENARIOS])
        else:
            render_list(show)
        return
    wanted = parse_scenarios(scenario)
    hop = parse_int("hop", hop, min=1, max=2)
    plan = plan_for(wanted, hop)
    runs = parse_int("runs", runs, min=1, max=MAX_RUNS) or 1
    seed = parse_int("seed", seed, min=0, max=2**63 - 1)
    if seed is None:
        seed = random.SystemRandom().randrange(10**6)
    s = settings(c)
    from ..drills.lab import Lab, default_root
    from ..drills.run import run_many

    keep = stack_settings(s, "local").state_dir / "drills"
    lab = Lab(default_root(), s, scale=s.scale, replicas=s.replicas, rate=s.app_rate, dataset=s.dataset,
              progress=say)
    say(f"drills: {len(plan)} scenario(s) x {runs} run(s), seed {seed}; sandboxes in {lab.root}")
    try:
        result = run_many(lab, plan, runs, seed, say=say, keep_dir=keep)
    finally:
        lab.close()
    if json:
        print_json(result)
    render_summary(result, show if not json else console)
    if not result["ok"]:
        raise Exit("tern: error: a drill did not end as it must (see above)", code=1)
