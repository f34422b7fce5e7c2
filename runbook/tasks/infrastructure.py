"""``invoke teardown``: remove a rehearsal stack (never prod)."""

from __future__ import annotations

from pathlib import Path

from invoke import task

from ..errors import ConfigError
from ..teardown import teardown as run_teardown
from .common import console, task_errors
from .failover import make_confirm

PROJECT_DIR = Path(__file__).resolve().parents[2]


@task(help={"stack": "the rehearsal stack to destroy (never prod)", "yes": "do not ask for confirmation"})
@task_errors
def teardown(c, stack=None, yes=False):
    """Tear down a rehearsal stack: pulumi destroy, then pulumi stack rm. Refuses prod and non-rehearsal stacks."""
    if not stack:
        raise ConfigError("--stack is required")
    run_teardown(stack, PROJECT_DIR, confirm=make_confirm(yes), progress=lambda m: console.print(m))
    console.print(f"stack {stack} destroyed and removed")
