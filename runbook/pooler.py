"""PgBouncer in front of the leader: the app's one endpoint across both hops (issue #12).

On Heroku a change of ``DATABASE_URL`` restarts every dyno, and a real app takes seconds to tens of
seconds to boot: downtime the database switch itself does not need. With a pooler the app's URL names
PgBouncer once (before the window, :func:`runbook.failover.pooler_switch.pooler_in`, after
:func:`ensure_app_auth` put the app role's SCRAM verifier in every node's auth_file); each switch after
that is, on every pooler node at once:

1. ``PAUSE <db>`` - PgBouncer waits for every server connection to be released (transaction pooling:
   the transaction in flight ends), closes them, and holds every new query. Bounded
   (:meth:`Admin.pause`): a transaction still open after ``timeout`` is named and the pause is undone
   (``RESUME``), so that no client stays held and the failover falls back.
2. the failover's fence, catch-up, checks and promotion, while clients wait;
3. rewrite the node's ``databases_file`` (``%include``d by pgbouncer.ini) to the new target, ``RELOAD``;
4. ``RESUME <db>``: the held queries run on the new target. No error reaches a client, only latency.

The fence still stands behind the pooler: a client that connects to the old database directly is
refused there as before.

Every decision is taken from what each running PgBouncer reports (``SHOW DATABASES``, a login through
that node alone), never from its files: a file rewritten without its RELOAD is not in effect. Every
node is asked, never only the first: the load balancer sends the app to any of them.

The admin console is PgBouncer's virtual database ``pgbouncer``; it speaks only the simple query
protocol (psycopg's ``ClientCursor``). Its password is a credential reference, resolved at use. Every
admin command is bounded (the connection and the answer): a console that accepts connections and never
answers is an error after ``timeout``, not a hang.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import psycopg

from .adapters import HostCommands, host_for
from .contract import Pooler, PoolerNode
from .errors import CommandError, ConfigError, DatabaseError, PreflightError, RunbookError, StepError
from .pg import url_endpoint, url_user, with_endpoint
from .redact import redact
from .secrets import resolve

if TYPE_CHECKING:
    from .postgres import PgHost

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
                                   # TLS where the pooler offers it, never dropped to plain text (the
                                   # admin password crosses this connection)
                                   sslmode="require" if self.pooler.tls else "prefer",
                                   connect_timeout=max(1, int(self.timeout)), autocommit=True,
                                   cursor_factory=psycopg.ClientCursor, application_name="tern")
        except psycopg.Error as exc:
            raise DatabaseError(f"pooler {self.node.name}: cannot reach its admin console at "
                                f"{self.node.admin_host}:{self.node.admin_port} as {self.pooler.admin_user}: "
                                f"{redact(str(exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__}"
                                ) from None

    def _run(self, statement: str) -> list[dict[str, Any]]:
        """One statement on a session of its own, bounded twice by ``timeout``: the connection (libpq's
        connect_timeout covers TLS and the password exchange too) and the answer. A console that accepts
        connections and never answers - a hung or stopped process: the kernel still completes the TCP
        handshake - raises DatabaseError instead of holding the failover (and its paused clients) for ever."""
        conn = self._connect()
        try:
            return self._answer(conn, statement, self.timeout)
        finally:
            conn.close()

    def _answer(self, conn: psycopg.Connection, statement: str, timeout: float) -> list[dict[str, Any]]:
        """``statement``'s rows on ``conn`` within ``timeout``, else its socket is shut (the blocked read ends
        at once; libpq's connection is not freed under it) and DatabaseError says so."""
        out: dict[str, Any] = {}

        def run() -> None:
            try:
                cur = conn.execute(statement)
                names = [d.name for d in cur.description or []]
                out["rows"] = [dict(zip(names, row)) for row in cur.fetchall()] if names else []
            except BaseException as exc:  # noqa: BLE001 - reported below
                out["error"] = exc

        worker = threading.Thread(target=run, name=f"tern-admin-{self.node.name}", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            _shut_socket(conn)
            worker.join(5)
            raise DatabaseError(f"pooler {self.node.name}: {statement} got no answer within {timeout:g}s (its admin "
                                f"console at {self.node.admin_host}:{self.node.admin_port} accepts connections but "
                                "does not answer)")
        if "error" in out:
            raise DatabaseError(f"pooler {self.node.name}: {statement} failed: {str(out['error']).strip()}")
        return out["rows"]

    def command(self, statement: str) -> None:
        self._run(statement)

    def show(self, what: str) -> list[dict[str, Any]]:
        return self._run(f"SHOW {what}")

    def serving(self, db: str) -> tuple[Target | None, bool]:
        """What this PgBouncer serves for ``db`` now, and whether it is paused (``SHOW DATABASES``): its
        configuration as last loaded, not its file - a file rewritten without a RELOAD is not in effect yet.
        (None, False): it serves no such database."""
        for row in self.show("DATABASES"):
            if row.get("name") == db:
                target = Target(str(row["host"]), int(row.get("port") or 5432), str(row.get("database") or db)) \
                    if row.get("host") else None
                return target, bool(row.get("paused"))
        return None, False

    def target(self, db: str) -> Target | None:
        return self.serving(db)[0]

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
        return self.serving(db)[1]


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


def check_app_login(pooler: Pooler, url: str, *, timeout: float, node: PoolerNode | None = None) -> None:
    """The app's own role logs in through the pooler (or through ``node`` alone) and reaches the database it
    names (``SELECT 1``); else DatabaseError naming why (the password never in it)."""
    where = f"pooler node {node.name} ({node.admin_host}:{node.admin_port})" if node else \
        f"the pooler {pooler.host}:{pooler.port}"
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout)), prepare_threshold=None,
                             application_name="tern:pooler-check") as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise DatabaseError(f"{where} does not let the app's role through to its database: "
                            f"{redact(str(exc)).strip().splitlines()[0] if str(exc) else type(exc).__name__}"
                            " (its auth_file must hold the role: the pooler_auth step writes it there)") from None


def admins(pooler: Pooler, timeout: float) -> list[Admin]:
    return [Admin(pooler, n, timeout=timeout) for n in pooler.nodes]


def each(pooler: Pooler, timeout: float, fn: Callable[[Admin], Any]) -> list[Any]:
    """``fn`` on every node at once (one thread each), in the nodes' order: its result, or the exception it
    raised. Each call bounds itself (every admin command does), so this does too: the slowest node's time,
    not the sum - N nodes do not make a pause N times longer."""
    nodes = admins(pooler, timeout)

    def call(admin: Admin) -> Any:
        try:
            return fn(admin)
        except BaseException as exc:  # noqa: BLE001 - returned to the caller, which decides
            return exc

    if len(nodes) == 1:
        return [call(nodes[0])]
    with ThreadPoolExecutor(max_workers=len(nodes), thread_name_prefix="tern-pooler") as pool:
        return list(pool.map(call, nodes))


def _raise_first(results: Sequence[Any]) -> None:
    """Raise what went wrong on the nodes: every node's message in one error of the first one's type."""
    errors = [r for r in results if isinstance(r, BaseException)]
    if not errors:
        return
    if not all(isinstance(e, RunbookError) for e in errors):
        raise next(e for e in errors if not isinstance(e, RunbookError))
    first = next((e for e in errors if isinstance(e, PauseTimeout)), errors[0])
    if len(errors) == 1:
        raise first
    raise type(first)("; ".join(str(e) for e in errors))


def targets(pooler: Pooler, timeout: float) -> list[tuple[PoolerNode, Target | None]]:
    """What every node serves now (``SHOW DATABASES``); a node that cannot say raises DatabaseError."""
    results = each(pooler, timeout, lambda a: a.target(pooler.database))
    _raise_first(results)
    return list(zip(pooler.nodes, results))


def current_target(pooler: Pooler, node: PoolerNode | None = None, *, timeout: float = 5.0) -> Target | None:
    """What ``node`` serves now, as its running PgBouncer reports it; without ``node``, what every node
    serves - the app reaches any of them through the load balancer, so nodes that disagree are an error
    (DatabaseError naming each), never the first node's word."""
    if node is not None:
        return Admin(pooler, node, timeout=timeout).target(pooler.database)
    seen = targets(pooler, timeout)
    if len({t for _, t in seen}) > 1:
        raise DatabaseError("the pooler's nodes serve different databases: "
                            + "; ".join(f"{n.name} -> {t or 'nothing'}" for n, t in seen))
    return seen[0][1]


def file_target(pooler: Pooler, node: PoolerNode) -> Target | None:
    """What the node's databases file names (in effect only once reloaded: see :func:`current_target`)."""
    return parse_databases(host_for(node).read_file(node.databases_file), pooler.database)


def point(pooler: Pooler, target: Target, *, timeout: float, check_files: bool = False) -> list[str]:
    """Every node serves ``target``: its databases file names it and it was reloaded. Idempotent. Returns what
    it did per node.

    Each node is judged by what its running PgBouncer serves (``SHOW DATABASES``), not by its file: a node
    whose file was rewritten but not reloaded (tern killed between the two, a RELOAD lost) still serves the
    old database, and is reloaded now. The nodes are done at once (on AWS each file write is an SSM command,
    about a second, inside the window).

    A node whose admin console cannot be reached (stopped, its instance rebooting) still gets its file
    rewritten through its command channel: PgBouncer reads the file when it starts, so it comes back serving
    ``target``, never the database it served before (a process that is only hung keeps what it loaded until
    a RELOAD: the detail says so). A node that neither answers nor takes the file is an error.

    ``check_files`` (outside the window only: one more command per node): a node already serving ``target``
    also gets its file checked, and rewritten if it names another database, so that a restart keeps it."""
    text = databases_text(pooler.database, target)

    def write(node: PoolerNode) -> None:
        host_for(node).write_file(node.databases_file, text)

    def one(admin: Admin) -> str:
        node = admin.node
        try:
            serving = admin.target(pooler.database)
        except DatabaseError as exc:
            if "cannot reach its admin console" not in str(exc):
                raise
            try:
                if file_target(pooler, node) != target:
                    write(node)
            except RunbookError as cmd:
                raise DatabaseError(f"{exc}; its databases file could not be rewritten either ({cmd}): when it "
                                    f"starts again it may serve the old database - point it at {target}") from None
            return (f"{node.name} not running: {node.databases_file} names {target}, which it serves when it "
                    "starts (if it is only hung, RELOAD it)")
        if serving == target:
            if check_files and file_target(pooler, node) != target:
                write(node)
                return f"{node.name} already -> {target} (its file named another database: rewritten)"
            return f"{node.name} already -> {target}"
        write(node)
        admin.command("RELOAD")
        now = admin.target(pooler.database)
        if now != target:
            raise DatabaseError(f"pooler {node.name}: after RELOAD it serves {now or 'nothing'}, not {target}, "
                                f"although {node.databases_file} names it (its log says why)")
        return f"{node.name} -> {target}"

    results = each(pooler, timeout, one)
    _raise_first(results)
    return results


def pause_all(pooler: Pooler, *, timeout: float, connect_timeout: float) -> float:
    """PAUSE on every node at once (each bounded by ``timeout``): the hold is the slowest node's wait, not the
    sum. On any failure every node is resumed - a node whose PAUSE failed may have half-acted - and the error
    raised. Returns the longest pause."""
    results = each(pooler, connect_timeout, lambda a: a.pause(pooler.database, timeout))
    if any(isinstance(r, BaseException) for r in results):
        resume_all(pooler, connect_timeout=connect_timeout)
        _raise_first(results)
    return max(results)


def resume_all(pooler: Pooler, *, connect_timeout: float, only: list[Admin] | None = None) -> list[str]:
    """RESUME on every node at once (or ``only`` those); a node not paused is fine. Returns the nodes it could
    not reach (the caller says so: their clients stay held until query_wait_timeout)."""
    def one(admin: Admin) -> str | None:
        try:
            admin.command(f"RESUME {pooler.database}")
        except RunbookError as exc:
            if "not paused" not in str(exc).lower():
                return str(exc)
        return None

    if only is not None:
        results = [one(a) for a in only]
    else:
        results = each(pooler, connect_timeout, one)
    return [str(r) for r in results if r is not None]


def app_clients(pooler: Pooler, role: str, *, timeout: float) -> list[str]:
    """The clients of ``role`` connected to the pooler's database now, per node (``SHOW CLIENTS``; tern's own
    login checks left out): what still uses the pooler, e.g. dynos that have not restarted yet. A node whose
    admin console cannot be reached is not running and has none; one that answers otherwise wrongly raises."""
    def one(admin: Admin) -> list[str]:
        try:
            rows = admin.show("CLIENTS")
        except DatabaseError as exc:
            if "cannot reach its admin console" in str(exc):
                return []
            raise
        return [f"{admin.node.name}: {r.get('addr')}:{r.get('port')} (since {r.get('connect_time')})" for r in rows
                if r.get("user") == role and r.get("database") == pooler.database
                and not str(r.get("application_name") or "").startswith("tern")]

    results = each(pooler, timeout, one)
    _raise_first(results)
    return [c for r in results for c in r]


def status(pooler: Pooler, timeout: float) -> list[dict[str, Any]]:
    """Per node: its target (what the running PgBouncer serves; ``file_target`` too when its databases file
    names another, not reloaded yet), paused or not, server connections and waiting clients (``invoke status``)."""
    out = []
    for admin in admins(pooler, timeout):
        row: dict[str, Any] = {"node": admin.node.name}
        try:
            target = admin.target(pooler.database)
            row["target"] = str(target) if target else None
            try:
                in_file = file_target(pooler, admin.node)
                if in_file != target:
                    row["file_target"] = str(in_file) if in_file else None
            except RunbookError:
                pass    # the command channel is down: what the console says is what counts
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


def app_url(pooler: Pooler, app_url_now: str, node: PoolerNode | None = None) -> str:
    """The app's own URL (role, password, database name) pointed at the pooler (or at one ``node`` of it,
    bypassing the load balancer), TLS when it offers it."""
    url = with_endpoint(app_url_now, *((node.admin_host, node.admin_port) if node else (pooler.host, pooler.port)))
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


# -- the app's role in each node's auth_file ---------------------------------------------------------------
# PgBouncer checks a client's password against its auth_file, then logs in to the database with the same
# credentials. With a SCRAM verifier there (not the password), it passes the client's SCRAM proof through
# to the server ("SCRAM pass-through"), which works only when the server keeps the very same verifier (same
# salt and iterations). A restored replica is a physical copy of the source, so its ``pg_authid`` holds
# Heroku's verifier byte for byte; Aurora gets the same one (replication/schema.py: copy_role). tern reads it
# there and writes it into each node's auth_file, then RELOADs: the password itself never leaves the app.
#
# The verifier is a secret (an offline guess at the password starts from it; it lets a server impersonate
# the database to the app's clients). It never enters a log, a journal, an error or a command line, and it
# never travels in clear through a command channel that keeps what it sends (SSM keeps each command and its
# output): the node makes a one-time RSA key pair, hands tern the public half, and only the verifier sealed
# with it (RSA-OAEP, SHA-256) crosses the channel; the node unseals it, writes the file, deletes the key.
# RSA-2048: the key lives for two commands and seals one short message (a 3072-bit key took 1-6 s to make on
# a loaded machine, 2048 bits a few tenths).
AUTH_KEY_BITS = 2048
_OAEP = ["-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256"]
_PEM = re.compile(r"-----BEGIN PUBLIC KEY-----\s[A-Za-z0-9+/=\s]+-----END PUBLIC KEY-----")

# $1: the auth_file; the private key beside it, 0600, readable only by the node's OS user (PgBouncer's)
KEYGEN_SH = ('{ [ ! -e "$1" ] || [ -O "$1" ]; } || { echo "tern: $1 belongs to another user, not to this user '
             '(PgBouncer\'s): not replaced" >&2; exit 6; }; '
             'umask 077 && rm -f "$1.tern-key" && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:"$2" '
             '-out "$1.tern-key" && openssl pkey -in "$1.tern-key" -pubout')
# $1: the auth_file, $2: the role, $3: put|remove, $4: AUTH_PY; stdin (put): the sealed verifier, base64.
# The clear verifier is only ever in a shell variable and a pipe: never in argv, the environment or a file
# but the auth_file.
AUTH_SH = ('key="$1.tern-key"; if [ "$3" = put ]; then '
           '[ -f "$key" ] || { echo "tern: no key at $key (run again)" >&2; exit 4; }; '
           'v=$(base64 -d | openssl pkeyutl -decrypt -inkey "$key" ' + " ".join(_OAEP) + ' 2>/dev/null); '
           'rc=$?; rm -f "$key"; [ "$rc" -eq 0 ] || { echo "tern: cannot unseal what tern sent" >&2; exit 5; }; '
           'printf %s "$v" | python3 -c "$4" "$1" "$2" put; '
           'else rm -f "$key"; python3 -c "$4" "$1" "$2" remove </dev/null; fi')
# one line per role ("role" "secret", as PgBouncer reads it); the other lines are kept as they are. The new
# file is written beside the old one, synced and renamed over it: PgBouncer never reads half a file.
AUTH_PY = r'''
import os, sys
path, role, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def q(s):
    return '"' + s.replace('"', '""') + '"'
prefix = q(role) + " "
try:
    st = os.stat(path)
    if st.st_uid != os.getuid():
        sys.exit("tern: %s belongs to uid %d, not to this user (PgBouncer's): not replaced" % (path, st.st_uid))
    with open(path) as f:
        lines = f.read().splitlines()
except FileNotFoundError:
    lines = []
new = [line for line in lines if not line.startswith(prefix)]
if mode == "put":
    secret = sys.stdin.read()
    if not secret.startswith("SCRAM-SHA-256$") or any(c in secret for c in '"\n\r\t '):
        sys.exit("tern: what arrived is not a SCRAM-SHA-256 verifier: nothing written")
    new.append(prefix + q(secret))
if new == lines:
    print("unchanged")
    sys.exit(0)
tmp = path + ".tern-tmp"
fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    os.fchmod(f.fileno(), 0o600)
    f.write("".join(line + "\n" for line in new))
    f.flush()
    os.fsync(f.fileno())
os.rename(tmp, path)
d = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
os.fsync(d)
os.close(d)
print("written" if mode == "put" else "removed")
'''


def read_verifier(pg: "PgHost", role: str, *, database: str, timeout: float = 30.0) -> str:
    """``role``'s password verifier in ``pg``'s ``pg_authid`` (a restored replica: Heroku's own), read only
    where it stays between tern and the server (:meth:`PgHost.query_private`), and registered as a secret so
    that no message ever shows it. Not SCRAM (an MD5 hash): PreflightError, PgBouncer could not pass it on."""
    from .postgres import literal

    rows = pg.query_private(f"SELECT rolpassword AS v FROM pg_authid WHERE rolname = {literal(role)}",
                            database=database, timeout=timeout)
    verifier = str(rows[0]["v"]) if rows and rows[0].get("v") else ""
    if verifier:
        from .redact import register_secret

        register_secret(verifier)
    if not verifier.startswith("SCRAM-SHA-256$"):
        what = "no password" if not verifier else "an MD5 password, not a SCRAM-SHA-256 verifier"
        raise PreflightError(f"the app's role {role} has {what} on {pg.host.name}: PgBouncer can pass only a SCRAM "
                             "verifier through to the database (set the role's password again with "
                             "password_encryption = scram-sha-256, or use --switch url)")
    return verifier


def _seal(public_pem: str, secret: str, *, timeout: float) -> str:
    """``secret`` encrypted to ``public_pem`` (RSA-OAEP, SHA-256) with this machine's openssl, base64."""
    if shutil.which("openssl") is None:
        raise ConfigError("openssl is not installed: tern needs it to seal the app role's verifier for the pooler "
                          "(Debian: apt-get install openssl)")
    found = _PEM.search(public_pem or "")
    if found is None:
        raise CommandError("the pooler node sent no public key to seal the verifier with")
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as key:
        key.write(found.group(0) + "\n")
        key.flush()
        try:
            res = subprocess.run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", key.name, *_OAEP],
                                 input=secret.encode(), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise CommandError(f"openssl did not seal the verifier within {timeout:.0f}s") from None
    if res.returncode != 0 or not res.stdout:
        raise CommandError("openssl could not seal the verifier: "
                           + res.stderr.decode(errors="replace").strip()[-300:])
    return base64.b64encode(res.stdout).decode()


def put_auth(host: HostCommands, auth_file: str, role: str, verifier: str, *, timeout: float) -> str:
    """``role``'s line in the node's auth_file holds ``verifier`` (sealed on the way: see above); other lines
    kept, the file replaced atomically, mode 0600, the node's OS user's. Not reloaded here. Returns
    ``written`` or ``unchanged``."""
    public = host.run(["sh", "-c", KEYGEN_SH, "sh", auth_file, str(AUTH_KEY_BITS)], timeout=timeout).stdout
    sealed = _seal(public, verifier, timeout=timeout)
    res = host.run(["sh", "-c", AUTH_SH, "sh", auth_file, role, "put", AUTH_PY], input=sealed + "\n", timeout=timeout)
    return (res.stdout.strip().splitlines() or ["written"])[-1]


def remove_auth(host: HostCommands, auth_file: str, role: str, *, timeout: float) -> str:
    """``role``'s line out of the node's auth_file (the others kept). Not reloaded here. Returns ``removed``
    or ``unchanged``."""
    res = host.run(["sh", "-c", AUTH_SH, "sh", auth_file, role, "remove", AUTH_PY], timeout=timeout)
    return (res.stdout.strip().splitlines() or ["removed"])[-1]


def ensure_app_auth(pooler: Pooler, url: str, verifier: Callable[[], str], *, timeout: float,
                    command_timeout: float = 60.0,
                    before_write: Callable[[list[str]], None] | None = None) -> tuple[list[str], list[str]]:
    """Every node lets the app's role (``url``'s, pointed at the pooler) through to its database. Idempotent.

    Each node is judged by what it does, not by its file: the app's role logs in through that node alone.
    For a node that refuses it, ``verifier()`` (called once, only then) goes into its auth_file, then
    ``RELOAD`` and the same login again, which must now pass (else DatabaseError: e.g. the server's verifier
    is not the replica's any more). A node whose file was written but never reloaded is reloaded now.
    ``before_write(names)`` runs before any file is touched (the caller journals which nodes it may change).
    Returns (what happened per node, the nodes written)."""
    role = url_user(url)
    first = each(pooler, timeout, lambda a: check_app_login(pooler, app_url(pooler, url, a.node), timeout=timeout,
                                                            node=a.node))
    for r in first:
        if isinstance(r, BaseException) and not isinstance(r, RunbookError):
            raise r
    refused = [n for n, r in zip(pooler.nodes, first) if isinstance(r, BaseException)]
    if not refused:
        return [f"{n.name}: admits {role} already" for n in pooler.nodes], []
    missing = [n.name for n in refused if not n.auth_file]
    if missing:
        raise PreflightError(f"pooler node(s) {', '.join(missing)} refuse the app's role and the outputs name no "
                             "auth_file tern may add it to: add the role to their auth_file, or use --switch url")
    secret = verifier()
    names = {n.name for n in refused}
    if before_write is not None:
        before_write(sorted(names))

    def one(admin: Admin) -> str:
        node = admin.node
        if node.name not in names:
            return f"{node.name}: admits {role} already"
        how = put_auth(host_for(node), node.auth_file, role, secret, timeout=command_timeout)
        admin.command("RELOAD")
        check_app_login(pooler, app_url(pooler, url, node), timeout=timeout, node=node)
        return f"{node.name}: {role}'s verifier {how} in {node.auth_file}, reloaded, admits {role}"

    results = each(pooler, timeout, one)
    _raise_first(results)
    return results, sorted(names)


def drop_app_auth(pooler: Pooler, role: str, names: Sequence[str], *, timeout: float,
                  command_timeout: float = 60.0) -> list[str]:
    """``role``'s line out of the auth_file of the nodes ``names`` (those tern wrote), each reloaded. A node
    whose admin console does not answer is left to read its file when it starts again (PgBouncer reads it
    then); a command channel that fails raises."""
    def one(admin: Admin) -> str:
        node = admin.node
        if node.name not in names or not node.auth_file:
            return f"{node.name}: untouched"
        how = remove_auth(host_for(node), node.auth_file, role, timeout=command_timeout)
        try:
            admin.command("RELOAD")
        except DatabaseError as exc:
            if "cannot reach its admin console" not in str(exc):
                raise
            return f"{node.name}: {role} {how} (not running: it reads the file when it starts)"
        return f"{node.name}: {role} {how}, reloaded"

    results = each(pooler, timeout, one)
    _raise_first(results)
    return results
