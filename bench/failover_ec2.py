"""Benchmark: the write-unavailability window of failover-ec2 on the sandbox.

The app writes at a sustained rate (default 200 commits/s); failover-ec2 runs N times
(each on a fresh sandbox: a failover is one-way) with tern's segment fill, and M times
with the naive flush that waits for the source's archive_timeout (60 s, Heroku-faithful).
Prints each run's window (last acknowledged write on the source to the first on the new
leader, from the app's ledger), lost writes, then median and max of each mode.

With ``--adapters local,aws`` the fill mode also runs through the real AWS and Heroku adapters against
the local stand-ins (runbook/standins/world.py): every host command through SsmHost and the SSM
stand-in at ``--latency`` seconds a command (default 1), the app through HerokuApp - what the real
night will see (goal #11: median at most 5 s with SSM latency, 0 lost).

With ``--scales 1,760`` the fill mode runs at each sandbox scale (scale 760 is about 5 GB) and
the medians are compared: the window must not grow with the database (goal: the larger
median within 20 % of the smaller, both under 2 s). The naive baseline runs at the first scale.

    .venv/bin/python bench/failover_ec2.py [--runs 5] [--naive-runs 2] [--rate 200] [--scales 1,760] [--cache DIR]
                                           [--adapters local,aws] [--latency 1.0]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
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


def one_run(mode: str, rate: float, warmup: float, scale: int = 1, cache: Path | None = None,
            adapters: str = "local", latency: float = 1.0) -> dict:
    root = Path(tempfile.mkdtemp(prefix="tern-bench-", dir="/tmp"))
    root.chmod(0o755)
    sb = Sandbox(root / "sandbox")
    world = ExitStack()
    try:
        t_build = time.monotonic()
        if cache is None:
            sb.up(replicas=2, scale=scale, rate=rate)
            outputs = load("local", sb.root)
            # with the state directory: tern's client certificate, for SQL over TLS where there is no socket
            restore_all(outputs, timeout=3600, connect_timeout=5, state_dir=root / "state")
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
        standins = None
        if adapters == "aws":
            from runbook.standins.world import AwsWorld

            # the replicas were restored above with the local outputs: the sandbox's own archive
            standins = world.enter_context(AwsWorld(sb, latency=latency, archive="directory"))
            outputs = standins.outputs
        t0 = time.monotonic()
        try:
            report = failover_ec2(outputs, settings, confirm=lambda q: True)
        except StepError as exc:       # a fallback is a figure too: printed, not a crash
            report = exc.context.get("report") or {}
            print(f"  run fell back: {str(exc)[:300]}", flush=True)
        elapsed = time.monotonic() - t0
        ssm = standins.summary()["ssm"] if standins is not None else {}
        world.close()
        final = sb.check_ledger_after_stop()
        window = (report.get("write_unavailability") or {}).get("seconds")
        full = report.get("verification_full") or {}
        return {"mode": mode, "adapters": adapters, "ssm_commands": ssm.get("commands"), "scale": scale, "size": size, "build": build, "window": window,
                "lost": final["missing"] + (report.get("missing_on_target") or 0), "outcome": report.get("outcome"),
                "acknowledged": final["acknowledged"], "catchup": report.get("catchup_seconds") or 0,
                "elapsed": elapsed,
                "gate": next((st["seconds"] for st in report.get("steps", []) if st["name"] == "verify"), None) or 0,
                "full": full.get("seconds"),
                "steps": {st["name"]: st["seconds"] for st in report.get("steps", []) if st.get("seconds") is not None
                          and st["name"] in WINDOW_STEPS}}
    finally:
        world.close()
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
    p.add_argument("--adapters", default="local", help="local, aws or local,aws: aws runs the fill mode at the "
                   "first scale through SsmHost and HerokuApp against the stand-ins")
    p.add_argument("--latency", type=float, default=1.0, help="the SSM stand-in's seconds a command (aws)")
    a = p.parse_args()
    adapters = [x.strip() for x in a.adapters.split(",") if x.strip()]
    if not adapters or any(x not in ("local", "aws") for x in adapters) or a.latency < 0:
        p.error("--adapters takes local, aws or local,aws; --latency is seconds, at least 0")
    cache = Path(a.cache).resolve() if a.cache else None
    scales = [int(x) for x in a.scales.split(",") if x.strip()]
    results = []
    plan = []
    if "local" in adapters:
        plan += [("fill", scale, a.runs, "local") for scale in scales]
    if "aws" in adapters:
        plan.append(("fill", scales[0], a.runs, "aws"))
    if "local" in adapters:
        plan.append(("archive_timeout", scales[0], a.naive_runs, "local"))
    for mode, scale, n, via in plan:
        for i in range(n):
            r = one_run(mode, a.rate, a.warmup, scale, cache if via == "local" else None, via, a.latency)
            results.append(r)
            ssm = f", {r['ssm_commands']} SSM commands in all" if via == "aws" else ""
            print(f"{mode:16s} {via:5s} scale {scale:4d} ({r['size'] / 2**30:5.2f} GiB, built in {r['build']:.0f} s) "
                  f"run {i + 1} {r['outcome']}: window {r['window'] if r['window'] is None else round(r['window'], 2)} s, "
                  f"catch-up {r['catchup']:.2f} s, in-window gate "
                  f"{r['gate']:.2f} s, full verification after the switch {r['full'] or 0:.1f} s, "
                  f"lost {r['lost']} of {r['acknowledged']} acknowledged{ssm}", flush=True)
            print("    in the window: " + ", ".join(f"{k} {v:.2f}" for k, v in r["steps"].items()), flush=True)
    print()
    print(f"{'flush':16s} {'via':5s} {'scale':>5s} {'GiB':>6s} {'runs':>4s} {'median s':>9s} {'max s':>7s} {'lost':>5s}")
    medians: dict[tuple[str, int, str], float] = {}
    for mode, scale, _, via in plan:
        rs = [r for r in results if r["mode"] == mode and r["scale"] == scale and r["adapters"] == via]
        if not rs or (mode, scale, via) in medians:
            continue
        windows = [r["window"] for r in rs if r["window"] is not None and r["outcome"] == "completed"] or [float("nan")]
        medians[(mode, scale, via)] = statistics.median(windows)
        print(f"{mode:16s} {via:5s} {scale:5d} {statistics.median([r['size'] for r in rs]) / 2**30:6.2f} {len(rs):4d} "
              f"{statistics.median(windows):9.2f} {max(windows):7.2f} {sum(r['lost'] for r in rs):5d}")
    small = medians.get(("fill", scales[0], "local"))
    if small and ("archive_timeout", scales[0], "local") in medians:
        print(f"\ntern's fill is {medians[('archive_timeout', scales[0], 'local')] / small:.1f}x shorter than waiting for "
              f"archive_timeout (goal: median <= 5 s, 0 lost)")
    if len(scales) > 1 and small:
        big = medians[("fill", scales[-1], "local")]
        print(f"window at scale {scales[-1]} vs scale {scales[0]}: {big:.2f} s vs {small:.2f} s "
              f"({100 * (big - small) / small:+.0f} %; goal: within +20 %, both under 2 s)")
    aws = medians.get(("fill", scales[0], "aws"))
    if aws is not None:
        beside = f" beside {small:.2f} s on the sandbox's local adapters" if small else ""
        print(f"window through the AWS/Heroku adapters with {a.latency:g} s a command: median {aws:.2f} s{beside} "
              f"(goal: median <= 5 s, 0 lost)")
    return 1 if any(r["lost"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
