"""``invoke sandbox.up`` / ``sandbox.down``: the local stand-in for Heroku, EC2 and Aurora."""

from __future__ import annotations

from invoke import task

from ..sandbox import Sandbox
from .common import console, print_json, settings, task_errors


def sandbox_for(c, **overrides) -> tuple[Sandbox, object]:
    s = settings(c, **overrides)
    return Sandbox(s.sandbox_dir, pg_bindir=s.pg_bindir), s


@task(help={"scale": "data size multiplier (1: ~50k rows)", "dataset": "inventory or chinook (chinook adds the real dataset)",
            "replicas": "EC2 replica hosts, one per availability zone (>= 2)", "rate": "app commits per second",
            "no_app": "do not start the app"})
@task_errors
def up(c, scale=None, dataset=None, replicas=None, rate=None, no_app=False):
    """Build and start the sandbox: Heroku source + archive, EC2 hosts, Aurora, and the app writing."""
    sb, s = sandbox_for(c, scale=scale, dataset=dataset, replicas=replicas, app_rate=rate)
    with console.status("building the sandbox") as status:
        sb.up(replicas=s.replicas, scale=s.scale, dataset=s.dataset, rate=s.app_rate, start_app=not no_app,
              progress=lambda msg: status.update(msg))
    console.print(f"sandbox up in {sb.root}: outputs in {sb.outputs_file}")


@task(help={"json": "print the ledger check as JSON"})
@task_errors
def down(c, json=False):
    """Stop the app, check its ledger against its database, stop every server and remove the sandbox."""
    sb, _ = sandbox_for(c)
    result = sb.down(check_ledger=True)
    if result is None:
        console.print("no sandbox to take down")
        return
    if json:
        print_json(result)
    console.print(f"app stopped; ledger: {result['acknowledged']} acknowledged writes, {result['missing']} missing "
                  f"on {result['endpoint']}, {result['unexplained']} unexplained rows")
    if not result["ok"]:
        from invoke import Exit

        raise Exit("tern: error: the ledger does not match the database", code=1)
