"""Steps and the runner that journals them.

A :class:`Step` has a *check* (already done?), an *act*, a *verify* and, where one
exists, a *revert*. The :class:`Runner` walks the plan: a step the journal marks done
is skipped; a step whose check passes is marked done without acting; otherwise it
acts and verifies. Every transition is journaled before the next one starts, so a
run killed at any moment resumes by running the same command again.

Before the point of no return, any failure falls back: the reverts of the steps
done so far - and of the step that failed half-way - run in reverse order (each
retried until ``fallback_timeout``), and the run ends as ``fell_back`` with the
reason; if a revert never succeeded it ends as ``fallback_failed``, saying what is
still in place and what to do. A point-of-no-return step that refuses to cross
(:class:`~runbook.errors.NotPromoted`) falls back too. After the point of no
return, a failure leaves the run open: fix the cause and run the command again.

On resume, each step done before the point of no return is re-checked (its
``recheck``: the fence still holds, the final LSN is still replayed); if one no
longer holds, the run falls back. A journal that cannot be written (disk full)
never lets a step act: the run falls back, and says so.

Only the runner writes the journal. What an act returns is recorded with its ``done``;
a value a crash must not lose before then (the final LSN, a seal's transaction id) the
step saves with ``ctx.checkpoint(**fields)``: the runner records it as a ``progress``
event of the step running now and applies it to the run's state (``ctx.data``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import NotPromoted, PreflightError, RunbookError, StepError
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
    recheck: Callable[[Any], None] | None = None   # on resume: raises if what the step achieved no longer holds
    revert_hint: str = ""                           # what the operator must do if its revert never succeeds


@dataclass
class Runner:
    journal: Journal
    steps: list[Step]
    confirm: Callable[[str], bool]
    fallback_timeout: float = 60.0
    falls_back: bool = True        # False for set-up runs: a failure stops; running again resumes
    hooks: dict[str, Callable[[Any], None]] = field(default_factory=dict)
    progress: Callable[[str], None] = lambda msg: log.info(msg)
    sleep: Callable[[float], None] = time.sleep      # between a revert's attempts (injectable: tests cost nothing)
    clock: Callable[[], float] = time.monotonic
    revert_interval: float = 0.5
    current: str | None = field(default=None, init=False)   # the step whose code runs now (act, revert, recheck)

    def checkpoint(self, ctx: Any, **fields: Any) -> None:
        """Journal ``fields`` now, as progress of the step running, and apply them to ``ctx.data``:
        values a crash must not lose before the step is done. A journal that cannot be written
        raises StepError (the step fails; before the point of no return, the run falls back)."""
        if self.current is None:
            raise RuntimeError("checkpoint() outside a step")
        self._record(self.current, "progress", context=fields)
        ctx.data.update(fields)

    def past_point_of_no_return(self) -> bool:
        """A point-of-no-return step done, or started and not refused (NotPromoted) - then it may have acted."""
        for s in self.steps:
            if not s.point_of_no_return:
                continue
            if self.journal.is_done(s.name):
                return True
            events = [e for e in self.journal.events if e["step"] == s.name]
            starts = [i for i, e in enumerate(events) if e["event"] == "start"]
            if starts and not any(e["event"] == "failed" and e.get("crossed") is False for e in events[starts[-1]:]):
                return True
        return False

    def _record(self, step: str, event: str, **data: Any) -> None:
        """Journal a transition; a journal that cannot be written is remembered and raised as a StepError."""
        try:
            self.journal.record(step, event, **data)
        except OSError as exc:
            self.journal_error = f"the journal could not be written ({exc.strerror or exc})"
            raise StepError(self.journal_error, step=step) from None

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
        self.journal_error: str | None = None
        ctx.runner = self   # ctx.checkpoint() goes through the runner
        if any(e["step"] == "run" and e["event"] == "fallback_started" for e in self.journal.events):
            reason = next(e.get("reason", "") for e in self.journal.events if e["event"] == "fallback_started")
            self.progress("resuming an interrupted fallback")
            self._fall_back(ctx, reason)
        resumed = any(e["step"] != "run" for e in self.journal.events)
        if resumed and not self.past_point_of_no_return():
            self._recheck(ctx)
        for step in self.steps:
            if self.journal.is_done(step.name):
                continue
            self.current = step.name
            self._hook("before", step, ctx)
            crossed = True
            try:
                if step.check is not None and step.check(ctx):
                    self._record(step.name, "skipped", detail="already done")
                    self.progress(f"{step.title}: already done")
                    self._after(step, ctx)
                    continue
                if step.point_of_no_return and not self.journal.started(step.name):
                    if not self.confirm(f"{step.title}: this is a point of no return. Proceed?"):
                        raise PreflightError("the operator declined the point of no return (or did not answer)")
                self._record(step.name, "start")
                self.progress(step.title)
                updates = step.act(ctx) or {}
                if step.verify is not None:
                    step.verify(ctx)
            except Exception as exc:  # noqa: BLE001 - every failure is journaled, then handled below
                crossed = not isinstance(exc, (NotPromoted, PreflightError))
                reason = f"{step.name}: {redact(exc) if isinstance(exc, RunbookError) else type(exc).__name__ + ': ' + redact(exc)}"
                try:
                    self._record(step.name, "failed", detail=reason, crossed=crossed)
                except StepError:
                    pass
                if not self.falls_back:
                    raise StepError(f"{reason} (fix the cause and run the same command again to resume)",
                                    step=step.name) from exc
                if not self.past_point_of_no_return():
                    self._fall_back(ctx, reason, failed=step)
                if self.journal_error:
                    raise StepError(f"{reason} (after the point of no return; {self.journal_error}: free the "
                                    "space, then run the same command again to resume)", step=step.name) from exc
                raise StepError(f"{reason} (after the point of no return: no automatic fallback; fix the cause "
                                f"and run the same command again to resume)", step=step.name) from exc
            detail = updates.pop("detail", "") if isinstance(updates, dict) else ""
            ctx.data.update(updates)
            try:
                self._record(step.name, "done", detail=detail, context=updates)
            except StepError as exc:
                if not self.past_point_of_no_return():
                    self._fall_back(ctx, f"{step.name}: {exc}", failed=step)
                raise
            self._after(step, ctx)
        self.current = None
        self.journal.finish("completed")
        return "completed"

    def _recheck(self, ctx: Any) -> None:
        """A resumed run: what the steps done before achieved must still hold, or the run falls back."""
        for step in self.steps:
            if step.recheck is None or not self.journal.is_done(step.name):
                continue
            self.current = step.name
            try:
                step.recheck(ctx)
            except Exception as exc:  # noqa: BLE001
                reason = f"on resume, {step.name} no longer holds: {redact(exc)}"
                try:
                    self._record(step.name, "recheck_failed", detail=reason)
                except StepError:
                    pass
                self._fall_back(ctx, reason)
            self.progress(f"{step.title}: still holds")

    def _after(self, step: Step, ctx: Any) -> None:
        self._hook("after", step, ctx)
        if os.environ.get(FAULT_KILL_AFTER) == step.name:
            os.kill(os.getpid(), signal.SIGKILL)

    def _fall_back(self, ctx: Any, reason: str, failed: Step | None = None) -> None:
        """Revert, in reverse order, every step done and the one that failed half-way; then raise.

        Ends as ``fell_back`` when every revert succeeded, else ``fallback_failed`` naming what is
        still in place. Raises StepError either way (exit 1), with the journal's own trouble if any.
        """
        try:
            self._record("run", "fallback_started", reason=reason)
        except StepError:
            pass
        self.progress(f"falling back: {reason}")
        events = self.journal.events
        todo = [s for s in self.steps if s.revert is not None
                and (self.journal.is_done(s.name) or self.journal.started(s.name) or s is failed)]
        reverted = {e["step"] for e in events if e["event"] == "reverted"}
        still: list[str] = []
        for step in reversed(todo):
            if step.name in reverted:
                continue
            self.current = step.name
            deadline = self.clock() + self.fallback_timeout
            while True:
                try:
                    step.revert(ctx)
                    try:
                        self._record(step.name, "reverted")
                    except StepError:
                        pass
                    break
                except Exception as exc:  # noqa: BLE001
                    if self.clock() > deadline:
                        still.append(f"{step.name} NOT reverted ({redact(exc)})"
                                     + (f": {step.revert_hint}" if step.revert_hint else ""))
                        try:
                            self._record(step.name, "revert_failed", detail=redact(exc))
                        except StepError:
                            pass
                        self.progress(f"revert of {step.name} failed: {redact(exc)}")
                        break
                    self.sleep(self.revert_interval)
        self.current = None
        outcome = "fallback_failed" if still else "fell_back"
        full = reason + (f"; still in place: {'; '.join(still)}" if still else "")
        if self.journal_error:
            full += f"; {self.journal_error}: this fallback is not recorded - check the source and the app by hand"
        try:
            self.journal.finish(outcome, full)
        except OSError:
            pass
        prefix = "FALLBACK FAILED" if still else "fell back to the source"
        raise StepError(f"{prefix}: {full}", outcome=outcome)
