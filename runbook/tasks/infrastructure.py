"""``invoke teardown``: remove a rehearsal stack (never prod)."""

from __future__ import annotations

from invoke import task

from ..settings import PROJECT_DIR
from ..teardown import teardown as run_teardown
from .common import parse_name, say, settings, task_errors
from .failover import make_confirm


@task(help={"stack": "the rehearsal stack to destroy (never prod); required", "yes": "do not ask for confirmation"})
@task_errors
def teardown(c, stack=None, yes=False):
    """Tear down a rehearsal stack: pulumi destroy, then pulumi stack rm. Refuses prod and non-rehearsal stacks."""
    stack = parse_name("stack", stack, required=True)
    s = settings(c)
    run_teardown(stack, PROJECT_DIR, confirm=make_confirm(yes, s.confirm_timeout), progress=say,
                 state_dir=s.stack_state_dir(stack))
    say(f"stack {stack} destroyed and removed")
