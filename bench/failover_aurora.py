"""Benchmark: the write-unavailability window of failover-aurora (hop 2, EC2 -> Aurora) on the sandbox.

The app writes at a sustained rate (default 200 commits/s). Each run builds a fresh sandbox (a
failover is one-way): sandbox up, restore, failover-ec2 (hop 1), replicate-aurora (with
--replica-identity-full: the app has a table without a key), a wait until every table streams and
the lag is small, a warm-up, then failover-aurora is timed. Per run it prints the window (last
acknowledged write on the EC2 leader to the first on Aurora, from the app's ledger), the catch-up,
the in-window gate, lost writes (the ledger checked against Aurora after the app is stopped, plus
the report's ``missing_on_target``) and the outcome; then median and max over the runs.

Baseline, from the same builds: every run does failover-ec2 first, at the same rate, so hop 1's
window is measured on the same sandbox and printed beside hop 2's.

Goal: hop 2's median <= 2 s, max <= 5 s, every run completed, 0 lost in every run. Exits 1 if any
acknowledged write was lost.

    .venv/bin/python bench/failover_aurora.py [--runs 5] [--rate 200] [--scale 1] [--json]
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
from runbook.replication import native  # noqa: E402
from runbook.replication.leader import aurora_master_url  # noqa: E402
from runbook.replication.setup import replicate_aurora  # noqa: E402
from runbook.restore import restore_all  # noqa: E402
from runbook.sandbox import Sandbox  # noqa: E402
from runbook.settings import Settings  # noqa: E402

GOAL_MEDIAN = 2.0
GOAL_MAX = 5.0


def step_seconds(report: dict[str, Any], name: str) -> float:
    return next((st["seconds"] for st in report.get("steps", []) if st["name"] == name), None) or 0.0


def window_of(report: dict[str, Any]) -> float | None:
    return (report.get("write_unavailability") or {}).get("seconds")


def wait_streaming(sb: Sandbox, outputs, leader: str, max_lag: int, timeout: float) -> tuple[float, int]:
    """Until every table is ready on Aurora and the slot's lag (from the leader's current LSN) is under
    ``max_lag`` bytes. Returns (seconds waited, last lag)."""
    pg = sb.node(leader)
    t0 = time.monotonic()
    lag: int | None = None
    while True:
        with native.master_connection(aurora_master_url(outputs), 5) as master:
            states = native.table_states(master)
        lag = native.lag(pg).get("lag_bytes")
        if states and all(s == "r" for s in states.values()) and lag is not None and lag <= max_lag:
            return time.monotonic() - t0, lag
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"replication into Aurora not streaming within {timeout:.0f} s "
                               f"(tables not ready: {[t for t, s in states.items() if s != 'r'][:5]}, lag {lag})")
        time.sleep(0.5)


def one_run(rate: float, warmup: float, scale: int, max_lag: int, say) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tern-bench-aurora-", dir="/tmp"))
    root.chmod(0o755)
    sb = Sandbox(root / "sandbox")
    r: dict[str, Any] = {"scale": scale, "outcome": None, "window": None, "hop1_window": None, "lost": 0,
                         "acknowledged": 0, "catchup": 0.0, "gate": 0.0, "elapsed": 0.0}
    try:
        t_build = time.monotonic()
        sb.up(replicas=2, scale=scale, rate=rate)
        outputs = load("local", sb.root)
        restore_all(outputs, timeout=3600, connect_timeout=5)
        r["size"] = int(sb.node("source").query_one("SELECT pg_database_size('app') AS s")["s"])
        time.sleep(warmup)
        settings = Settings(sandbox_dir=sb.root, state_dir=root / "state", catchup_timeout=120)
        try:
            hop1 = failover_ec2(outputs, settings, confirm=lambda q: True)
        except StepError as exc:   # hop 2 needs hop 1: this run has no hop-2 figure
            hop1 = exc.context.get("report") or {}
            say(f"  hop 1 fell back, no hop 2 in this run: {str(exc)[:300]}")
        r["hop1_window"], r["hop1_outcome"] = window_of(hop1), hop1.get("outcome")
        if hop1.get("outcome") != "completed":
            r["outcome"] = "hop 1 " + str(hop1.get("outcome"))
            final = sb.check_ledger_after_stop()
            r["lost"] = final["missing"] + (hop1.get("missing_on_target") or 0)
            r["acknowledged"] = final["acknowledged"]
            r["build"] = time.monotonic() - t_build
            return r
        t = time.monotonic()
        setup = replicate_aurora(outputs, settings, replica_identity_full=True)
        r["replicate"] = time.monotonic() - t
        r["initial_sync"] = setup.get("initial_sync_seconds")
        r["settle"], r["lag_before"] = wait_streaming(sb, outputs, setup["leader"], max_lag, timeout=600)
        r["build"] = time.monotonic() - t_build
        time.sleep(warmup)
        t0 = time.monotonic()
        try:
            report = failover_aurora(outputs, settings, confirm=lambda q: True)
        except StepError as exc:       # a fallback is a figure too: printed, not a crash
            report = exc.context.get("report") or {}
            say(f"  run fell back: {str(exc)[:300]}")
        r["elapsed"] = time.monotonic() - t0
        final = sb.check_ledger_after_stop()   # against the app's database now: Aurora (or the leader after a fallback)
        r.update(outcome=report.get("outcome"), window=window_of(report), catchup=report.get("catchup_seconds") or 0.0,
                 gate=step_seconds(report, "verify"), missing_on_target=report.get("missing_on_target") or 0,
                 ledger_missing=final["missing"], unexplained=final["unexplained"], endpoint=final["endpoint"],
                 acknowledged=final["acknowledged"], lost=final["missing"] + (report.get("missing_on_target") or 0),
                 steps={st["name"]: st["seconds"] for st in report.get("steps", [])})
        return r
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    hop2 = [r["window"] for r in results if r["outcome"] == "completed" and r["window"] is not None]
    hop1 = [r["hop1_window"] for r in results if r.get("hop1_outcome") == "completed" and r["hop1_window"] is not None]
    s: dict[str, Any] = {
        "runs": len(results), "completed": sum(r["outcome"] == "completed" for r in results),
        "hop2_median": statistics.median(hop2) if hop2 else None, "hop2_max": max(hop2) if hop2 else None,
        "hop1_median": statistics.median(hop1) if hop1 else None, "hop1_max": max(hop1) if hop1 else None,
        "lost": sum(r["lost"] for r in results), "runs_with_loss": sum(bool(r["lost"]) for r in results),
    }
    s["goal_met"] = bool(hop2 and s["completed"] == len(results) and s["hop2_median"] <= GOAL_MEDIAN
                         and s["hop2_max"] <= GOAL_MAX and s["runs_with_loss"] == 0)
    return s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="failovers, each on a fresh sandbox (default 5)")
    p.add_argument("--rate", type=float, default=200, help="the app's commits per second (default 200)")
    p.add_argument("--scale", type=int, default=1, help="sandbox scale (1: a few MB; 150: about 1 GB)")
    p.add_argument("--warmup", type=float, default=5, help="seconds of app load before each failover (default 5)")
    p.add_argument("--max-lag-kb", type=int, default=1024,
                   help="start failover-aurora once Aurora is at most this far behind (default 1024 kB)")
    p.add_argument("--json", action="store_true", help="print the runs and the summary as JSON on stdout "
                                                       "(the human lines go to stderr)")
    a = p.parse_args(argv)
    if a.runs < 1 or a.rate <= 0 or a.scale < 1 or a.warmup < 0 or a.max_lag_kb < 0:
        p.error("--runs and --scale must be at least 1, --rate positive, --warmup and --max-lag-kb not negative")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = sys.stderr if a.json else sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    results = []
    for i in range(a.runs):
        r = one_run(a.rate, a.warmup, a.scale, a.max_lag_kb * 1024, say)
        results.append(r)
        say(f"run {i + 1} {r['outcome']}: window {_fmt(r['window'])} s (hop 1 {_fmt(r['hop1_window'])} s), "
            f"catch-up {r['catchup']:.2f} s, in-window gate {r['gate']:.2f} s, failover-aurora {r['elapsed']:.1f} s, "
            f"lost {r['lost']} of {r['acknowledged']} acknowledged "
            f"(ledger {r.get('ledger_missing', 0)}, report missing_on_target {r.get('missing_on_target', 0)}); "
            f"build {r.get('build', 0):.0f} s ({r.get('size', 0) / 2**20:.0f} MiB, initial sync "
            f"{r.get('initial_sync') or 0:.1f} s, lag {r.get('lag_before', 0):,} bytes at the start)")
    s = summarise(results)
    say()
    say(f"{'hop':26s} {'runs':>4s} {'median s':>9s} {'max s':>7s}")
    say(f"{'2: failover-aurora':26s} {s['completed']:4d} {_fmt(s['hop2_median']):>9s} {_fmt(s['hop2_max']):>7s}")
    say(f"{'1: failover-ec2 (baseline)':26s} {sum(r.get('hop1_outcome') == 'completed' for r in results):4d} "
        f"{_fmt(s['hop1_median']):>9s} {_fmt(s['hop1_max']):>7s}")
    say(f"lost writes: {s['lost']} in {s['runs_with_loss']} of {s['runs']} runs; "
        f"{s['completed']} of {s['runs']} runs completed")
    say(f"goal: median <= {GOAL_MEDIAN:g} s, max <= {GOAL_MAX:g} s, 0 lost every run: "
        f"{'met' if s['goal_met'] else 'not met'}")
    if a.json:
        print(json.dumps({"settings": vars(a), "runs": results, "summary": s}, indent=1, default=str))
    return 1 if s["runs_with_loss"] else 0


if __name__ == "__main__":
    sys.exit(main())
