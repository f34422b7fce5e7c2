"""Benchmark: the write-unavailability window of failover-ec2 on the sandbox.

The app writes at a sustained rate (default 200 commits/s); failover-ec2 runs N times
(each on a fresh sandbox: a failover is one-way) with tern's segment fill, and M times
with the naive flush that waits for the source's archive_timeout (60 s, Heroku-faithful).
Prints each run's window (last acknowledged write on the source to the first on the new
leader, from the app's ledger), lost writes, then median and max of each mode.

    .venv/bin/python bench/failover_ec2.py [--runs 5] [--naive-runs 2] [--rate 200]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runbook.contract import load  # noqa: E402
from runbook.failover.run import failover_ec2  # noqa: E402
from runbook.restore import restore_all  # noqa: E402
from runbook.sandbox import Sandbox  # noqa: E402
from runbook.settings import Settings  # noqa: E402


def one_run(mode: str, rate: float, warmup: float) -> dict:
    root = Path(tempfile.mkdtemp(prefix="tern-bench-", dir="/tmp"))
    root.chmod(0o755)
    sb = Sandbox(root / "sandbox")
    try:
        sb.up(replicas=2, scale=1, rate=rate)
        outputs = load("local", sb.root)
        restore_all(outputs, timeout=300, connect_timeout=5)
        time.sleep(warmup)
        settings = Settings(sandbox_dir=sb.root, state_dir=root / "state", flush_mode=mode, catchup_timeout=120)
        t0 = time.monotonic()
        report = failover_ec2(outputs, settings, confirm=lambda q: True)
        elapsed = time.monotonic() - t0
        final = sb.check_ledger_after_stop()
        window = report["write_unavailability"]["seconds"]
        return {"mode": mode, "window": window, "lost": final["missing"] + (report["missing_on_target"] or 0),
                "acknowledged": final["acknowledged"], "catchup": report["catchup_seconds"], "elapsed": elapsed}
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--naive-runs", type=int, default=2)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--warmup", type=float, default=5)
    a = p.parse_args()
    results = []
    for mode, n in (("fill", a.runs), ("archive_timeout", a.naive_runs)):
        for i in range(n):
            r = one_run(mode, a.rate, a.warmup)
            results.append(r)
            print(f"{mode:16s} run {i + 1}: window {r['window']:.2f} s, catch-up {r['catchup']:.2f} s, "
                  f"lost {r['lost']} of {r['acknowledged']} acknowledged", flush=True)
    print()
    print(f"{'flush':16s} {'runs':>4s} {'median s':>9s} {'max s':>7s} {'lost':>5s}")
    summary = {}
    for mode in ("fill", "archive_timeout"):
        rs = [r for r in results if r["mode"] == mode]
        if not rs:
            continue
        windows = [r["window"] for r in rs]
        summary[mode] = statistics.median(windows)
        print(f"{mode:16s} {len(rs):4d} {statistics.median(windows):9.2f} {max(windows):7.2f} "
              f"{sum(r['lost'] for r in rs):5d}")
    if "fill" in summary and "archive_timeout" in summary:
        print(f"\ntern's fill is {summary['archive_timeout'] / summary['fill']:.1f}x shorter than waiting for "
              f"archive_timeout (goal: median <= 5 s, 0 lost)")
    return 1 if any(r["lost"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
