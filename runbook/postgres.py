"""Control of a PostgreSQL server on a host, through :class:`~runbook.adapters.HostCommands`.

The same code drives a sandbox cluster (local subprocess) and an EC2 replica (SSM):
``pg_ctl`` for the process, ``psql`` over the host's local socket for SQL that
needs the database's superuser (promote, ALTER SYSTEM, slots). Query results come
back as JSON so no output parsing depends on psql's formatting.

Where tern has its client certificate (:mod:`runbook.client_tls`) and the host has no socket tern can
reach (SSM: a second a command), the SQL goes instead through the local ``psql`` over TLS, as the
superuser with that certificate - same statements, same semantics (one statement at a time, stop at
the first error) - and through the host when TCP cannot reach the server.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from psycopg import sql as _sql

from .adapters import HostCommands
from .errors import CommandError, DatabaseError, TimeoutExpired

log = logging.getLogger(__name__)

MARKER = "tern.json"  # beside the data directory: what tern knows about this node
TLS_RETRY_SECONDS = 30.0   # after SQL over TLS could not connect: through the host for this long


@functools.lru_cache(maxsize=1)
def _local_psql() -> str | None:
    """This machine's psql (for SQL over TLS), or None."""
    from .pg import bindir

    try:
        found = bindir() / "psql"
        return str(found) if found.exists() else shutil.which("psql")
    except Exception:  # noqa: BLE001 - no server binaries here: any psql on PATH
        return shutil.which("psql")


def literal(value: Any) -> str:
    """A SQL literal for psql command lines (values, never identifiers)."""
    return _sql.Literal(value).as_string(None)


@dataclass
class PgHost:
    host: HostCommands
    bin_dir: str
    data_dir: str
    socket_dir: str
    port: int
    database: str = "postgres"
    superuser: str | None = None
    log_file: str | None = None
    client: Any = None             # runbook.client_tls.ClientCert: SQL over TLS as the superuser
    tcp_host: str | None = None    # where the server listens for TCP (with ``client``)
    _tls_down_until: float = 0.0

    @property
    def marker_path(self) -> str:
        return self.data_dir.rstrip("/") + "." + MARKER

    def _bin(self, name: str) -> str:
        return f"{self.bin_dir.rstrip('/')}/{name}"

    # -- process ------------------------------------------------------------
    def has_data(self) -> bool:
        return self.host.exists(f"{self.data_dir}/PG_VERSION")

    def is_running(self) -> bool:
        res = self.host.run([self._bin("pg_ctl"), "status", "-D", self.data_dir], timeout=30, check=False)
        return res.returncode == 0

    def start(self, *, timeout: float = 60) -> None:
        if self.is_running():
            return
        argv = [self._bin("pg_ctl"), "start", "-D", self.data_dir, "-w", "-t", str(int(timeout)),
                "-o", f"-p {self.port} -k {self.socket_dir}",
                # always a log file: without one the server would hold our stdout pipe open
                "-l", self.log_file or self.data_dir.rstrip("/") + ".log"]
        self.host.run(argv, timeout=timeout + 10)

    def stop(self, *, mode: str = "fast", timeout: float = 60) -> None:
        if not self.has_data() or not self.is_running():
            return
        self.host.run([self._bin("pg_ctl"), "stop", "-D", self.data_dir, "-m", mode, "-w", "-t", str(int(timeout))],
                      timeout=timeout + 10)

    def kill(self) -> None:
        """Crash the server (SIGKILL the postmaster), as a host failure would."""
        self.host.run(["sh", "-c", 'pid=$(head -1 "$1/postmaster.pid" 2>/dev/null) && kill -9 "$pid"', "sh",
                       self.data_dir], timeout=10, check=False)

    # -- SQL over the local socket -------------------------------------------
    def _user(self) -> str:
        if self.superuser is None:
            marker = self.read_marker()
            self.superuser = marker.get("superuser") or "postgres"
        return self.superuser

    @property
    def over_tls(self) -> bool:
        """SQL goes over TLS with tern's certificate (not through the host's commands); only to a server
        whose certificate tern can verify (it read it at restore: :func:`runbook.client_tls.pin_server`)."""
        return (self.client is not None and self.tcp_host is not None and not self.host.local_socket
                and self.client.server_ca(self.host.name) is not None)

    def sql_url(self, database: str | None = None) -> str | None:
        """A libpq URL for the superuser over TLS with tern's certificate, where there is one; the
        server's certificate verified."""
        if not self.over_tls:
            return None
        return self.client.conninfo(self.tcp_host, self.port, database or self.database, "tern:superuser",
                                    server=self.host.name)

    def psql(self, statement: str, *, database: str | None = None, timeout: float = 30) -> str:
        """Run SQL as the database superuser over the host's socket; the SQL goes through stdin,
        never the command line (which other local users could read)."""
        if self.over_tls:
            out = self._psql_tls(statement, database, timeout)
            if out is not None:
                return out
        argv = [self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", self.socket_dir, "-p", str(self.port), "-U", self._user(),
                "-d", database or self.database, "-f", "-"]
        res = self.host.run(argv, timeout=timeout, check=False, input=statement)
        if res.returncode != 0:
            raise DatabaseError(f"{self.host.name}: SQL failed: {res.stderr.strip()[-400:]}")
        return res.stdout

    def _psql_tls(self, statement: str, database: str | None, timeout: float) -> str | None:
        """The local psql over TLS; None when it could not connect (the caller goes through the host
        instead, and so does every call for the next ``TLS_RETRY_SECONDS``). A connection lost after
        the first statement ran is an error, never retried elsewhere (the statements may have acted)."""
        psql = _local_psql()
        if psql is None or time.monotonic() < self._tls_down_until:
            return None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_", "LANG"))}
        env.update(PGCONNECT_TIMEOUT="3", LC_ALL="C")   # psql's messages in English: the fallback reads them
        try:
            res = subprocess.run([psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.sql_url(database),
                                  "-f", "-"], input=statement, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise TimeoutExpired(f"{self.host.name}: SQL over TLS did not finish within {timeout:.0f}s") from None
        except OSError:
            return None
        if res.returncode == 2 and res.stderr.lstrip().startswith("psql: error: connection to server"):
            if "certificate" in res.stderr:   # not the server tern read at restore: say so, never go on over TLS
                log.warning("%s: its TLS certificate did not verify; SQL goes through the host's commands "
                            "(%s)", self.host.name, res.stderr.strip().splitlines()[-1][-200:])
            self._tls_down_until = time.monotonic() + TLS_RETRY_SECONDS
            return None
        if res.returncode != 0:
            raise DatabaseError(f"{self.host.name}: SQL failed: {res.stderr.strip()[-400:]}")
        return res.stdout

    def query(self, select: str, *, database: str | None = None, timeout: float = 30) -> list[dict[str, Any]]:
        out = self.psql(f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({select}) t", database=database,
                        timeout=timeout)
        return json.loads(out.strip() or "[]")

    def query_private(self, select: str, *, database: str | None = None, timeout: float = 30) -> list[dict[str, Any]]:
        """As :meth:`query`, for a result that must not travel through a command channel that keeps what it
        carries (SSM keeps every command's output): over the server's socket where tern reaches it (the
        sandbox), else over TLS with tern's certificate only - never through the host. DatabaseError when
        neither is possible."""
        if self.host.local_socket:
            return self.query(select, database=database, timeout=timeout)
        wrapped = f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({select}) t"
        out = self._psql_tls(wrapped, database, timeout) if self.over_tls else None
        if out is None:
            raise DatabaseError(f"{self.host.name}: cannot reach the server over TLS with tern's client certificate "
                                "(restore makes it), and this result may not go through the host's command channel, "
                                "which keeps what it carries")
        return json.loads(out.strip() or "[]")

    def query_one(self, select: str, **kw: Any) -> dict[str, Any]:
        rows = self.query(select, **kw)
        if len(rows) != 1:
            raise DatabaseError(f"{self.host.name}: expected one row, got {len(rows)}")
        return rows[0]

    def wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            res = self.host.run([self._bin("pg_isready"), "-h", self.socket_dir, "-p", str(self.port)],
                                timeout=10, check=False)
            if res.returncode == 0:
                return
            last = res.stdout.strip()
            time.sleep(0.1)
        raise TimeoutExpired(f"{self.host.name}: not accepting connections after {timeout:.0f}s ({last})")

    # -- marker ----------------------------------------------------------------
    def read_marker(self) -> dict[str, Any]:
        text = self.host.read_file(self.marker_path)
        if not text:
            return {}
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise CommandError(f"{self.host.name}: {self.marker_path} is corrupt") from None

    def write_marker(self, data: dict[str, Any]) -> None:
        self.host.write_file(self.marker_path, json.dumps(data, indent=1, sort_keys=True))
