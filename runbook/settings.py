"""Runbook defaults: every timeout, threshold and path in one typed place.

Values come from ``invoke.yaml`` (section ``tern``), ``INVOKE_TERN_<KEY>`` environment
variables, or task flags, in invoke's usual order; the defaults are the fields below
(``runbook.tasks.build_namespace`` declares every one of them to invoke, so that each
``INVOKE_TERN_<KEY>`` reaches it). Domain code receives a :class:`Settings`; it never
reads invoke's config itself.

Paths are absolute: a relative value is taken relative to :data:`PROJECT_DIR` (the
directory holding ``tasks.py`` and ``invoke.yaml``), never to wherever invoke was started.
Run state (journals, reports) lives per stack in :meth:`Settings.stack_state_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parents[1]

FLUSH_MODES = ("fill", "archive_timeout")
SWITCH_MODES = ("auto", "pooler", "url")


@dataclass(frozen=True)
class Settings:
    sandbox_dir: Path = PROJECT_DIR / ".sandbox"
    state_dir: Path = PROJECT_DIR / ".tern"
    pg_bindir: str | None = None

    # sandbox shape
    replicas: int = 2
    scale: int = 1
    dataset: str = "inventory"
    app_rate: float = 100.0

    # bounded waits (seconds)
    connect_timeout: float = 5.0
    restore_timeout: float = 900.0
    catchup_timeout: float = 120.0
    stop_app_timeout: float = 30.0
    promote_timeout: float = 60.0
    # sized for SSM: each look at a replica is a command that takes seconds to come back
    repoint_timeout: float = 120.0
    smoke_timeout: float = 30.0
    poll_interval: float = 0.05
    confirm_timeout: float = 600.0       # the point-of-no-return prompt: no answer in time = no
    resume_max_age: float = 86400.0      # an unfinished run older than this is not resumed (seconds)

    # thresholds
    max_lag_bytes: int = 64 * 1024 * 1024
    sample_percent: float = 5.0
    # inside a failover's window the sample is bounded, whatever the database's size
    gate_sample_rows: int = 500          # rows per table at most (plus the 100 newest): a sanity check; the LSN proofs and the full verification are the guarantees
    gate_sample_timeout: float = 10.0    # seconds per statement at most
    # hop 2: Aurora's apply must drain a backlog at least this many times faster than the EC2 leader
    # writes (apply bytes/s over leader WAL bytes/s), measured over apply_sample_seconds; caught up at
    # both ends of the sample is enough (runbook/replication/headroom.py states the rule)
    min_apply_headroom: float = 1.5
    apply_sample_seconds: float = 2.0
    # hop 1, after the switch: "witness" compares every row with a replica held at the final LSN (that
    # replica is then rebuilt from the new leader); hop 2, before the freeze: with an EC2 standby of the
    # leader held where Aurora stopped (no standby: the failover refuses). "skip" leaves it to `invoke verify`
    full_verification: str = "witness"
    # fill: complete the WAL segment with pg_logical_emit_message (tern's way);
    # archive_timeout: wait for the source to archive it on its own (the naive baseline)
    flush_mode: str = "fill"
    # the most WAL the new leader keeps for a replica's slot (PostgreSQL size; -1: unbounded). A
    # replica that falls further behind loses its slot and must be rebuilt, instead of filling the
    # leader's disk. It must fit in the leader's free WAL space on top of wal_keep_size (2GB); 8GB
    # covers a replica down or rebuilding for an hour at ~2 MB/s of WAL.
    max_slot_wal_keep_size: str = "8GB"
    # how the app moves to the new database: "pooler" (PgBouncer PAUSE, repoint, RESUME: no config-var
    # change, no dyno restart), "url" (DATABASE_URL swap: every dyno restarts), "auto" (pooler when the
    # outputs have one). pause_timeout bounds PAUSE: a transaction still running then makes it fall back
    switch_mode: str = "auto"
    pause_timeout: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if str(f.type) == "Path" and not Path(value).is_absolute():
                object.__setattr__(self, f.name, absolute(value))
        for name, (ok, what) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise ConfigError(f"setting tern.{name} must be {what}, got {value!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "Settings":
        """Build settings from invoke's ``tern`` section, rejecting unknown keys; ``None`` keeps the default."""
        values = dict(values or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise ConfigError(f"unknown setting tern.{key} (known: {', '.join(sorted(known))})")
            if raw is None:
                continue
            kwargs[key] = _coerce(key, known[key].type, raw)
        return cls(**kwargs)

    @classmethod
    def invoke_defaults(cls) -> dict[str, Any]:
        """Every key declared to invoke, as ``None`` (the default above applies).

        Invoke maps ``INVOKE_TERN_<KEY>`` only onto keys it already knows, and casts the
        variable to the type of the value it finds: ``None`` lets the raw string through,
        so that :func:`_coerce` checks it and a bad value is a :class:`ConfigError`.
        """
        return {f.name: None for f in dataclasses.fields(cls)}

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied; ``None`` values keep the current value."""
        changes = {k: v for k, v in changes.items() if v is not None}
        known = {f.name: f for f in dataclasses.fields(self)}
        for key in changes:
            if key not in known:
                raise ConfigError(f"unknown setting tern.{key}")
            changes[key] = _coerce(key, known[key].type, changes[key])
        return dataclasses.replace(self, **changes)

    def stack_state_dir(self, stack: str | None) -> Path:
        """Where the runs of ``stack`` live: ``<state_dir>/<stack key>`` (journals in its ``runs/``)."""
        return self.state_dir / stack_key(stack)


def stack_key(stack: str | None) -> str:
    """A directory name for a ``--stack`` value: ``local`` (the sandbox), the Pulumi stack's name, or,
    for an outputs ``.json`` file, its name and a hash of its absolute path (two files never share runs)."""
    stack = stack or "local"
    if stack == "local":
        return "local"
    if stack.endswith(".json") or "/" in stack:
        path = Path(stack).expanduser().absolute()
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
        return f"{_safe(path.stem) or 'outputs'}-{digest}"
    return _safe(stack) or "stack"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")


def absolute(path: str | Path) -> Path:
    """``path`` made absolute against :data:`PROJECT_DIR` (``~`` expanded)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else PROJECT_DIR / p


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_POSITIVE = (lambda v: _finite(v) and v > 0, "a positive number")
_RULES: dict[str, tuple[Any, str]] = {
    "replicas": (lambda v: v >= 1, "at least 1"),
    "scale": (lambda v: v >= 1, "at least 1"),
    "dataset": (lambda v: bool(v), "a dataset name"),
    "app_rate": _POSITIVE,
    "connect_timeout": _POSITIVE,
    "restore_timeout": _POSITIVE,
    "catchup_timeout": _POSITIVE,
    "stop_app_timeout": _POSITIVE,
    "promote_timeout": _POSITIVE,
    "repoint_timeout": _POSITIVE,
    "smoke_timeout": _POSITIVE,
    "poll_interval": _POSITIVE,
    "sample_percent": (lambda v: _finite(v) and 0 < v <= 100, "a percentage in (0, 100]"),
    "confirm_timeout": _POSITIVE,
    "resume_max_age": _POSITIVE,
    "gate_sample_rows": (lambda v: v >= 1, "at least 1"),
    "gate_sample_timeout": _POSITIVE,
    "min_apply_headroom": (lambda v: _finite(v) and v >= 1, "a number of at least 1 (apply at least as fast as writes)"),
    "apply_sample_seconds": (lambda v: _finite(v) and 0.2 <= v <= 60, "a number of seconds in [0.2, 60]"),
    "full_verification": (lambda v: v in ("witness", "skip"), "witness or skip"),
    "flush_mode": (lambda v: v in FLUSH_MODES, "one of " + ", ".join(FLUSH_MODES)),
    "max_slot_wal_keep_size": (lambda v: re.fullmatch(r"-1|\d+\s*(kB|MB|GB|TB)?", str(v)) is not None,
                               "a PostgreSQL size such as 8GB (or -1)"),
    "switch_mode": (lambda v: v in SWITCH_MODES, "one of " + ", ".join(SWITCH_MODES)),
    "pause_timeout": _POSITIVE,
}


def _coerce(key: str, type_name: Any, raw: Any) -> Any:
    t = str(type_name)
    try:
        if t == "Path":
            if str(raw) == "":
                raise ValueError
            return absolute(raw)
        if t == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if t == "float":
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
            return value
        if t == "str":
            return str(raw)
        if t == "str | None":
            return None if raw in ("", None) else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting tern.{key} must be {t}, got {raw!r}") from None
    return raw
