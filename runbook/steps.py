"""Steps and the runner that journals them.

A :class:`Step` has a *check* (already done?), an *act*, a *verify* and, where one
exists, a *revert*. The :class:`Runner` walks the plan: a step the journal marks done
is skipped; a step whose check passes is marked done without acting; otherwise it
acts and verifies. Every transition is journaled before the next one starts, so a
run killed at any moment resumes by running the same command again.

Before the point of no return, any failure falls back: the reverts of the steps
done so far run in reverse order (retried until ``fallback_timeout``), and the run
ends as ``fell_back`` with the reason. After it, a failure leaves the run open:
fix the cause and run the command again to resume.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PreflightError, RunbookError, StepError
from .journal import Journal
from .redact import redact

log = logging.getLogger(__name__)

FAULT_KILL_AFTER = "TERN_FAULT_KILL_AFTER"   # test hook: SIGKILL this process once the named step is journaled done


@dataclass
class Step:
    name: str
    title: str
    act: Callable[[Any], dict[str, Any] | None]
    check: Callable[[Any], bool] | None = None
    verify: Callable[[Any], None] | None = None
    revert: Callable[[Any], None] | None = None
    point_of_no_return: bool = False


@dataclass
class Runner:
    journal: Journal
    steps: list[Step]
    confirm: Callable[[str], bool]
    fallback_timeout: float = 60.0
    hooks: dict[str, Callable[[Any], None]] = field(default_factory=dict)
    progress: Callable[[str], None] = lambda msg: log.info(msg)

    def past_point_of_no_return(self) -> bool:
        return any(self.journal.started(s.name) or self.journal.is_done(s.name)
                   for s in self.steps if s.point_of_no_return)

    def plan(self, ctx: Any) -> list[tuple[Step, str]]:
        """What each step would do now (for --dry-run): done, would skip, or would act."""
        rows = []
        for s in self.steps:
            if self.journal.is_done(s.name):
                rows.append((s, "done (journal)"))
                continue
            try:
                state = "already done" if s.check and s.check(ctx) else "to do"
            except Exception as exc:  # noqa: BLE001 - a dry run reports, it never fails on a check
                state = "to do" if isinstance(exc, KeyError) else f"to do (cannot check: {redact(exc)})"
            rows.append((s, state + (" - POINT OF NO RETURN" if s.point_of_no_return else "")))
        return rows

    def _hook(self, when: str, step: Step, ctx: Any) -> None:
        fn = self.hooks.get(f"{when}:{step.name}")
        if fn:
            fn(ctx)

    def run(self, ctx: Any) -> str:
        if any(e["step"] == "run" and e["event"] == "fallback_started" for e in self.journal.events):
            reason = next(e.get("reason", "") for e in self.journal.events if e["event"] == "fallback_started")
            self.progress("resuming an interrupted fallback")
            self._fall_back(ctx, reason)
            raise StepError(f"fell back: {reason}")
        for step in self.steps:
            if self.journal.is_done(step.name):
                continue
            self._hook("before", step, ctx)
            try:
                if step.check is not None and step.check(ctx):
                    self.journal.record(step.name, "skipped", detail="already done")
                    self.progress(f"{step.title}: already done")
                    self._after(step, ctx)
                    continue
                if step.point_of_no_return and not self.journal.started(step.name):
                    if not self.confirm(f"{step.title}: this is a point of no return. Proceed?"):
                        raise PreflightError("the operator declined the point of no return")
                self.journal.record(step.name, "start")
                self.progress(step.title)
                updates = step.act(ctx) or {}
                if step.verify is not None:
                    step.verify(ctx)
            except Exception as exc:  # noqa: BLE001 - every failure is journaled, then handled below
                reason = f"{step.name}: {redact(exc) if isinstance(exc, RunbookError) else type(exc).__name__ + ': ' + redact(exc)}"
                self.journal.record(step.name, "failed", detail=reason)
                if not self.past_point_of_no_return():
                    self._fall_back(ctx, reason)
                    raise StepError(f"fell back to the source: {reason}", step=step.name) from exc
                raise StepError(f"{reason} (after the point of no return: no automatic fallback; fix the cause "
                                f"and run the same command again to resume)", step=step.name) from exc
            detail = updates.pop("detail", "") if isinstance(updates, dict) else ""
            self.journal.record(step.name, "done", detail=detail, context=updates)
            ctx.data.update(updates)
            self._after(step, ctx)
        self.journal.finish("completed")
        return "completed"

    def _after(self, step: Step, ctx: Any) -> None:
        self._hook("after", step, ctx)
        if os.environ.get(FAULT_KILL_AFTER) == step.name:
            os.kill(os.getpid(), signal.SIGKILL)

    def _fall_back(self, ctx: Any, reason: str) -> None:
        self.journal.record("run", "fallback_started", reason=reason)
        self.progress(f"falling back: {reason}")
        done = [s for s in self.steps if self.journal.is_done(s.name) and s.revert is not None]
        reverted = {e["step"] for e in self.journal.events if e["event"] == "reverted"}
        for step in reversed(done):
            if step.name in reverted:
                continue
            deadline = time.monotonic() + self.fallback_timeout
            while True:
                try:
                    step.revert(ctx)
                    self.journal.record(step.name, "reverted")
                    break
                except Exception as exc:  # noqa: BLE001
                    if time.monotonic() > deadline:
                        self.journal.record(step.name, "revert_failed", detail=redact(exc))
                        self.progress(f"revert of {step.name} failed: {redact(exc)}")
                        break
                    time.sleep(0.5)
        self.journal.finish("fell_back", reason)
