"""``invoke rehearse``: the main job, a full dry run of the migration on the sandbox."""

from __future__ import annotations

import time

from invoke import Exit, task

from .. import status as status_mod
from ..contract import load
from .common import console, out, print_json, settings, task_errors
from .environment import render
from .sandbox import sandbox_for


@task(help={"seconds": "how long the app writes before the migration starts (default 5)",
            "scale": "data size multiplier", "dataset": "inventory or chinook", "rate": "app commits per second",
            "keep": "leave the sandbox up afterwards", "json": "print the final report as JSON"})
@task_errors
def rehearse(c, seconds=5.0, scale=None, dataset=None, rate=None, keep=False, json=False):
    """Sandbox up, the app writing, status, then the sandbox down and a check that no acknowledged write is lost."""
    seconds = float(seconds)
    if seconds < 0:
        raise Exit(f"tern: error: --seconds must be >= 0, got {seconds}", code=2)
    sb, s = sandbox_for(c, scale=scale, dataset=dataset, app_rate=rate)
    if sb.exists():
        console.print("a sandbox is already up: taking it down first")
        sb.down(check_ledger=False)
    with console.status("building the sandbox") as st:
        sb.up(replicas=s.replicas, scale=s.scale, dataset=s.dataset, rate=s.app_rate,
              progress=lambda m: st.update(m))
    console.print(f"app writing for {seconds:.0f}s at {s.app_rate:.0f} commits/s")
    time.sleep(seconds)
    o = load("local", s.sandbox_dir)
    data = status_mod.gather(o, timeout=s.connect_timeout)
    render(data)
    result = sb.check_ledger_after_stop()
    if not keep:
        sb.down(check_ledger=False)
    if json:
        print_json(result)
    out.print(f"ledger check on {result['endpoint']}: {result['acknowledged']} acknowledged writes, "
              f"{result['missing']} lost, {result['unexplained']} unexplained rows")
    if not result["ok"]:
        raise Exit("tern: error: acknowledged writes are missing", code=1)
