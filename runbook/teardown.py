"""Tear down a rehearsal stack: ``pulumi destroy`` then ``pulumi stack rm``. Never prod.

A stack is torn down only when its committed config (``Pulumi.<stack>.yaml``) says
``tern:rehearsal: true`` *and* the live stack's ``rehearsal`` output agrees; ``prod`` is
refused whatever its files say. ``invoke rehearse --stack`` applies the same rule: the
committed file before ``pulumi up`` (:func:`check_marked`), the live outputs too before its
``pulumi destroy`` (:func:`check_rehearsal`).

``pulumi stack rm`` runs with ``--preserve-config``: without it Pulumi deletes
``Pulumi.<stack>.yaml``, the committed file that marks the stack as a rehearsal (and holds the
operator's encrypted secrets).

Every pulumi command is bounded: past its timeout it is interrupted (SIGINT, which Pulumi
answers by stopping cleanly, leaving no operation half-recorded), then killed after a grace period.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Callable

import yaml

from . import client_tls
from .errors import ConfigError, PreflightError, RunbookError, TimeoutExpired
from .redact import redact

NEVER = {"prod", "production"}
INTERRUPT_GRACE = 300.0     # seconds pulumi gets to stop cleanly after SIGINT before it is killed


def _pulumi() -> str:
    exe = shutil.which("pulumi")
    if exe is None:
        raise ConfigError("the pulumi CLI is not on PATH")
    return exe


def run_pulumi(args: list[str], *, cwd: Path, timeout: float = 3600, log: Path | None = None,
               grace: float = INTERRUPT_GRACE) -> subprocess.CompletedProcess:
    """``pulumi ARGS`` in ``cwd``, bounded by ``timeout``; with ``log``, its output goes there (appended, as it
    comes: a long ``up`` can be followed with ``tail -f``) instead of being kept. Raises RunbookError."""
    what = f"`pulumi {' '.join(args)}`"
    sink = open(log, "a") if log is not None else None      # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen([_pulumi(), *args], cwd=cwd, text=True, stdin=subprocess.DEVNULL,
                                stdout=sink or subprocess.PIPE, stderr=subprocess.STDOUT if sink else subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            raise TimeoutExpired(f"{what} did not finish within {timeout:.0f}s: interrupted"
                                 + (f" (its output: {log})" if log else "")) from None
    finally:
        if sink is not None:
            sink.close()
    if proc.returncode != 0:
        said = err if sink is None else _tail(log)
        raise RunbookError(f"{what} failed: {redact((said or '').strip())[-800:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _tail(path: Path, size: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - size))
        return f.read().decode(errors="replace")


def check_marked(stack: str, project_dir: Path, *, verb: str = "tear down", done: str = "torn down") -> None:
    """The committed half of the rule: not prod, and ``Pulumi.<stack>.yaml`` says ``tern:rehearsal: true``."""
    if stack.lower() in NEVER or stack.lower().endswith("/prod"):
        raise PreflightError(f"refusing to {verb} {stack!r}: production is never {done} by tern")
    path = project_dir / f"Pulumi.{stack}.yaml"
    if not path.exists():
        raise ConfigError(f"no stack config {path.name}: only committed rehearsal stacks can be {done}")
    config = (yaml.safe_load(path.read_text()) or {}).get("config") or {}
    if str(config.get("tern:rehearsal")).lower() != "true":
        raise PreflightError(f"refusing to {verb} {stack!r}: {path.name} does not mark it as a rehearsal "
                             "stack (tern:rehearsal: true)")


def check_rehearsal(stack: str, project_dir: Path, *, checked_before_up: bool = False) -> None:
    """The whole rule: :func:`check_marked`, and the live stack's outputs say ``rehearsal: true``.

    ``checked_before_up``: the caller checked this stack as a rehearsal (committed file and effective
    config) before its own ``pulumi up`` started. Pulumi saves no outputs when a stack's first update
    fails half-way, so such a stack's empty outputs (``{}``) are accepted then: that earlier check
    vouches for what the up created. Outputs that say anything else are still refused."""
    check_marked(stack, project_dir)
    out = run_pulumi(["stack", "output", "--json", "-s", stack], cwd=project_dir, timeout=120)
    # no outputs (a stack never deployed, a failed update, a misread) prove nothing: refuse
    try:
        live = json.loads(out.stdout)
    except json.JSONDecodeError:
        raise PreflightError(f"refusing to tear down {stack!r}: its live outputs cannot be read "
                             "(pulumi printed no JSON)") from None
    if checked_before_up and live == {}:
        return
    if not isinstance(live, dict) or not live:
        raise PreflightError(f"refusing to tear down {stack!r}: it has no live outputs, so nothing says it is a "
                             "rehearsal stack (destroy it by hand if it really is one)")
    if live.get("rehearsal") is not True:
        raise PreflightError(f"refusing to tear down {stack!r}: its live outputs do not say rehearsal: true")


def teardown(stack: str, project_dir: Path, *, confirm: Callable[[str], bool],
             progress: Callable[[str], None] = lambda m: None, state_dir: Path | None = None) -> None:
    """``state_dir``: the stack's state directory, whose client certificate (:mod:`.client_tls`) goes too.

    The replicas' hba line that trusts that certificate needs no removal of its own: ``restore`` writes it
    into the instances' ``/etc/tern/postgresql`` (root volume, deleted with the instance), and destroy
    terminates them. The certificate, its key and the replicas' certificates tern kept are removed here,
    after the destroy (the runs and reports stay), so a stack made again under this name gets a new key."""
    check_rehearsal(stack, project_dir)
    if not confirm(f"Destroy every resource of rehearsal stack {stack!r} and remove the stack?"):
        raise PreflightError("teardown not confirmed; nothing was changed")
    destroy(stack, project_dir, progress=progress)
    progress(f"pulumi stack rm -s {stack}")
    run_pulumi(["stack", "rm", "--yes", "--non-interactive", "--preserve-config", "-s", stack], cwd=project_dir)
    if client_tls.forget(state_dir):
        progress(f"tern's client certificate for {stack} removed from {state_dir}")


def destroy(stack: str, project_dir: Path, *, progress: Callable[[str], None] = lambda m: None,
            timeout: float = 3600, log: Path | None = None) -> None:
    """``pulumi destroy`` of a stack :func:`check_rehearsal` has passed (the caller checks)."""
    progress(f"pulumi destroy -s {stack}")
    run_pulumi(["destroy", "--yes", "--non-interactive", "-s", stack], cwd=project_dir, timeout=timeout, log=log)
