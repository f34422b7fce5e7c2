"""``invoke rehearse``: the main job, a full dry run of the migration on the sandbox."""

from __future__ import annotations

import json as jsonlib
import time
from contextlib import ExitStack

from invoke import Exit, task

from .. import status as status_mod
from ..contract import load
from ..failover.run import failover_aurora, failover_ec2
from ..replication.setup import replicate_aurora
from ..restore import restore_all
from .common import (byte_progress, human, parse_float, parse_int, print_json, progress_status, say, stack_settings,
                     task_errors)
from .environment import render
from .failover import render_report, run_reported, switch_mode
from .sandbox import MAX_SCALE, check_shape, sandbox_flags, sandbox_for

MAX_SECONDS = 24 * 3600
DEFAULT_BOOT_SECONDS = 10.0   # a real app's boot after a config-var change (Heroku restarts every dyno)


@task(help={"seconds": "how long the app writes before the migration starts (default 5)",
            "scale": f"data size multiplier, 1 to {MAX_SCALE}", "dataset": "inventory or chinook",
            "rate": "app commits per second", "keep": "leave the sandbox (with --stack: the stack) up afterwards",
            "hops": "2: Heroku -> EC2 -> Aurora (default); 1: Heroku -> EC2 only",
            "json": "print the final report as JSON on stdout (the last hop's, with failover_ec2 holding "
                    "hop 1's); tables and progress go to stderr",
            "adapters": "local (default): subprocesses and the app's state file; aws: the failover through the real "
                        "SSM, Heroku and EBS adapters against local stand-ins (runbook/standins/world.py; hop 1 only)",
            "switch": "pooler (default when PgBouncer is installed): both hops through it, no restart at the "
                      "switch; url: DATABASE_URL swaps, every dyno restarts",
            "boot_seconds": f"how long the app's dynos take to boot after a config-var change (default "
                            f"{DEFAULT_BOOT_SECONDS:g}, as a real app)",
            "stack": "a Pulumi rehearsal stack (such as dev) instead of the sandbox: pulumi up, restore, both "
                     "failovers, the report, pulumi destroy (runbook/rehearsal_stack.py); refuses prod and any stack "
                     "Pulumi.<stack>.yaml does not mark tern:rehearsal: true",
            "yes": "with --stack: do not ask before pulumi up"})
@task_errors
def rehearse(c, seconds=None, scale=None, dataset=None, rate=None, keep=False, hops=None, json=False,
             adapters=None, switch=None, boot_seconds=None, stack=None, yes=False):
    """The whole migration on the sandbox with the app writing throughout, ending with the reports.

    Sandbox up -> restore the EC2 replicas from the archive -> catch up -> failover-ec2 ->
    replicate-aurora -> failover-aurora -> app stopped, ledger checked against the database the
    app ends on -> sandbox down. The runs and their reports stay in <state_dir>/local/runs after
    the sandbox is gone (`invoke report`).
    """
    hops = parse_int("hops", hops, min=1, max=2) or 2
    if stack is not None and stack != "local":     # a real rehearsal stack: runbook/rehearsal_stack.py
        from .stack_rehearsal import rehearse_on_stack

        return rehearse_on_stack(c, stack, hops=hops, keep=keep, json=json, switch=switch, yes=yes, sandbox_flags=dict(
            seconds=seconds, scale=scale, dataset=dataset, rate=rate, adapters=adapters, boot_seconds=boot_seconds))
    adapters = adapters or "local"
    if adapters not in ("local", "aws"):
        raise Exit(f"tern: error: --adapters is local or aws, not {adapters!r}", code=2)
    if adapters == "aws" and hops != 1:
        raise Exit("tern: error: --adapters aws rehearses hop 1 only: add --hops 1", code=2)
    seconds = parse_float("seconds", seconds, min=0, max=MAX_SECONDS)
    seconds = 5.0 if seconds is None else seconds
    boot = parse_float("boot-seconds", boot_seconds, min=0, max=600)
    boot = DEFAULT_BOOT_SECONDS if boot is None else boot
    mode = switch_mode(switch)   # every flag before any look at the environment
    sb, s = sandbox_for(c, **sandbox_flags(scale=scale, dataset=dataset, rate=rate))
    # the aws stand-ins rehearse the url switch (their outputs carry no pooler)
    s = s.replace(switch_mode=mode or ("url" if adapters == "aws" else None))
    if adapters == "aws" and s.switch_mode == "pooler":
        raise Exit("tern: error: --adapters aws rehearses the url switch only: drop --switch pooler", code=2)
    check_shape(s)
    run_settings = stack_settings(s, "local")
    show = human(json)
    if sb.exists():
        say("a sandbox is already up: taking it down first")
        sb.down(check_ledger=False)
    world = ExitStack()
    try:
        with progress_status("building the sandbox") as update:
            # a PgBouncer in front (when installed) unless the url switch is asked for
            sb.up(replicas=s.replicas, scale=s.scale, dataset=s.dataset, rate=s.app_rate, progress=update,
                  pooler=None if s.switch_mode != "url" else False)
        o = load("local", s.sandbox_dir)
        sb.app().set_boot_seconds(boot)
        say(f"the app's dynos take {boot:g} s to boot (at start and after every config-var change); switch: "
            + ("through the pooler" if o.pooler is not None and s.switch_mode != "url" else "DATABASE_URL"))
        standins = None
        if adapters == "aws":   # restore and failover through the real adapters (see runbook/standins/world.py)
            from ..standins.world import AwsWorld

            standins = world.enter_context(AwsWorld(sb))
            o = standins.outputs
            say(f"restore (WAL-G from S3) and failover through SSM ({standins.latency:g} s a command), Heroku and "
                "EC2 stand-ins")
        with byte_progress("restoring") as progress:
            restored = restore_all(o, timeout=s.restore_timeout, connect_timeout=s.connect_timeout, progress=progress,
                                   state_dir=run_settings.state_dir)
        for name, what in restored.items():
            say(f"{name}: {what}")
        say(f"app writing for {seconds:g}s at {s.app_rate:g} commits/s")
        time.sleep(seconds)
        render(status_mod.gather(o, timeout=s.connect_timeout), show)
        report = run_reported("failover-ec2", show, json,
                              lambda update: failover_ec2(o, run_settings, confirm=lambda q: True, progress=update))
        render_report(report, show)
        render(status_mod.gather(o, timeout=s.connect_timeout), show)
        first = report
        if hops == 2:
            with progress_status("replicate-aurora", echo=True) as update:
                setup = replicate_aurora(o, run_settings, replica_identity_full=True, progress=update)
            say(f"replication into Aurora running: initial copy in {setup.get('initial_sync_seconds')} s")
            time.sleep(min(seconds, 2.0))
            report = run_reported("failover-aurora", show, json,
                                  lambda update: failover_aurora(o, run_settings, confirm=lambda q: True,
                                                                 progress=update))
            render_report(report, show)
            report["failover_ec2"] = first
        report["adapters"] = adapters
        if standins is not None:
            report["standins"] = standins.summary()
        world.close()       # the stand-ins stop before the app does
        result = sb.check_ledger_after_stop()
        report["final_ledger_check"] = result
        saved = run_settings.state_dir / "runs" / report["run_id"] / "report.json"
        saved.write_text(jsonlib.dumps(report, indent=2, sort_keys=True, default=str))
    finally:
        world.close()
        if not keep:
            sb.down(check_ledger=False)
    from ..review import write_safely
    report["review"] = write_safely(run_settings.state_dir, report["run_id"])   # the after-action review's page
    if json:
        print_json(report)
    for r in ([report["failover_ec2"]] if report.get("failover_ec2") else []) + [report]:
        w = r.get("write_unavailability") or {}
        d = r.get("database_unavailability") or {}
        show.print(f"{r['kind']} ({r.get('switch_mode')} switch): app unavailability {w.get('seconds')} s, database "
                   f"unavailability {d.get('seconds')} s, {r.get('client_errors')} client errors, longest write held "
                   f"{r.get('longest_held_query_seconds')} s, {r.get('missing_on_target')} acknowledged writes missing",
                   markup=False)
    show.print(f"ledger check on {result['endpoint']}: {result['acknowledged']} acknowledged writes, "
               f"{result['missing']} lost, {result['unexplained']} unexplained rows; report saved in {saved} "
               f"(`invoke report --run {report['run_id']}`)", markup=False)
    say(f"after-action review: {report['review'].get('html') or report['review'].get('error')}")
    if not result["ok"] or report.get("missing_on_target"):
        raise Exit("tern: error: acknowledged writes are missing", code=1)
