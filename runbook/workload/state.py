"""The local app's control state: config vars, maintenance mode, formation, load settings, boot delay.

One JSON file (mode 0600: it holds DATABASE_URL with its password), written
atomically by the controller (:class:`runbook.adapters.local_app.LocalApp`) and
read by every process of the app, which reloads it when its mtime changes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"


@dataclass
class AppState:
    config_vars: dict[str, str] = field(default_factory=dict)
    maintenance: bool = False
    formation: dict[str, int] = field(default_factory=lambda: {"web": 1, "worker": 1})
    # load: total commits/s across the app, the worker's share, an optional burst
    rate: float = 100.0
    worker_share: float = 0.25
    burst_factor: float = 1.0
    burst_until: float = 0.0
    # how long a dyno takes to boot: on process start, and on the restart every config-var change
    # causes (Heroku restarts every dyno then); absent from older state files: 0, no delay
    boot_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AppState":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def state_path(state_dir: Path) -> Path:
    return Path(state_dir) / STATE_FILE


def read_state(state_dir: Path) -> AppState:
    return AppState.from_json(json.loads(state_path(state_dir).read_text()))


def write_state(state_dir: Path, state: AppState) -> None:
    path = state_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state.to_json(), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class StateWatcher:
    """Re-reads the state file when it changes; cheap enough to call every iteration."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_path(state_dir)
        self.state_dir = Path(state_dir)
        self._stamp: tuple[int, int] | None = None
        self._state: AppState | None = None

    def get(self) -> AppState:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp or self._state is None:
            try:
                self._state = read_state(self.state_dir)
                self._stamp = stamp
            except (FileNotFoundError, json.JSONDecodeError):
                if self._state is None:
                    self._state = AppState(formation={})
        return self._state
