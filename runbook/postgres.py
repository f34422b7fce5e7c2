"""Control of a PostgreSQL server on a host, through :class:`~runbook.adapters.HostCommands`.

The same code drives a sandbox cluster (local subprocess) and an EC2 replica (SSM):
``pg_ctl`` for the process, ``psql`` over the host's local socket for SQL that
needs the database's superuser (promote, ALTER SYSTEM, slots). Query results come
back as JSON so no output parsing depends on psql's formatting.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from psycopg import sql as _sql

from .adapters import HostCommands
from .errors import CommandError, DatabaseError, TimeoutExpired

MARKER = "tern.json"  # beside the data directory: what tern knows about this node


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

    def psql(self, statement: str, *, database: str | None = None, timeout: float = 30) -> str:
        """Run SQL as the database superuser over the host's socket; the SQL goes through stdin,
        never the command line (which other local users could read)."""
        argv = [self._bin("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", self.socket_dir, "-p", str(self.port), "-U", self._user(),
                "-d", database or self.database, "-f", "-"]
        res = self.host.run(argv, timeout=timeout, check=False, input=statement)
        if res.returncode != 0:
            raise DatabaseError(f"{self.host.name}: SQL failed: {res.stderr.strip()[-400:]}")
        return res.stdout

    def query(self, select: str, *, database: str | None = None, timeout: float = 30) -> list[dict[str, Any]]:
        out = self.psql(f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({select}) t", database=database,
                        timeout=timeout)
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
