"""AppControl for the sandbox's local app (:mod:`runbook.workload`), with Heroku's semantics."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError, TimeoutExpired
from ..workload import ledger
from ..workload.state import AppState, read_state, write_state
from . import AppControl

PROCESS_TYPES = ("web", "worker")


class LocalApp(AppControl):
    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.dyno_dir = self.state_dir / "dynos"

    # -- state ------------------------------------------------------------
    def _state(self) -> AppState:
        try:
            return read_state(self.state_dir)
        except FileNotFoundError:
            raise ConfigError(f"the local app has no state in {self.state_dir}: is the sandbox up?") from None

    def _update(self, **changes) -> AppState:
        state = self._state()
        for k, v in changes.items():
            setattr(state, k, v)
        write_state(self.state_dir, state)
        return state

    def config_var(self, name: str) -> str | None:
        return self._state().config_vars.get(name)

    def set_config_vars(self, changes: Mapping[str, str | None]) -> None:
        state = self._state()
        for k, v in changes.items():
            if v is None:
                state.config_vars.pop(k, None)
            else:
                state.config_vars[k] = v
        write_state(self.state_dir, state)

    def maintenance(self) -> bool:
        return self._state().maintenance

    def set_maintenance(self, on: bool) -> None:
        self._update(maintenance=bool(on))

    def formation(self) -> dict[str, int]:
        return dict(self._state().formation)

    def set_load(self, *, rate: float | None = None, burst_factor: float | None = None,
                 burst_seconds: float | None = None) -> None:
        """Sandbox only: the app's write rate, and a burst of ``burst_factor`` x for ``burst_seconds``."""
        changes = {}
        if rate is not None:
            if rate <= 0:
                raise ConfigError(f"rate must be positive, got {rate}")
            changes["rate"] = float(rate)
        if burst_factor is not None:
            changes["burst_factor"] = float(burst_factor)
            changes["burst_until"] = time.time() + float(burst_seconds or 0)
        self._update(**changes)

    def boot_seconds(self) -> float:
        """Sandbox only: how long a dyno takes to boot (0.0 when the state predates the setting)."""
        return float(self._state().boot_seconds)

    def set_boot_seconds(self, seconds: float) -> None:
        """Sandbox only: how long each dyno waits before its first connection, on process start and
        on the restart that every config-var change causes (as a real app boots on Heroku).
        Takes effect at the next boot; changing it restarts nothing (it is not a config var)."""
        s = float(seconds)
        if not math.isfinite(s) or s < 0:
            raise ConfigError(f"boot_seconds must be a finite number >= 0, got {seconds!r}")
        self._update(boot_seconds=s)

    # -- processes --------------------------------------------------------
    def _pidfile(self, dyno: str) -> Path:
        return self.dyno_dir / f"{dyno}.pid"

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            return False
        if b"runbook.workload.dyno" not in cmd:
            return False
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split(") ")[1][0] != "Z"
        except OSError:
            return False

    def pids(self) -> dict[str, int]:
        """Running dynos: name -> pid."""
        found: dict[str, int] = {}
        if not self.dyno_dir.exists():
            return found
        for pidfile in self.dyno_dir.glob("*.pid"):
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            if self._alive(pid):
                found[pidfile.stem] = pid
        return found

    def running(self) -> dict[str, int]:
        counts = {t: 0 for t in PROCESS_TYPES}
        for name in self.pids():
            t = name.split(".")[0]
            counts[t] = counts.get(t, 0) + 1
        return counts

    def spawn(self, dyno: str) -> int:
        """Start the process ``dyno`` (``web.1``); returns its pid. The Heroku stand-in starts dynos this way."""
        kind, index = dyno.split(".")
        self.dyno_dir.mkdir(parents=True, exist_ok=True)
        log_dir = self.state_dir / "logs"
        log_dir.mkdir(exist_ok=True)
        with open(log_dir / f"{dyno}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runbook.workload.dyno", str(self.state_dir), kind, index],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                cwd=str(Path(__file__).resolve().parents[2]),
            )
        self._pidfile(dyno).write_text(str(proc.pid))
        return proc.pid

    def scale(self, quantities: Mapping[str, int], *, timeout: float) -> dict[str, int]:
        for t, n in quantities.items():
            if t not in PROCESS_TYPES:
                raise ConfigError(f"unknown process type {t!r}; known: {', '.join(PROCESS_TYPES)}")
            if n < 0:
                raise ConfigError(f"process type {t} cannot be scaled to {n}")
        state = self._state()
        previous = {t: state.formation.get(t, 0) for t in quantities}
        state.formation.update({t: int(n) for t, n in quantities.items()})
        write_state(self.state_dir, state)
        running = self.pids()
        for t in PROCESS_TYPES:
            for i in range(1, state.formation.get(t, 0) + 1):
                if f"{t}.{i}" not in running:
                    self.spawn(f"{t}.{i}")
        self._wait_formation(state.formation, timeout)
        return previous

    def _wait_formation(self, formation: Mapping[str, int], timeout: float) -> None:
        """Until exactly the formation runs: extra processes gone, wanted ones up (bounded)."""
        deadline = time.monotonic() + timeout
        termed = False
        while True:
            pids = self.pids()
            extra = {n: p for n, p in pids.items() if int(n.split(".")[1]) > formation.get(n.split(".")[0], 0)}
            missing = [f"{t}.{i}" for t in PROCESS_TYPES for i in range(1, formation.get(t, 0) + 1)
                       if f"{t}.{i}" not in pids]
            if not extra and not missing:
                return
            if not extra:
                if time.monotonic() > deadline:
                    raise TimeoutExpired(f"app processes did not start: {', '.join(missing)}")
                time.sleep(0.02)
                continue
            if time.monotonic() > deadline:
                if termed:
                    for pid in extra.values():
                        os.kill(pid, signal.SIGKILL)
                    time.sleep(0.2)
                    if not any(self._alive(p) for p in extra.values()):
                        return
                    raise TimeoutExpired(f"app processes did not stop: {', '.join(sorted(extra))}")
                # Heroku: SIGTERM, then SIGKILL after a grace period
                for pid in extra.values():
                    os.kill(pid, signal.SIGTERM)
                termed = True
                deadline = time.monotonic() + 5
            time.sleep(0.02)

    def stop_all(self, timeout: float = 10.0) -> None:
        """Sandbox only: stop every process (formation is kept as it was)."""
        formation = self.formation()
        self.scale({t: 0 for t in PROCESS_TYPES}, timeout=timeout)
        self._update(formation=formation)

    def kill(self, dyno: str) -> None:
        """Sandbox only: SIGKILL one process, as a crash would."""
        pid = self.pids().get(dyno)
        if pid:
            os.kill(pid, signal.SIGKILL)

    def smoke_test(self, host: str, port: int, *, since: float, timeout: float) -> str:
        """A web write acknowledged through ``host:port`` after ``since``, then read back there."""
        import psycopg

        endpoint = f"{host}:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            acks = [e for e in ledger.read(self.state_dir)
                    if e.ev == "ack" and e.ts >= since and e.endpoint == endpoint and e.dyno.startswith("web")]
            if acks:
                url = self.config_var("DATABASE_URL")
                with psycopg.connect(url, autocommit=True, application_name="tern:smoke-test",
                                     connect_timeout=5) as conn:
                    row = conn.execute("SELECT status FROM orders WHERE order_ref = %s", (acks[0].key,)).fetchone()
                if row is None:
                    raise TimeoutExpired(f"smoke test: order {acks[0].key} acknowledged but not readable at {endpoint}")
                return f"order {acks[0].key} written by {acks[0].dyno} and read back from {endpoint}"
            time.sleep(0.05)
        raise TimeoutExpired(f"smoke test: no write acknowledged through {endpoint} within {timeout:.0f}s")
