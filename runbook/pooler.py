"""PgBouncer in front of the leader: the app's one endpoint across both hops (issue #12).

On Heroku a change of ``DATABASE_URL`` restarts every dyno, and a real app takes seconds to tens of
seconds to boot: downtime the database switch itself does not need. With a pooler the app's URL names
PgBouncer once (before the window, :func:`runbook.failover.app_steps.pooler_in`); each switch after
that is, on every pooler node:

1. ``PAUSE <db>`` - PgBouncer waits for every server connection to be released (transaction pooling:
   the transaction in flight ends), closes them, and holds every new query. Bounded
   (:meth:`Admin.pause`): a transaction still open after ``timeout`` is named and the pause is undone
   (``RESUME``), so that no client stays held and the failover falls back.
2. the failover's fence, catch-up, checks and promotion, while clients wait;
3. rewrite the node's ``databases_file`` (``%include``d by pgbouncer.ini) to the new target, ``RELOAD``;
4. ``RESUME <db>``: the held queries run on the new target. No error reaches a client, only latency.

The fence still stands behind the pooler: a client that connects to the old database directly is
refused there as before.

The admin console is PgBouncer's virtual database ``pgbouncer``; it speaks only the simple query
protocol (psycopg's ``ClientCursor``). Its password is a credential reference, resolved at use.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from .adapters import host_for
from .contract import Pooler, PoolerNode
from .errors import DatabaseError, RunbookError, StepError
from .pg import url_endpoint, with_endpoint
from .redact import redact
from .secrets import resolve

ADMIN_DB = "pgbouncer"


class PauseTimeout(StepError):
    """A transaction did not end within the pause's bound: the pause was undone (RESUME)."""


@dataclass(frozen=True)
class Target:
    """Where a pooler sends its clients' queries."""

    host: str
    port: int
    dbname: str

    def line(self, alias: str) -> str:
        # no user or password: each client's own credentials pass through (auth_file)
        return f"{alias} = host={self.host} port={int(self.port)} dbname={self.dbname}\n"

    @classmethod
    def of_url(cls, url: str) -> "Target":
        host, port, db = url_endpoint(url)
        return cls(host, int(port), db)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.dbname}"


def databases_text(alias: str, target: Target) -> str:
    return "# written by tern: the database behind this pooler (pgbouncer.ini %includes it)\n[databases]\n" \
        + target.line(alias)


def parse_databases(text: str | None, alias: str) -> Target | None:
    """The target a ``databases_file`` names for ``alias`` (None: none)."""
    for line in (text or "").splitlines():
        name, sep, rest = line.partition("=")
        if not sep or name.strip() != alias:
            continue
        fields = dict(part.split("=", 1) for part in rest.split() if "=" in part)
        if "host" in fields:
            return Target(fields["host"], int(fields.get("port", 5432)), fields.get("dbname", alias))
    return None


class Admin:
    """One node's admin console (tern only), one connection per call."""

    def __init__(self, pooler: Pooler, node: PoolerNode, *, timeout: float = 5.0) -> None:
        self.pooler = pooler
        self.node = node
        self.timeout = timeout

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(host=self.node.admin_host, port=self.node.admin_port, dbname=ADMIN_DB,
                                   user=self.pooler.admin_user, password=resolve(self.pooler.admin_password),
                                   sslmode="prefer", connect_timeout=max(1, int(self.timeout)), autocommit=True,
                                   cursor_factory=psycopg.ClientCursor, application_name="tern")
        except psycopg.Error as exc:
            raise DatabaseError(f"pooler {self.node.name}: cannot reach its admin console at "
                                f"{self.node.admin_host}:{self.node.admin_port} as {self.pooler.admin_user}: "
                                f"{redact(str(exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__}"
                                ) from None

    def command(self, statement: str) -> None:
        with self._connect() as conn:
            try:
                conn.execute(statement)
            except psycopg.Error as exc:
                raise DatabaseError(f"pooler {self.node.name}: {statement} failed: {str(exc).strip()}") from None

    def show(self, what: str) -> list[dict[str, Any]]:
        with self._connect() as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [d.name for d in cur.description or []]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def check(self) -> None:
        """The admin console answers (and the password is right)."""
        self.show("VERSION")

    def pause(self, db: str, timeout: float) -> float:
        """``PAUSE db``, bounded: returns the seconds it took. A transaction still running after ``timeout``
        undoes it (``RESUME`` from a second session) and raises :class:`PauseTimeout` naming what held it."""
        done: list[BaseException | None] = []
        conn = self._connect()

        def run() -> None:
            try:
                conn.execute(f"PAUSE {db}")
                done.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported below
                done.append(exc)

        t0 = time.monotonic()
        worker = threading.Thread(target=run, name=f"tern-pause-{self.node.name}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            holders = self._active_servers(db)
            try:
                self.command(f"RESUME {db}")
            finally:
                # PgBouncer (1.18) never answers a PAUSE that RESUME undid: the session would hang until
                # the worker's join gave up. Shut its socket (the worker's read ends at once), then close.
                _shut_socket(conn)
                worker.join(5)
                conn.close()
            raise PauseTimeout(f"pooler {self.node.name}: PAUSE {db} did not finish within {timeout:g}s: "
                               f"{holders or 'a server connection'} still in a transaction; resumed, nothing "
                               "switched")
        conn.close()
        if done and done[0] is not None:
            exc = done[0]
            if "already paused" in str(exc).lower():
                return time.monotonic() - t0
            raise DatabaseError(f"pooler {self.node.name}: PAUSE {db} failed: {str(exc).strip()}")
        return time.monotonic() - t0

    def _active_servers(self, db: str) -> str:
        try:
            rows = [r for r in self.show("SERVERS") if r.get("database") == db and r.get("state") == "active"]
        except RunbookError:
            return ""
        return ", ".join(f"{r.get('user')}@{r.get('addr')}:{r.get('port')} (since {r.get('connect_time')})"
                         for r in rows[:5])

    def paused(self, db: str) -> bool:
        for row in self.show("DATABASES"):
            if row.get("name") == db:
                return bool(row.get("paused"))
        return False


def _shut_socket(conn: psycopg.Connection) -> None:
    """End a session another thread is blocked reading, without freeing libpq's connection under it."""
    import os
    import socket

    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
    except (OSError, psycopg.Error):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def check_app_login(pooler: Pooler, url: str, *, timeout: float) -> None:
    """The app's own role logs in through the pooler and reaches the database it names (``SELECT 1``);
    else DatabaseError naming why (the password never in it)."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), prepare_threshold=None,
                             application_name="tern:pooler-check") as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise DatabaseError(f"the pooler {pooler.host}:{pooler.port} does not let the app's role through to its "
                            f"database: {redact(str(exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__}"
                            " (its auth_file must hold the role; see runbook/pooler.py)") from None


def admins(pooler: Pooler, timeout: float) -> list[Admin]:
    return [Admin(pooler, n, timeout=timeout) for n in pooler.nodes]


def current_target(pooler: Pooler, node: PoolerNode | None = None) -> Target | None:
    """What the node's databases file names (the first node's by default)."""
    node = node or pooler.nodes[0]
    return parse_databases(host_for(node).read_file(node.databases_file), pooler.database)


def point(pooler: Pooler, target: Target, *, timeout: float) -> list[str]:
    """Every node's databases file names ``target``, reloaded. Idempotent. Returns what it did per node."""
    done = []
    for node in pooler.nodes:
        host = host_for(node)
        if parse_databases(host.read_file(node.databases_file), pooler.database) != target:
            host.write_file(node.databases_file, databases_text(pooler.database, target))
            Admin(pooler, node, timeout=timeout).command("RELOAD")
            done.append(f"{node.name} -> {target}")
        else:
            done.append(f"{node.name} already -> {target}")
    return done


def pause_all(pooler: Pooler, *, timeout: float, connect_timeout: float) -> float:
    """PAUSE on every node (each bounded by ``timeout``); on any failure every node is resumed and the error
    raised. Returns the longest pause."""
    longest = 0.0
    paused: list[Admin] = []
    try:
        for admin in admins(pooler, connect_timeout):
            longest = max(longest, admin.pause(pooler.database, timeout))
            paused.append(admin)
    except RunbookError:
        resume_all(pooler, connect_timeout=connect_timeout, only=paused)
        raise
    return longest


def resume_all(pooler: Pooler, *, connect_timeout: float, only: list[Admin] | None = None) -> list[str]:
    """RESUME on every node (or ``only`` those); a node not paused is fine. Returns the nodes it could not
    reach (the caller says so: their clients stay held until query_wait_timeout)."""
    failed = []
    for admin in (only if only is not None else admins(pooler, connect_timeout)):
        try:
            admin.command(f"RESUME {pooler.database}")
        except RunbookError as exc:
            if "not paused" not in str(exc).lower():
                failed.append(str(exc))
    return failed


def status(pooler: Pooler, timeout: float) -> list[dict[str, Any]]:
    """Per node: its target, paused or not, server connections and waiting clients (``invoke status``)."""
    out = []
    for admin in admins(pooler, timeout):
        row: dict[str, Any] = {"node": admin.node.name}
        try:
            target = current_target(pooler, admin.node)
            row["target"] = str(target) if target else None
            pools = [p for p in admin.show("POOLS") if p.get("database") == pooler.database]
            row.update(paused=admin.paused(pooler.database),
                       clients_active=sum(int(p.get("cl_active") or 0) for p in pools),
                       clients_waiting=sum(int(p.get("cl_waiting") or 0) for p in pools),
                       servers_active=sum(int(p.get("sv_active") or 0) for p in pools),
                       servers_idle=sum(int(p.get("sv_idle") or 0) for p in pools),
                       longest_wait_seconds=max([float(p.get("maxwait") or 0) + float(p.get("maxwait_us") or 0) / 1e6
                                                 for p in pools] or [0.0]))
        except RunbookError as exc:
            row["error"] = str(exc)
        out.append(row)
    return out


def app_url(pooler: Pooler, app_url_now: str) -> str:
    """The app's own URL (role, password, database name) pointed at the pooler, TLS when it offers it."""
    url = with_endpoint(app_url_now, pooler.host, pooler.port)
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("sslmode", "sslrootcert")]
    query.append(("sslmode", "require" if pooler.tls else "disable"))
    path = "/" + pooler.database
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), parts.fragment))


def url_behind(url: str, target: Target, *, tls: bool) -> str:
    """``url``'s role and password at ``target`` (the database a pooler names); TLS required when ``tls``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(with_endpoint(url, target.host, target.port))
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("sslmode", "sslrootcert")]
    if tls:
        query.append(("sslmode", "require"))
    return urlunsplit((parts.scheme, parts.netloc, "/" + target.dbname, urlencode(query), parts.fragment))


def points_at_pooler(pooler: Pooler, url: str | None) -> bool:
    if not url:
        return False
    host, port, _ = url_endpoint(url)
    return host == pooler.host and int(port) == int(pooler.port)
