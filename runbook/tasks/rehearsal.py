"""``invoke rehearse``: the main job, a full dry run of the migration on the sandbox."""

from __future__ import annotations

import json as jsonlib
import time

from invoke import Exit, task

from .. import status as status_mod
from ..contract import load
from ..failover.run import failover_ec2
from ..restore import restore_all
from .common import console, out, print_json, task_errors
from .environment import render
from .failover import render_report
from .sandbox import sandbox_for


@task(help={"seconds": "how long the app writes before the migration starts (default 5)",
            "scale": "data size multiplier", "dataset": "inventory or chinook", "rate": "app commits per second",
            "keep": "leave the sandbox up afterwards", "json": "print the final report as JSON"})
@task_errors
def rehearse(c, seconds=5.0, scale=None, dataset=None, rate=None, keep=False, json=False):
    """The whole migration on the sandbox with the app writing throughout, ending with the report.

    Sandbox up -> restore the EC2 replicas from the archive -> catch up -> failover-ec2 ->
    report -> app stopped, ledger checked against the new leader -> sandbox down.
    """
    seconds = float(seconds)
    if seconds < 0:
        raise Exit(f"tern: error: --seconds must be >= 0, got {seconds}", code=2)
    sb, s = sandbox_for(c, scale=scale, dataset=dataset, app_rate=rate)
    if sb.exists():
        console.print("a sandbox is already up: taking it down first")
        sb.down(check_ledger=False)
    try:
        with console.status("building the sandbox") as st:
            sb.up(replicas=s.replicas, scale=s.scale, dataset=s.dataset, rate=s.app_rate,
                  progress=lambda m: st.update(m))
            o = load("local", s.sandbox_dir)
            st.update("restoring the EC2 replicas from the archive")
            for name, what in restore_all(o, timeout=s.restore_timeout, connect_timeout=s.connect_timeout).items():
                console.print(f"{name}: {what}")
        console.print(f"app writing for {seconds:.0f}s at {s.app_rate:.0f} commits/s")
        time.sleep(seconds)
        render(status_mod.gather(o, timeout=s.connect_timeout))
        with console.status("failover-ec2") as st:
            report = failover_ec2(o, s.replace(state_dir=str(sb.root / "runs")), confirm=lambda q: True,
                                  progress=lambda m: (st.update(m), console.print(f"  {m}")))
        render_report(report)
        render(status_mod.gather(o, timeout=s.connect_timeout))
        result = sb.check_ledger_after_stop()
        report["final_ledger_check"] = result
        saved = s.state_dir / "rehearsals"
        saved.mkdir(parents=True, exist_ok=True)
        (saved / f"{report['run_id']}.json").write_text(jsonlib.dumps(report, indent=2, default=str))
    finally:
        if not keep:
            sb.down(check_ledger=False)
    if json:
        print_json(report)
    out.print(f"ledger check on {result['endpoint']}: {result['acknowledged']} acknowledged writes, "
              f"{result['missing']} lost, {result['unexplained']} unexplained rows; "
              f"report saved in {saved}/{report['run_id']}.json")
    if not result["ok"] or report.get("missing_on_target"):
        raise Exit("tern: error: acknowledged writes are missing", code=1)
