"""Runbook defaults: every timeout, threshold and path in one typed place.

Values come from ``invoke.yaml`` (section ``tern``), ``INVOKE_TERN_*`` environment
variables, or task flags, in invoke's usual order. Domain code receives a
:class:`Settings`; it never reads invoke's config itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class Settings:
    sandbox_dir: Path = Path(".sandbox")
    state_dir: Path = Path(".tern")
    pg_bindir: str | None = None

    # sandbox shape
    replicas: int = 2
    scale: int = 1
    dataset: str = "inventory"
    app_rate: float = 100.0
    app_worker_share: float = 0.25

    # bounded waits (seconds)
    connect_timeout: float = 5.0
    command_timeout: float = 120.0
    restore_timeout: float = 900.0
    catchup_timeout: float = 120.0
    stop_app_timeout: float = 30.0
    promote_timeout: float = 60.0
    repoint_timeout: float = 60.0
    smoke_timeout: float = 30.0
    poll_interval: float = 0.05

    # thresholds
    max_lag_bytes: int = 64 * 1024 * 1024
    sample_percent: float = 5.0
    # fill: complete the WAL segment with pg_logical_emit_message (tern's way);
    # archive_timeout: wait for the source to archive it on its own (the naive baseline)
    flush_mode: str = "fill"


    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "Settings":
        """Build settings from invoke's ``tern`` section, rejecting unknown keys."""
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

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied; ``None`` values keep the current value."""
        changes = {k: v for k, v in changes.items() if v is not None}
        known = {f.name: f for f in dataclasses.fields(self)}
        for key in changes:
            if key not in known:
                raise ConfigError(f"unknown setting tern.{key}")
            changes[key] = _coerce(key, known[key].type, changes[key])
        return dataclasses.replace(self, **changes)


def _coerce(key: str, type_name: Any, raw: Any) -> Any:
    t = str(type_name)
    try:
        if t == "Path":
            return Path(raw)
        if t == "int":
            if isinstance(raw, bool):
                raise ValueError
            return int(raw)
        if t == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if t == "str":
            return str(raw)
        if t == "str | None":
            return None if raw in ("", None) else str(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"setting tern.{key} must be {t}, got {raw!r}") from None
    return raw
