"""Benchmark: every drill scenario N times, each at its own random moment, for hop 1 and hop 2.

Each run is ``invoke drill``'s (:mod:`runbook.drills`): a fresh copy of a pristine sandbox (built once per
hop), the scenario's fault fired at a seeded random moment of a real failover, healed, the failover run
again if it stopped for the operator, then the checks. It prints each run's line (outcome, lost writes,
duplicates, writes the old database accepted after the fence, seconds) and the summary table.

Goal (issue #13): 0 lost, 0 duplicates, 0 post-fence writes in every run of every scenario, and every run
ending as its scenario expects. Exits 1 otherwise. Run ``i`` of a scenario uses seed ``--seed + i``: a
failing run is replayed with ``invoke drill --scenario NAME --hop H --seed S``.

    .venv/bin/python bench/drills.py [--runs 5] [--hops 1,2] [--scenarios a,b] [--seed 1000] [--scale 1]
                                     [--rate 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runbook.drills import BY_NAME, SCENARIOS  # noqa: E402
from runbook.settings import Settings  # noqa: E402

COLUMNS = ("scenario", "hop", "runs", "completed", "fell_back", "stopped", "lost", "duplicates", "post_fence",
           "failed", "median_seconds", "max_seconds")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs of each scenario and hop (default 5)")
    p.add_argument("--hops", default="1,2", help="1, 2 or 1,2 (default)")
    p.add_argument("--scenarios", default="all", help="comma-separated scenario names (default all)")
    p.add_argument("--seed", type=int, default=1000, help="the first run's seed (run i: seed + i; default 1000)")
    p.add_argument("--scale", type=int, default=1, help="sandbox scale (default 1)")
    p.add_argument("--rate", type=float, default=100, help="the app's commits per second (default 100)")
    p.add_argument("--json", action="store_true", help="the runs and the summary as JSON on stdout")
    a = p.parse_args(argv)
    try:
        a.hops = sorted({int(h) for h in a.hops.split(",") if h.strip()})
    except ValueError:
        p.error("--hops takes 1, 2 or 1,2")
    a.scenarios = [s.name for s in SCENARIOS] if a.scenarios == "all" else \
        [n.strip() for n in a.scenarios.split(",") if n.strip()]
    unknown = [n for n in a.scenarios if n not in BY_NAME]
    if unknown:
        p.error(f"unknown scenario {unknown[0]!r}; choose from: {', '.join(BY_NAME)}")
    if a.runs < 1 or not a.hops or not set(a.hops) <= {1, 2} or a.scale < 1 or a.rate <= 0 or a.seed < 0:
        p.error("--runs and --scale at least 1, --hops 1 and/or 2, --rate positive, --seed not negative")
    return a


def plan(scenarios: list[str], hops: list[int]) -> list[tuple[str, int]]:
    return [(n, h) for h in hops for n in scenarios if h in BY_NAME[n].hops]


def table(summary: list[dict]) -> str:
    head = ("scenario", "hop", "runs", "completed", "fell back", "stopped", "lost", "dup", "post-fence",
            "not as expected", "median s", "max s")
    rows = [[str(r[c]) for c in COLUMNS] for r in summary]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = sys.stderr if a.json else sys.stdout
    from runbook.drills.lab import Lab, default_root
    from runbook.drills.run import run_many

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    # the drills' own waits, short enough that a fault that stops a run costs seconds, long enough for
    # what the scenarios do (a restart of at most 4 s, a partition of at most 8 s)
    settings = Settings(catchup_timeout=20, repoint_timeout=30, smoke_timeout=10, promote_timeout=20,
                        stop_app_timeout=10)
    lab = Lab(default_root(), settings, scale=a.scale, rate=a.rate, progress=say)
    t0 = time.monotonic()
    try:
        result = run_many(lab, plan(a.scenarios, a.hops), a.runs, a.seed, say=lambda m: None if m.startswith("  ")
                          else say(m), keep_dir=Path("/tmp") / "tern-drills-failed")
    finally:
        lab.close()
    say()
    say(table(result["summary"]))
    total = {k: sum(r[k] for r in result["summary"]) for k in ("runs", "lost", "duplicates", "post_fence", "failed")}
    say(f"\n{total['runs']} runs in {time.monotonic() - t0:.0f} s (sandboxes built in "
        f"{', '.join(f'hop {h}: {s} s' for h, s in result['lab']['build_seconds'].items())}): "
        f"{total['lost']} lost, {total['duplicates']} duplicates, {total['post_fence']} post-fence writes, "
        f"{total['failed']} runs not as expected (goal: 0 of each)")
    if a.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
