"""The run journal: every step transition on disk, so a killed run resumes where it stopped.

A run lives in ``<state_dir>/runs/<run_id>/journal.jsonl``; one JSON line per event,
fsynced before the step acts on it. ``<state_dir>/runs/current-<kind>`` names the
unfinished run of a kind: running the same command again resumes it. The journal
never holds a secret (values are redacted before they are written).
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PreflightError
from .redact import redact_data


def _append_line(fd: int, data: bytes) -> None:
    """Append one whole line, or nothing (OSError).

    A full disk can cut a write short instead of failing it (the file grows into the free end of its last
    block): the part written is taken back and ENOSPC raised, so the file never holds a record the runner
    believes written but a reader skips. A line a crash left unfinished is ended first, so the next record
    is not glued onto it."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        data = b"\n" + data
    written = os.write(fd, data)
    if written != len(data):
        os.ftruncate(fd, size)
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a journal record was cut short)")


class RunLock:
    """One runbook process per kind at a time: an exclusive, non-blocking lock on a file.

    The kernel releases it when the holder dies, so a killed run never leaves a stale lock.
    """

    def __init__(self, state_dir: Path, kind: str) -> None:
        self.path = Path(state_dir) / "runs" / f"{kind}.lock"
        self.kind = kind
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise PreflightError(f"another {self.kind} is running (pid {holder}); wait for it or stop it first") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class StepRecord:
    name: str
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None   # done | skipped | failed | reverted | revert_failed
    detail: str = ""


@dataclass
class Journal:
    path: Path
    run_id: str
    kind: str
    events: list[dict[str, Any]] = field(default_factory=list)

    # -- creation / loading -----------------------------------------------------
    @classmethod
    def current(cls, state_dir: Path, kind: str) -> "Journal | None":
        pointer = Path(state_dir) / "runs" / f"current-{kind}"
        if not pointer.exists():
            return None
        run_id = pointer.read_text().strip()
        return cls.load(state_dir, run_id)

    @classmethod
    def load(cls, state_dir: Path, run_id: str) -> "Journal":
        path = Path(state_dir) / "runs" / run_id / "journal.jsonl"
        events = []
        if path.exists():
            for raw in path.read_text().splitlines():
                try:
                    events.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue  # a line torn by a crash: the event never completed
        kind = events[0]["kind"] if events else run_id.rsplit("-", 2)[0]
        return cls(path, run_id, kind, events)

    @classmethod
    def create(cls, state_dir: Path, kind: str, **context: Any) -> "Journal":
        base = f"{kind}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        (Path(state_dir) / "runs").mkdir(parents=True, exist_ok=True)
        # a second run of the same kind in the same second and process gets its own directory (never the
        # first one's journal, whose finished steps it would skip)
        for n in range(1, 1000):
            run_id = base if n == 1 else f"{base}.{n}"
            run_dir = Path(state_dir) / "runs" / run_id
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        j = cls(run_dir / "journal.jsonl", run_id, kind)
        j.record("run", "created", kind=kind, context=context)
        pointer = Path(state_dir) / "runs" / f"current-{kind}"
        pointer.write_text(run_id)
        return j

    @staticmethod
    def latest(state_dir: Path, kind: str | None = None) -> str | None:
        runs = Path(state_dir) / "runs"
        if not runs.exists():
            return None
        ids = [p.name for p in runs.iterdir() if p.is_dir() and (kind is None or p.name.startswith(kind + "-"))]
        ids.sort(key=lambda i: (runs / i / "journal.jsonl").stat().st_mtime if (runs / i / "journal.jsonl").exists() else 0)
        return ids[-1] if ids else None

    # -- writing ----------------------------------------------------------------
    def record(self, step: str, event: str, **data: Any) -> dict[str, Any]:
        entry = {"ts": time.time(), "step": step, "event": event}
        entry.update(data)
        line = json.dumps(redact_data(entry), sort_keys=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _append_line(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.events.append(json.loads(line))
        return entry

    def finish(self, outcome: str, reason: str = "") -> None:
        self.record("run", "finished", outcome=outcome, reason=reason)
        pointer = self.path.parents[1] / f"current-{self.kind}"
        if pointer.exists() and pointer.read_text().strip() == self.run_id:
            pointer.unlink()

    # -- reading ----------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.path.parent

    def context(self) -> dict[str, Any]:
        """The run's accumulated context: every ``context`` update, in order."""
        ctx: dict[str, Any] = {}
        for e in self.events:
            ctx.update(e.get("context") or {})
        return ctx

    def is_done(self, step: str) -> bool:
        return any(e["step"] == step and e["event"] in ("done", "skipped") for e in self.events)

    def started(self, step: str) -> bool:
        return any(e["step"] == step and e["event"] == "start" for e in self.events)

    def outcome(self) -> tuple[str, str] | None:
        for e in reversed(self.events):
            if e["step"] == "run" and e["event"] == "finished":
                return e.get("outcome", ""), e.get("reason", "")
        return None

    def steps(self) -> list[StepRecord]:
        records: dict[str, StepRecord] = {}
        order: list[str] = []
        for e in self.events:
            name = e["step"]
            if name == "run":
                continue
            if name not in records:
                records[name] = StepRecord(name)
                order.append(name)
            r = records[name]
            ev = e["event"]
            if ev == "start" and r.started_at is None:
                r.started_at = e["ts"]
            elif ev in ("done", "skipped", "failed", "reverted", "revert_failed"):
                r.ended_at = e["ts"]
                r.outcome = ev
                r.detail = e.get("detail", "")
                if r.started_at is None:
                    r.started_at = e["ts"]
        return [records[n] for n in order]
