"""Benchmark: the app's switch at both hops, through PgBouncer (``--switch pooler``) against a DATABASE_URL swap
(``--switch url``), with dynos that take a real app's time to boot after a config-var change.

Each run is a fresh sandbox with a pooler, the app writing at ``--rate`` commits/s (default 200) and booting in
``--boot`` seconds (default 10, as a real app on Heroku); restore, failover-ec2, replicate-aurora, failover-aurora,
each in the run's mode. Per hop and mode: the app's unavailability (last acknowledged write before the switch to
the first after it, from the ledger), the database's (the fence to the new database taking writes), the longest
time a client's write was held, the client-visible errors, and acknowledged writes lost (the final ledger
check). Goal (#12), pooler mode: hop-1 and hop-2 medians at most 2 s, max at most 5 s, 0 lost, and no client
error at hop 2; the url figures of the same run show what the pooler saves.

    .venv/bin/python bench/switch.py [--runs 5] [--modes pooler,url] [--rate 200] [--boot 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runbook.contract import load  # noqa: E402
from runbook.errors import StepError  # noqa: E402
from runbook.failover.run import failover_aurora, failover_ec2  # noqa: E402
from runbook.replication.setup import replicate_aurora  # noqa: E402
from runbook.restore import restore_all  # noqa: E402
from runbook.sandbox import Sandbox  # noqa: E402
from runbook.settings import Settings  # noqa: E402


def figures(report: dict[str, Any]) -> dict[str, Any]:
    w = report.get("write_unavailability") or {}
    d = report.get("database_unavailability") or {}
    return {"outcome": report.get("outcome"), "app": w.get("seconds"), "database": d.get("seconds"),
            "held": report.get("longest_held_query_seconds"), "errors": report.get("client_errors"),
            "missing": report.get("missing_on_target")}


def one_run(mode: str, rate: float, boot: float, warmup: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tern-bench-switch-", dir="/tmp"))
    root.chmod(0o755)
    sb = Sandbox(root / "sandbox")
    out: dict[str, Any] = {"mode": mode}
    try:
        sb.up(replicas=2, scale=1, rate=rate, pooler=True)
        sb.app().set_boot_seconds(boot)
        outputs = load("local", sb.root)
        settings = Settings(sandbox_dir=sb.root, state_dir=root / "state", switch_mode=mode, catchup_timeout=120)
        restore_all(outputs, timeout=600, connect_timeout=5, state_dir=settings.state_dir)
        time.sleep(boot + warmup)   # the dynos booted and write
        for hop, run in (("hop1", lambda: failover_ec2(outputs, settings, confirm=lambda q: True)),
                         ("hop2", lambda: failover_aurora(outputs, settings, confirm=lambda q: True))):
            if hop == "hop2":
                replicate_aurora(outputs, settings, replica_identity_full=True)
                time.sleep(warmup)
            try:
                report = run()
            except StepError as exc:     # a fallback is a figure too
                report = exc.context.get("report") or {"outcome": "error"}
                print(f"  {mode} {hop} fell back: {str(exc)[:300]}", flush=True)
            out[hop] = figures(report)
            if report.get("outcome") != "completed":
                break
        final = sb.check_ledger_after_stop()
        out["lost"] = final["missing"]
        out["acknowledged"] = final["acknowledged"]
        return out
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--modes", default="pooler,url")
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--boot", type=float, default=10.0, help="the dynos' boot after a config-var change (s)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--json", action="store_true", help="the figures as JSON on stdout (the rest on stderr)")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if a.runs < 1 or not modes or any(m not in ("pooler", "url") for m in modes) or a.rate <= 0 or a.boot < 0:
        p.error("--runs at least 1; --modes from pooler,url; --rate positive; --boot at least 0")
    say = (lambda m="": print(m, file=sys.stderr, flush=True)) if a.json else (lambda m="": print(m, flush=True))
    results: list[dict[str, Any]] = []
    for i in range(a.runs):
        for mode in modes:               # alternating: both modes see the machine in the same state
            r = one_run(mode, a.rate, a.boot, a.warmup)
            results.append(r)
            say(f"run {i + 1} {mode:6s}: " + "; ".join(
                f"{hop} {r[hop]['outcome']} app {r[hop]['app']} s, database {r[hop]['database']} s, held "
                f"{r[hop]['held']} s, {r[hop]['errors']} client errors" for hop in ("hop1", "hop2") if hop in r)
                + f"; lost {r['lost']} of {r['acknowledged']}")
    say()
    say(f"boot {a.boot:g} s, {a.rate:g} commits/s, {a.runs} runs per mode")
    say(f"{'hop':4s} {'switch':6s} {'app median':>10s} {'app max':>8s} {'db median':>9s} {'held max':>8s} "
        f"{'errors':>6s} {'lost':>4s}")
    table = []
    goal = True
    for hop in ("hop1", "hop2"):
        for mode in modes:
            rs = [r[hop] for r in results if r["mode"] == mode and hop in r]
            done = [x for x in rs if x["outcome"] == "completed" and x["app"] is not None]
            apps = [x["app"] for x in done] or [float("nan")]
            dbs = [x["database"] for x in done if x["database"] is not None] or [float("nan")]
            held = max([x["held"] or 0 for x in done] or [0])
            errors = sum(x["errors"] or 0 for x in done)
            lost = sum(r["lost"] for r in results if r["mode"] == mode)
            row = {"hop": hop, "switch": mode, "runs": len(rs), "completed": len(done),
                   "app_median": statistics.median(apps), "app_max": max(apps), "database_median": statistics.median(dbs),
                   "held_max": held, "client_errors": errors, "lost": lost}
            table.append(row)
            say(f"{hop:4s} {mode:6s} {row['app_median']:10.2f} {row['app_max']:8.2f} {row['database_median']:9.2f} "
                f"{held:8.2f} {errors:6d} {lost:4d}")
            if mode == "pooler":
                goal &= (len(done) == len(rs) and row["app_median"] <= 2.0 and row["app_max"] <= 5.0 and lost == 0
                         and (hop == "hop1" or errors == 0))
    by = {(r["hop"], r["switch"]): r for r in table}
    for hop in ("hop1", "hop2"):
        if (hop, "pooler") in by and (hop, "url") in by:
            say(f"{hop}: the pooler saves {by[(hop, 'url')]['app_median'] - by[(hop, 'pooler')]['app_median']:.1f} s "
                "of app unavailability (median)")
    if "pooler" in modes:
        say(f"goal (pooler: medians <= 2 s, max <= 5 s, 0 lost, no client error at hop 2): {'met' if goal else 'NOT met'}")
    if a.json:
        print(json.dumps({"runs": results, "table": table, "goal_met": goal if "pooler" in modes else None}, indent=1))
    return 1 if any(r["lost"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
