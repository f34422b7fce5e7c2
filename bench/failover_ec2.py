"""Benchmark: the write-unavailability window of failover-ec2 on the sandbox.

The app writes at a sustained rate (default 200 commits/s); failover-ec2 runs N times
(each on a fresh sandbox: a failover is one-way) with tern's segment fill, and M times
with the naive flush that waits for the source's archive_timeout (60 s, Heroku-faithful).
Prints each run's window (last acknowledged write on the source to the first on the new
leader, from the app's ledger), lost writes, then median and max of each mode.

With ``--scales 1,760`` the fill mode runs at each sandbox scale (scale 760 is about 5 GB) and
the medians are compared: the window must not grow with the database (goal: the larger
median within 20 % of the smaller, both under 2 s). The naive baseline runs at the first scale.

    .venv/bin/python bench/failover_ec2.py [--runs 5] [--naive-runs 2] [--rate 200] [--scales 1,760] [--cache DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runbook.contract import load  # noqa: E402
from runbook.errors import StepError  # noqa: E402
from runbook.failover.run import failover_ec2  # noqa: E402
from runbook.restore import restore_all  # noqa: E402
from runbook.sandbox import Sandbox  # noqa: E402
from runbook.settings import Settings  # noqa: E402


# the steps between the app's last write on the source and its first on the new leader
WINDOW_STEPS = ("maintenance_on", "fence", "detach_others", "flush", "verify", "promote", "switch", "start_app")


def database_size(sb: Sandbox) -> int:
    return int(sb.node("source").query_one("SELECT pg_database_size('app') AS s")["s"])


def pristine(scale: int, rate: float, cache: Path) -> tuple[Path, Path]:
    """A sandbox at ``scale`` with its replicas restored and every server stopped, built once.

    A sandbox names its own paths (data directories, archive and restore commands, the app's
    state), so runs happen at the path it was built at: ``<cache>/scale-N/sandbox`` is built, then
    moved aside to ``pristine``, and each run copies it back (as fresh as a new sandbox: nothing of
    an earlier run is in it). A 5 GB sandbox is loaded and restored once instead of once per run.
    Returns (pristine, work)."""
    work = cache / f"scale-{scale}" / "sandbox"
    kept = cache / f"scale-{scale}" / "pristine"
    if (kept / "outputs.json").exists():
        return kept, work
    if work.exists():
        Sandbox(work).down(check_ledger=False)
    work.parent.mkdir(parents=True, exist_ok=True)
    for d in (cache, work.parent):
        d.chmod(0o755)
    sb = Sandbox(work)
    sb.up(replicas=2, scale=scale, rate=rate, start_app=False)
    restore_all(load("local", sb.root), timeout=7200, connect_timeout=5)
    for name in sb.state()["nodes"]:
        sb.node(name).stop(mode="fast", timeout=300)
    work.rename(kept)
    return kept, work


def copy_sandbox(pristine_root: Path, target: Path) -> None:
    """Servers' data copied; the WAL archive hard-linked (an archived segment is never written again)."""
    target.mkdir()
    target.chmod(0o755)
    for entry in pristine_root.iterdir():
        flags = "-al" if entry.name == "archive" else "-a"
        subprocess.run(["cp", flags, str(entry), str(target / entry.name)], check=True)


def one_run(mode: str, rate: float, warmup: float, scale: int = 1, cache: Path | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="tern-bench-", dir="/tmp"))
    root.chmod(0o755)
    sb = Sandbox(root / "sandbox")
    try:
        t_build = time.monotonic()
        if cache is None:
            sb.up(replicas=2, scale=scale, rate=rate)
            outputs = load("local", sb.root)
            restore_all(outputs, timeout=3600, connect_timeout=5)
        else:
            kept, work = pristine(scale, rate, cache)
            sb = Sandbox(work)
            copy_sandbox(kept, work)
            sb.ensure_running(start_app=True)
            outputs = load("local", sb.root)
        size = database_size(sb)
        build = time.monotonic() - t_build
        time.sleep(warmup)
        settings = Settings(sandbox_dir=sb.root, state_dir=root / "state", flush_mode=mode, catchup_timeout=120)
        t0 = time.monotonic()
        try:
            report = failover_ec2(outputs, settings, confirm=lambda q: True)
        except StepError as exc:       # a fallback is a figure too: printed, not a crash
            report = exc.context.get("report") or {}
            print(f"  run fell back: {str(exc)[:300]}", flush=True)
        elapsed = time.monotonic() - t0
        final = sb.check_ledger_after_stop()
        window = (report.get("write_unavailability") or {}).get("seconds")
        full = report.get("verification_full") or {}
        return {"mode": mode, "scale": scale, "size": size, "build": build, "window": window,
                "lost": final["missing"] + (report.get("missing_on_target") or 0), "outcome": report.get("outcome"),
                "acknowledged": final["acknowledged"], "catchup": report.get("catchup_seconds") or 0,
                "elapsed": elapsed,
                "gate": next((st["seconds"] for st in report.get("steps", []) if st["name"] == "verify"), None) or 0,
                "full": full.get("seconds"),
                "steps": {st["name"]: st["seconds"] for st in report.get("steps", []) if st.get("seconds") is not None
                          and st["name"] in WINDOW_STEPS}}
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--naive-runs", type=int, default=2)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--warmup", type=float, default=5)
    p.add_argument("--scales", default="1", help="comma-separated sandbox scales for the fill mode (760 ~ 5 GB)")
    p.add_argument("--cache", default="", help="build each scale's sandbox once in this folder and copy it per run "
                   "(kept afterwards, so a later bench run reuses it)")
    a = p.parse_args()
    cache = Path(a.cache).resolve() if a.cache else None
    scales = [int(x) for x in a.scales.split(",") if x.strip()]
    results = []
    plan = [("fill", scale, a.runs) for scale in scales] + [("archive_timeout", scales[0], a.naive_runs)]
    for mode, scale, n in plan:
        for i in range(n):
            r = one_run(mode, a.rate, a.warmup, scale, cache)
            results.append(r)
            print(f"{mode:16s} scale {scale:4d} ({r['size'] / 2**30:5.2f} GiB, built in {r['build']:.0f} s) "
                  f"run {i + 1} {r['outcome']}: window {r['window'] if r['window'] is None else round(r['window'], 2)} s, catch-up {r['catchup']:.2f} s, in-window gate "
                  f"{r['gate']:.2f} s, full verification after the switch {r['full'] or 0:.1f} s, "
                  f"lost {r['lost']} of {r['acknowledged']} acknowledged", flush=True)
            print("    in the window: " + ", ".join(f"{k} {v:.2f}" for k, v in r["steps"].items()), flush=True)
    print()
    print(f"{'flush':16s} {'scale':>5s} {'GiB':>6s} {'runs':>4s} {'median s':>9s} {'max s':>7s} {'lost':>5s}")
    medians: dict[tuple[str, int], float] = {}
    for mode, scale, _ in plan:
        rs = [r for r in results if r["mode"] == mode and r["scale"] == scale]
        if not rs or (mode, scale) in medians:
            continue
        windows = [r["window"] for r in rs if r["window"] is not None and r["outcome"] == "completed"] or [float("nan")]
        medians[(mode, scale)] = statistics.median(windows)
        print(f"{mode:16s} {scale:5d} {statistics.median([r['size'] for r in rs]) / 2**30:6.2f} {len(rs):4d} "
              f"{statistics.median(windows):9.2f} {max(windows):7.2f} {sum(r['lost'] for r in rs):5d}")
    small = medians.get(("fill", scales[0]))
    if small and ("archive_timeout", scales[0]) in medians:
        print(f"\ntern's fill is {medians[('archive_timeout', scales[0])] / small:.1f}x shorter than waiting for "
              f"archive_timeout (goal: median <= 5 s, 0 lost)")
    if len(scales) > 1 and small:
        big = medians[("fill", scales[-1])]
        print(f"window at scale {scales[-1]} vs scale {scales[0]}: {big:.2f} s vs {small:.2f} s "
              f"({100 * (big - small) / small:+.0f} %; goal: within +20 %, both under 2 s)")
    return 1 if any(r["lost"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
