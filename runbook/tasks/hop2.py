"""Hop 2's tasks: ``invoke replicate-aurora``, ``invoke failover-aurora`` and ``invoke rollback-aurora``."""

from __future__ import annotations

from invoke import Exit, task
from rich.table import Table
from rich.text import Text

from ..errors import ConfigError, PreflightError, StepError
from ..failover.run import failover_aurora as run_failover_aurora
from ..failover.run import rollback_aurora as run_rollback_aurora
from ..replication import ENGINES
from ..replication.setup import replicate_aurora as run_replicate
from .common import (human, outputs, parse_choice, parse_name, print_json, progress_status, settings,
                     stack_settings, task_errors)
from .failover import STACK_HELP, SWITCH_MODE_HELP, make_confirm, render_report, run_reported, switch_mode


def render_register(register, show) -> None:
    table = Table(title="hop 2 risk register")
    for col in ("risk", "severity", "objects", "what tern does"):
        table.add_column(col)
    for f in register or []:
        objects = ", ".join(f["objects"][:6]) + (f" (+{len(f['objects']) - 6})" if len(f["objects"]) > 6 else "")
        table.add_row(Text(f["risk"]), f["severity"].upper() if f["severity"] == "block" else f["severity"],
                      Text(objects), Text(f["action"]))
    show.print(table)


@task(name="replicate-aurora",
      help={"engine": f"{' | '.join(ENGINES)} (default native; dms drives the stack's DMS task)",
            "dry_run": "print the risk register and the plan",
            "replica_identity_full": "replicate tables without a primary key with REPLICA IDENTITY FULL (slower)",
            "stack": STACK_HELP, "json": "the result as JSON on stdout"})
@task_errors
def replicate_aurora(c, engine=None, dry_run=False, replica_identity_full=False, stack=None, json=False):
    """Set up and start replication from the EC2 leader into Aurora (safe to run again).

    Preflight risk register, the app's role and schema on Aurora, publication and subscription (or,
    with --engine dms, the DMS task's source endpoint moved to the leader and the task started), the
    initial copy, indexes after it, (DMS: its validation counts), and a DDL guard on the leader.
    """
    stack = parse_name("stack", stack)
    engine = parse_choice("engine", engine, ENGINES) or "native"
    o = outputs(c, stack)
    s = stack_settings(settings(c), stack)
    show = human(json)
    with progress_status("replicate-aurora", echo=True) as update:
        try:
            result = run_replicate(o, s, engine=engine, dry_run=dry_run, replica_identity_full=replica_identity_full,
                                   progress=update)
        except (StepError, PreflightError) as exc:
            register = exc.context.get("risk_register") or exc.context.get("register")
            if register:
                render_register(register, show)
            raise
    render_register(result.get("risk_register"), show)
    if json:
        print_json(result)
    if dry_run and result.get("refused"):
        raise Exit(f"tern: error: {result['refused']}", code=2)


SWITCH_HELP = {"dry_run": "print the plan against the current state and change nothing",
               "yes": "confirm the point of no return without asking", "stack": STACK_HELP,
               "json": "the report (or, with --dry-run, the plan) as JSON on stdout"}


@task(name="failover-aurora", help={**SWITCH_HELP, "switch": SWITCH_MODE_HELP})
@task_errors
def failover_aurora(c, dry_run=False, yes=False, stack=None, json=False, switch=None):
    """Failover 2: EC2 -> Aurora. Freeze, fence, sentinel, sequences, verify, switch over (reverse
    replication started first), switch, start, smoke test. Falls back before the point of no return."""
    run_switch(c, "failover-aurora", run_failover_aurora, dry_run=dry_run, yes=yes, stack=stack, json=json,
               switch=switch)


@task(name="rollback-aurora", help=SWITCH_HELP)
@task_errors
def rollback_aurora(c, dry_run=False, yes=False, stack=None, json=False):
    """After failover-aurora: the app back to the EC2 leader through the reverse replication. Fence
    Aurora for the app, sentinel, sequences, verify, switch back (replication into Aurora resumed),
    switch, start, smoke test. Falls back to Aurora before the point of no return."""
    run_switch(c, "rollback-aurora", run_rollback_aurora, dry_run=dry_run, yes=yes, stack=stack, json=json)


def run_switch(c, title: str, entry, *, dry_run: bool, yes: bool, stack, json: bool, switch=None) -> None:
    """A hop-2 switch (``entry``: failover or rollback) under progress, then its report or plan; exit 1
    when an acknowledged write is missing."""
    stack = parse_name("stack", stack)
    mode = switch_mode(switch)   # every flag before any look at the environment
    o = outputs(c, stack)
    s = stack_settings(settings(c), stack).replace(switch_mode=mode)
    show = human(json)
    result = run_reported(title, show, json,
                          lambda update: entry(o, s, dry_run=dry_run, confirm=make_confirm(yes, s.confirm_timeout),
                                               progress=update))
    if dry_run:
        if json:
            print_json(result)
        else:
            for row in result["plan"]:
                show.print(f"{row['step']:14s} {row['state']}", markup=False)
        if result.get("preflight_error"):
            raise ConfigError(f"the preflight would refuse: {result['preflight_error']}")
        return
    render_report(result, show)
    if json:
        print_json(result)
    if result.get("missing_on_target"):
        raise Exit(f"tern: error: {result['missing_on_target']} acknowledged writes are missing", code=1)
