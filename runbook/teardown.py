"""Tear down a rehearsal stack: ``pulumi destroy`` then ``pulumi stack rm``. Never prod.

A stack is torn down only when its committed config (``Pulumi.<stack>.yaml``) says
``tern:rehearsal: true`` *and* the live stack's ``rehearsal`` output agrees; ``prod`` is
refused whatever its files say.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import yaml

from .errors import ConfigError, PreflightError, RunbookError
from .redact import redact

NEVER = {"prod", "production"}


def _pulumi() -> str:
    exe = shutil.which("pulumi")
    if exe is None:
        raise ConfigError("the pulumi CLI is not on PATH")
    return exe


def run_pulumi(args: list[str], *, cwd: Path, timeout: float = 3600) -> subprocess.CompletedProcess:
    proc = subprocess.run([_pulumi(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RunbookError(f"`pulumi {' '.join(args)}` failed: {redact(proc.stderr.strip())[-800:]}")
    return proc


def check_rehearsal(stack: str, project_dir: Path) -> None:
    if stack.lower() in NEVER or stack.lower().endswith("/prod"):
        raise PreflightError(f"refusing to tear down {stack!r}: production is never torn down by tern")
    path = project_dir / f"Pulumi.{stack}.yaml"
    if not path.exists():
        raise ConfigError(f"no stack config {path.name}: only committed rehearsal stacks can be torn down")
    config = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    if str(config.get("tern:rehearsal")).lower() != "true":
        raise PreflightError(f"refusing to tear down {stack!r}: {path.name} does not mark it as a rehearsal "
                             "stack (tern:rehearsal: true)")
    out = run_pulumi(["stack", "output", "--json", "-s", stack], cwd=project_dir, timeout=120)
    # no outputs (a stack never deployed, a failed update, a misread) prove nothing: refuse
    try:
        live = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise PreflightError(f"refusing to tear down {stack!r}: its live outputs cannot be read "
                             "(pulumi printed no JSON)") from None
    if not isinstance(live, dict) or not live:
        raise PreflightError(f"refusing to tear down {stack!r}: it has no live outputs, so nothing says it is a "
                             "rehearsal stack (destroy it by hand if it really is one)")
    if live.get("rehearsal") is not True:
        raise PreflightError(f"refusing to tear down {stack!r}: its live outputs do not say rehearsal: true")


def teardown(stack: str, project_dir: Path, *, confirm: Callable[[str], bool],
             progress: Callable[[str], None] = lambda m: None) -> None:
    check_rehearsal(stack, project_dir)
    if not confirm(f"Destroy every resource of rehearsal stack {stack!r} and remove the stack?"):
        raise PreflightError("teardown not confirmed; nothing was changed")
    progress(f"pulumi destroy -s {stack}")
    run_pulumi(["destroy", "--yes", "--non-interactive", "-s", stack], cwd=project_dir)
    progress(f"pulumi stack rm -s {stack}")
    run_pulumi(["stack", "rm", "--yes", "--non-interactive", "-s", stack], cwd=project_dir)
