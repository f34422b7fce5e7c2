"""``invoke sandbox.up`` / ``sandbox.down``: the local stand-in for Heroku, EC2 and Aurora."""

from __future__ import annotations

from typing import Any

from invoke import Exit, task

from ..errors import ConfigError
from ..sandbox import Sandbox
from ..sandbox.build import DATASETS, ZONES
from ..settings import Settings
from .common import console, parse_choice, parse_float, parse_int, print_json, progress_status, settings, task_errors

MAX_SCALE = 1000


def sandbox_flags(*, scale=None, dataset=None, replicas=None, rate=None) -> dict[str, Any]:
    """The sandbox-shape flags of ``sandbox.up`` and ``rehearse``, parsed and checked (None: not given)."""
    return {"scale": parse_int("scale", scale, min=1, max=MAX_SCALE),
            "dataset": parse_choice("dataset", dataset, DATASETS),
            "replicas": parse_int("replicas", replicas, min=2, max=len(ZONES)),
            "app_rate": parse_float("rate", rate, above=0)}


def check_shape(s: Settings) -> None:
    """The sandbox shape once flags and settings are merged (a setting may come from INVOKE_TERN_*)."""
    if s.dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {s.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if not 2 <= s.replicas <= len(ZONES):
        raise ConfigError(f"replicas must be between 2 and {len(ZONES)} (one per availability zone), got {s.replicas}")
    if s.scale > MAX_SCALE:
        raise ConfigError(f"scale must be between 1 and {MAX_SCALE}, got {s.scale}")


def sandbox_for(c, **overrides) -> tuple[Sandbox, Settings]:
    s = settings(c, **overrides)
    return Sandbox(s.sandbox_dir, pg_bindir=s.pg_bindir), s


@task(help={"scale": f"data size multiplier, 1 to {MAX_SCALE} (1: ~50k rows)",
            "dataset": "inventory or chinook (chinook adds the real dataset)",
            "replicas": f"EC2 replica hosts, one per availability zone (2 to {len(ZONES)})",
            "rate": "app commits per second", "no_app": "do not start the app"})
@task_errors
def up(c, scale=None, dataset=None, replicas=None, rate=None, no_app=False):
    """Build and start the sandbox: Heroku source + archive, EC2 hosts, Aurora, and the app writing."""
    sb, s = sandbox_for(c, **sandbox_flags(scale=scale, dataset=dataset, replicas=replicas, rate=rate))
    check_shape(s)
    with progress_status("building the sandbox") as update:
        sb.up(replicas=s.replicas, scale=s.scale, dataset=s.dataset, rate=s.app_rate, start_app=not no_app,
              progress=update)
    console.print(f"sandbox up in {sb.root}: outputs in {sb.outputs_file}", markup=False)


@task(help={"json": "print the ledger check as JSON (was_up false when there was nothing to take down)"})
@task_errors
def down(c, json=False):
    """Stop the app, check its ledger against its database, stop every server and remove the sandbox."""
    sb, _ = sandbox_for(c)
    result = sb.down(check_ledger=True)
    if result is None:
        if json:
            print_json({"was_up": False, "ok": True})
        console.print("no sandbox to take down")
        return
    if json:
        print_json({"was_up": True, **result})
    console.print(f"app stopped; ledger: {result['acknowledged']} acknowledged writes, {result['missing']} missing "
                  f"on {result['endpoint']}, {result['unexplained']} unexplained rows", markup=False)
    if not result["ok"]:
        raise Exit("tern: error: the ledger does not match the database", code=1)
