"""The fence: after it, no client writes to the source - whoever it is and whatever it sets.

Without superuser (as on Heroku) the database's owner can still:

* hold tern's own sessions open (``SourceSessions``), opened *before* the fence;
* ``ALTER DATABASE ... CONNECTION LIMIT k`` with ``k`` = the number of those sessions: every new
  session of every non-superuser role is refused ("too many connections for database") -
  ``default_transaction_read_only`` alone is advisory, a client can turn it off;
* terminate every other client session of the database and wait until it is gone (a session
  of a role it may not terminate makes the fence fail, naming the role);
* refuse prepared transactions (one could be committed later, after the copy).

The proof: a fresh session of the app's role is refused, no client session but tern's is left,
no prepared transaction is left. The read-only defaults stay as a second line.

A physical copy carries the fence along (it is in the catalog): the new leader gets it lifted
after its promotion (:func:`lift_statements`).
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg import sql

from ..errors import DatabaseError, RunbookError, StepError
from ..pg import connect, url_endpoint, url_user
from ..polling import polling_loop

log = logging.getLogger(__name__)

# tern's sessions on the source bypass the read-only defaults it puts on the app role
BYPASS_READ_ONLY = "-c default_transaction_read_only=off"
# databases the owner may connect to while its own is fenced (to lift the fence after a crash)
MAINTENANCE_DATABASES = ("postgres", "template1")
TOO_MANY = "too many connections"

# Client sessions of the database but tern's. Another role's row hides its backend_type (NULL) from
# a non-superuser; background workers have no user. Superusers' sessions (the platform's own) are
# beyond any fence an owner can raise: they are not counted here, and the final proof (the next
# transaction id unchanged) catches any write they make.
OTHER_SESSIONS_SQL = """
SELECT a.pid, a.usename::text, coalesce(a.application_name, ''), pg_has_role(a.usename, 'MEMBER') AS mine
FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid
WHERE a.datname = current_database() AND coalesce(a.backend_type, 'client backend') = 'client backend'
  AND NOT r.rolsuper AND NOT (a.pid = ANY(%s)) AND a.usename::text <> 'tern_replicator'
"""
# tern_replicator: tern's own replication role (its logical walsender feeds Aurora during hop 2)


class SourceSessions:
    """tern's own sessions on the source's database, held open through the fence.

    The first is the control session (flush, proofs, the fence's statements); the others serve
    the verification. They are the only sessions the fenced database admits.
    """

    def __init__(self, url: str, *, count: int, timeout: float) -> None:
        self.url = url
        self.count = count
        self.timeout = timeout
        self.connections: list[psycopg.Connection] = []

    def open(self) -> "SourceSessions":
        self.connections = [c for c in self.connections if not c.closed and _alive(c)]
        while len(self.connections) < self.count:
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.timeout)),
                                       application_name="tern:fence", options=BYPASS_READ_ONLY)
            except psycopg.Error as exc:
                host, port, db = url_endpoint(self.url)
                raise DatabaseError(f"cannot open tern's session on {host}:{port}/{db}: "
                                    f"{str(exc).strip().splitlines()[-1]}") from None
            self.connections.append(conn)
        return self

    @property
    def control(self) -> psycopg.Connection:
        return self.open().connections[0]

    def verification(self) -> list[psycopg.Connection]:
        return self.open().connections[1:]

    def pids(self) -> list[int]:
        return [c.info.backend_pid for c in self.connections if not c.closed]

    def alive(self) -> bool:
        return len(self.connections) == self.count and all(not c.closed and _alive(c) for c in self.connections)

    def close(self) -> None:
        for c in self.connections:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self.connections = []


def _alive(conn: psycopg.Connection) -> bool:
    try:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return conn.info.transaction_status in (psycopg.pq.TransactionStatus.INTRANS,
                                                    psycopg.pq.TransactionStatus.ACTIVE)
        conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def maintenance_connection(url: str, *, timeout: float, purpose: str):
    """A session of the same role on another database of the source (not subject to the fence).

    It bypasses the read-only default the fence puts on the role (``ALTER ROLE ... SET``, which follows
    the role into every database): lifting the fence from here is an ``ALTER DATABASE``."""
    last: Exception | None = None
    for db in MAINTENANCE_DATABASES:
        target = url.split("?", 1)
        base = target[0].rsplit("/", 1)[0] + "/" + db
        try:
            return connect(base + ("?" + target[1] if len(target) > 1 else ""), purpose=purpose, timeout=timeout,
                           options=BYPASS_READ_ONLY)
        except RunbookError as exc:
            last = exc
    raise DatabaseError(f"cannot reach the source from another database ({', '.join(MAINTENANCE_DATABASES)}): {last}")


# -- statements -------------------------------------------------------------------------------
def fence_statements(db: str, role: str, limit: int) -> list[sql.Composable]:
    return [sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(sql.Identifier(db), sql.Literal(limit)),
            sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(sql.Identifier(db)),
            sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(role))]


def lift_statements(db: str, role: str, previous_limit: int) -> list[sql.Composable]:
    return [sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(sql.Identifier(db), sql.Literal(previous_limit)),
            sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(sql.Identifier(db)),
            sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(sql.Identifier(role))]


# A role's own fence, for where tern's role may not close the database to everyone (Aurora's master,
# rollback-aurora): the app's role admits no new session anywhere and defaults to read-only; the
# master's sessions (tern's) and the replication's walsenders stay. Outlives tern's sessions.
def role_fence_statements(role: str) -> list[sql.Composable]:
    return [sql.SQL("ALTER ROLE {} CONNECTION LIMIT 0").format(sql.Identifier(role)),
            sql.SQL("ALTER ROLE {} SET default_transaction_read_only = on").format(sql.Identifier(role))]


def role_lift_statements(role: str, previous_limit: int) -> list[sql.Composable]:
    return [sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(sql.Identifier(role), sql.Literal(previous_limit)),
            sql.SQL("ALTER ROLE {} RESET default_transaction_read_only").format(sql.Identifier(role))]


def prepared_transactions(conn) -> list[str]:
    return [f"{gid} (owner {owner})" for gid, owner in conn.execute(
        "SELECT gid, owner::text FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared"
    ).fetchall()]


# -- acts ---------------------------------------------------------------------------------------
def apply(sessions: SourceSessions, *, app_url: str, timeout: float, interval: float) -> dict[str, Any]:
    """Fence the source's database; returns what was done. Raises StepError if it cannot hold."""
    conn = sessions.control
    db, role = conn.execute("SELECT current_database(), current_user").fetchone()
    refuse_prepared(conn)
    for statement in fence_statements(db, role, sessions.count):
        conn.execute(statement)
    killed = terminate_others(sessions, timeout=timeout, interval=interval)
    prove(sessions, app_url=app_url)
    return {"database": db, "role": role, "limit": sessions.count, "terminated": killed}


def apply_to_role(sessions: SourceSessions, *, role: str, app_url: str, timeout: float,
                  interval: float) -> dict[str, Any]:
    """Fence the app's ``role`` from tern's sessions of another role (a member of it that may alter it):
    the role's fence, then every other client session terminated and the same proof as :func:`apply`."""
    conn = sessions.control
    refuse_prepared(conn)
    for statement in role_fence_statements(role):
        conn.execute(statement)
    killed = terminate_others(sessions, timeout=timeout, interval=interval)
    prove(sessions, app_url=app_url)
    return {"role": role, "terminated": killed}


def lift_role(conn, role: str, *, previous_limit: int) -> None:
    for statement in role_lift_statements(role, previous_limit):
        conn.execute(statement)


def readmit_role(conn, role: str) -> bool:
    """Lift a role's fence left in place (CONNECTION LIMIT 0, by rollback-aurora on Aurora): no limit, the
    read-only default reset. False when the role was not fenced (nothing done)."""
    if role_connection_limit(conn, role) != 0:
        return False
    lift_role(conn, role, previous_limit=-1)
    return True


def role_connection_limit(conn, role: str) -> int | None:
    row = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    return None if row is None else int(row[0])


def refuse_prepared(conn) -> None:
    prepared = prepared_transactions(conn)
    if prepared:
        raise StepError(f"{len(prepared)} prepared transactions on the source ({', '.join(prepared[:5])}) could "
                        "commit after the copy: COMMIT PREPARED or ROLLBACK PREPARED them, then run again")


def terminate_others(sessions: SourceSessions, *, timeout: float, interval: float) -> int:
    """Terminate every client session of the database but tern's, and wait until they are gone."""
    conn = sessions.control
    signalled: set[int] = set()
    refused: dict[str, int] = {}
    for _ in polling_loop(timeout, interval):
        others = conn.execute(OTHER_SESSIONS_SQL, (sessions.pids(),)).fetchall()
        if not others:
            return len(signalled)
        refused = {}
        for pid, user, _app, mine in others:
            if not mine:
                refused[user] = refused.get(user, 0) + 1
                continue
            try:
                # signalled, not awaited one by one: the loop polls until every one is gone
                if conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()[0]:
                    signalled.add(pid)
            except psycopg.errors.InsufficientPrivilege:
                refused[user] = refused.get(user, 0) + 1
            except psycopg.Error as exc:
                log.debug("terminating %s: %s", pid, exc)
        if refused:
            break
    who = ", ".join(f"{n} of role {u}" for u, n in sorted(refused.items()))
    if refused:
        raise StepError(f"the fence does not hold: sessions tern may not terminate remain on the source ({who}): "
                        "stop them (e.g. heroku pg:killall), then run again")
    left = conn.execute(OTHER_SESSIONS_SQL, (sessions.pids(),)).fetchall()
    raise StepError(f"the fence does not hold: {len(left)} sessions still connected after {timeout:g}s")


def prove(sessions: SourceSessions, *, app_url: str) -> str:
    """A fresh session of the app's role must be refused; no other client session, no prepared
    transaction may be left. Returns a one-line proof; raises StepError when it does not hold."""
    try:
        with psycopg.connect(app_url, connect_timeout=5, application_name="tern:fence-proof") as probe:
            try:
                probe.execute("SET default_transaction_read_only = off")
                probe.execute("CREATE TEMP TABLE tern_fence_probe ()")
            finally:
                probe.rollback()
        raise StepError("the fence does not hold: a new session of the app's role was admitted")
    except psycopg.OperationalError as exc:
        if TOO_MANY not in str(exc):
            raise StepError(f"the fence cannot be proven: {str(exc).strip().splitlines()[-1]}") from None
    conn = sessions.control
    others = conn.execute(OTHER_SESSIONS_SQL, (sessions.pids(),)).fetchall()
    if others:
        raise StepError(f"the fence does not hold: {len(others)} other sessions are connected "
                        f"(roles {', '.join(sorted({o[1] for o in others}))})")
    prepared = prepared_transactions(conn)
    if prepared:
        raise StepError(f"the fence does not hold: prepared transactions {', '.join(prepared[:5])}")
    return "a new session is refused; no other session; no prepared transaction"


def lift(url: str, sessions: SourceSessions | None, *, previous_limit: int, timeout: float) -> None:
    """Undo the fence on the source: from tern's session if alive, else a new session, else another database."""
    _, _, db = url_endpoint(url)
    role = url_user(url)
    statements = lift_statements(db, role, previous_limit)
    if sessions is not None and sessions.connections and all(not c.closed for c in sessions.connections[:1]):
        try:
            for st in statements:
                sessions.connections[0].execute(st)
            sessions.close()
            return
        except psycopg.Error:
            pass
    if sessions is not None:
        sessions.close()    # frees the fenced database's slots for the session below
    try:
        with connect(url, purpose="unfence", timeout=timeout, options=BYPASS_READ_ONLY) as conn:
            for st in statements:
                conn.execute(st)
            return
    except RunbookError as exc:
        if TOO_MANY not in str(exc):
            raise
    with maintenance_connection(url, timeout=timeout, purpose="unfence") as conn:
        for st in statements:
            conn.execute(st)


def next_xid(conn) -> int:
    """The first transaction id not yet assigned (a snapshot's xmax): it moves when a transaction starts writing."""
    return quiet_point(conn)[0]


def quiet_point(conn) -> tuple[int, list[str]]:
    """(xmax, in-progress xids) of the server's current snapshot. ``xmax`` alone proves nothing about a
    transaction already running: it may commit later without moving it. Both together do."""
    xmax, xip = conn.execute("SELECT pg_snapshot_xmax(s)::text, "
                             "array(SELECT pg_snapshot_xip(s)::text ORDER BY 1) FROM pg_current_snapshot() s"
                             ).fetchone()
    return int(xmax), list(xip)


def wait_quiet(conn, *, timeout: float, interval: float) -> int:
    """Wait (bounded) until no transaction holding an xid is running on the server; its xmax then.

    After the fence no client may start one; what can still run is a superuser's (the platform's)
    or one the fence just terminated. A transaction still running at the deadline fails the step."""
    last: list[str] = []
    for _ in polling_loop(timeout, interval):
        xmax, last = quiet_point(conn)
        if not last:
            return xmax
    who = conn.execute("SELECT string_agg(pid::text || ' (' || coalesce(usename::text, '?') || ')', ', ') "
                       "FROM pg_stat_activity WHERE backend_xid IS NOT NULL").fetchone()[0]
    raise StepError(f"transactions {', '.join(last[:5])} are still running on the source after the fence "
                    f"(sessions: {who or 'not visible to this role'}): they could commit after the copy")


def prove_quiet(conn, accepted: set[int], *, what: str) -> int:
    """No transaction started since the recorded point (xmax one of ``accepted``) and none is running.

    Raises NotPromoted (the caller falls back) otherwise."""
    from ..errors import NotPromoted

    xmax, xip = quiet_point(conn)
    if xip:
        raise NotPromoted(f"transactions {', '.join(xip[:5])} are running on {what} after the final LSN: "
                          "they could commit after the copy - not crossing the point of no return")
    if xmax not in accepted:
        raise NotPromoted(f"{what}'s next transaction id is {xmax}, not {sorted(accepted)} as recorded after the "
                          "final LSN (something wrote after the fence): not crossing the point of no return")
    return xmax


def seal(conn, database: str, after: int) -> int | None:
    """Connection limit 0: the database never admits a new session (tern's open ones stay).

    ``after``: the xmax recorded at the final point. Returns the xmax expected right after the seal
    when the seal's own transaction is the only one since (its xid is ``after``); None when something
    else took an xid in between - the caller must then flush again (the seal cannot vouch for it)."""
    with conn.transaction():
        conn.execute(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 0").format(sql.Identifier(database)))
        xid = int(conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
    return xid + 1 if xid == after else None
