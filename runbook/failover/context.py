"""What every failover step works with: the outputs, the settings, the app, the journal's context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator
from contextlib import contextmanager

import psycopg

from ..adapters import AppControl
from ..contract import Outputs, Replica
from ..journal import Journal
from ..pg import connect, url_endpoint, with_endpoint
from ..postgres import PgHost
from ..settings import Settings
from ..status import replica_host, source_url

# the runbook's own sessions on the source bypass the fence it puts on the app role
BYPASS_FENCE = "-c default_transaction_read_only=off"


@dataclass
class Context:
    outputs: Outputs
    settings: Settings
    app: AppControl
    journal: Journal
    data: dict[str, Any] = field(default_factory=dict)
    progress: Any = None

    def source_url(self) -> str:
        return source_url(self.app, self.outputs)

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
        return replica_host(self.replica(name))

    def replica_url(self, name: str) -> str:
        """The app's own URL (role, password, database) pointed at a replica."""
        r = self.replica(name)
        return with_endpoint(self.source_url(), r.host, r.port)

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(message)
