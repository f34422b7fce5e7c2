"""What every failover step works with: the outputs, the settings, the app, the journal, the run's state."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from contextlib import contextmanager

import psycopg

from .. import client_tls
from ..adapters import AppControl
from ..contract import Outputs, Replica
from ..journal import Journal
from ..pg import connect, url_endpoint
from ..postgres import PgHost
from ..settings import Settings
from ..status import replica_host, source_url
from ..steps import Runner
from ..errors import ConfigError, DatabaseError, RunbookError
from .state import RunState
from .fence import BYPASS_READ_ONLY as BYPASS_FENCE, TOO_MANY, SourceSessions, maintenance_connection

log = logging.getLogger(__name__)

# tern's sessions held on the source through the fence: control + the verification's (coordinator, workers)
HELD_SESSIONS = 4


@dataclass
class Context:
    outputs: Outputs
    settings: Settings
    app: AppControl
    journal: Journal
    data: RunState = field(default_factory=RunState)   # the run's typed state (a dict given is converted)
    progress: Any = None
    sessions: SourceSessions | None = None
    _hosts: dict[str, PgHost] = field(default_factory=dict)
    sample_plan: Any = None   # the gate's sample, chosen and read before the window (memory only: keys are data)
    runner: Runner | None = field(default=None, repr=False)   # the Runner running the plan (it binds itself)

    def __post_init__(self) -> None:
        if not isinstance(self.data, RunState):
            self.data = RunState.from_context(self.data or {})

    def checkpoint(self, **fields: Any) -> None:
        """Save values a crash must not lose before the step ends (journaled by the runner as the
        running step's progress, and applied to ``data``). Only inside a run."""
        if self.runner is None:
            raise RuntimeError("checkpoint() outside a run: only the runner journals")
        self.runner.checkpoint(self, **fields)

    def held(self) -> SourceSessions:
        """tern's sessions on the source's database (opened now if this process has none)."""
        if self.sessions is None:
            self.sessions = SourceSessions(self.source_url(), count=HELD_SESSIONS,
                                           timeout=self.settings.connect_timeout)
        try:
            return self.sessions.open()
        except DatabaseError as exc:
            if TOO_MANY not in str(exc) or not self.sessions.connections == []:
                raise
        # a resumed run: tern's sessions died with its process and others took their places on the
        # fenced source; end them from another database (what they wrote, the final proof catches)
        with maintenance_connection(self.source_url(), timeout=self.settings.connect_timeout,
                                    purpose="fence-recover") as conn:
            _, _, db = url_endpoint(self.source_url())
            conn.execute("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s "
                         "AND backend_type = 'client backend' AND pg_has_role(usename, 'MEMBER')", (db,))
        return self.sessions.open()

    def close(self) -> None:
        if self.sessions is not None:
            self.sessions.close()

    source_override: str | None = None   # hop 2: the EC2 leader is the source

    def source_url(self) -> str:
        return self.source_override or source_url(self.app, self.outputs)

    def source_endpoint(self) -> tuple[str, int]:
        host, port, _ = url_endpoint(self.source_url())
        return host, port

    @contextmanager
    def source(self, purpose: str) -> Iterator[psycopg.Connection]:
        with connect(self.source_url(), purpose=purpose, timeout=self.settings.connect_timeout,
                     options=BYPASS_FENCE) as conn:
            yield conn

    def replica(self, name: str) -> Replica:
        return self.outputs.replica(name)

    def pg(self, name: str) -> PgHost:
        """One host object per node for the whole run."""
        if name not in self._hosts:
            replica = self.replica(name)
            pg = replica_host(replica)
            # SQL over TLS with tern's certificate where the host has no socket tern reaches (SSM), the
            # replica's own certificate verified (read at restore, or now through the host when missing)
            pg.client, pg.tcp_host = client_tls.existing(self.settings.state_dir), replica.host
            self.server_ca(name, pg.host)   # here, before any window: one host command when missing
            self._hosts[name] = pg
        return self._hosts[name]

    def server_ca(self, name: str, host: Any = None) -> Path | None:
        """The replica's own certificate as tern keeps it (read through its command channel when tern has
        not yet); None when it cannot be read now (then nothing connects to it over TLS as tern's superuser)."""
        from ..adapters import host_for
        from ..restore import pin_server_certificate

        state_dir = self.settings.state_dir
        if state_dir is None:
            return None
        path = client_tls.server_ca(state_dir, name)
        if path is not None:
            return path
        try:
            return pin_server_certificate(self.replica(name), host or host_for(self.replica(name)), state_dir,
                                          timeout=10.0)
        except RunbookError as exc:
            log.warning("%s: cannot read its TLS certificate to verify it (%s)", name, exc)
            return None

    def replica_url(self, name: str) -> str:
        """The app's own URL (role, password, database) pointed at a replica: what the app is given (it
        cannot verify the replica's self-signed certificate: ``sslmode=require``)."""
        from ..restore import replica_url

        return replica_url(self.source_url(), self.replica(name))   # over TLS: replicas refuse plain TCP

    def tern_replica_url(self, name: str) -> str:
        """The same, for tern's own sessions: the replica's certificate verified against the one tern read
        from it (``sslmode=verify-ca``); refused when tern cannot read it."""
        ca = self.server_ca(name)
        if ca is None:
            raise ConfigError(f"{name}: tern cannot verify its TLS certificate (run restore again: it reads "
                              "each replica's certificate)")
        return client_tls.verified_url(self.replica_url(name), ca)

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(message)
