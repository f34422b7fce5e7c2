"""What only the RDS API, or Aurora's ``rds_superuser``, can do to the hop-2 target: one adapter.

Aurora has no superuser. Its master user (contract ``aurora.master_user``) is a member of
``rds_superuser``: it creates roles, databases and allow-listed extensions, and on Aurora it may
create subscriptions, but it cannot ``ALTER SYSTEM``, restart the server or copy its files.
Those go through the RDS API (parameter group, reboot, cluster snapshots).

The sandbox's Aurora is a PostgreSQL 15 cluster whose master role is ``rds_superuser``-like, not a
superuser; PostgreSQL 15 keeps ``CREATE SUBSCRIPTION`` for superusers. Its stand-in for the RDS API
(contract ``aurora.api``, kind ``local``) is the node's own superuser over its unix socket, and it
runs exactly what the RDS API or Aurora's engine would let tern do, nothing else:

==========================  ===========================================  ====================================
method                      sandbox (``local``)                          AWS (``rds``)
==========================  ===========================================  ====================================
``subscription_statement``  psql as the node's superuser, over socket    the master user
``query``                   psql as the node's superuser, read-only      the master user, read-only
``set_parameters``          ``ALTER SYSTEM`` + reload                    ``modify_db_cluster_parameter_group``
``reboot``                  ``pg_ctl`` stop (fast) and start             ``reboot_db_instance`` (writer)
``snapshot``                ``pg_basebackup`` beside the data directory  ``create_db_cluster_snapshot``
``allowed_extensions``      Aurora PostgreSQL 15's allow-list            the same
==========================  ===========================================  ====================================

The orchestration gets one with :func:`aurora_api_for` and never knows which it has.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from psycopg import sql as _sql

from .. import contract
from ..errors import ConfigError, ContractError, DatabaseError, RunbookError
from ..polling import wait_until
from ..redact import redact, register_secret

log = logging.getLogger(__name__)

# Aurora PostgreSQL 15's extension allow-list (``SHOW rds.extensions``; AWS's "Extension versions for
# Amazon Aurora PostgreSQL" release notes). Representative, not exhaustive: an extension missing here is
# refused, which errs on the side Aurora would. amcheck is on it (the source has it installed).
AURORA_PG15_EXTENSIONS = frozenset({
    "address_standardizer", "address_standardizer_data_us", "amcheck", "apg_plan_mgmt", "aurora_stat_utils",
    "autoinc", "aws_commons", "aws_lambda", "aws_ml", "aws_s3", "bloom", "bool_plperl", "btree_gin", "btree_gist",
    "citext", "cube", "dblink", "dict_int", "dict_xsyn", "earthdistance", "fuzzystrmatch", "hll", "hstore",
    "hstore_plperl", "insert_username", "intagg", "intarray", "ip4r", "isn", "jsonb_plperl", "lo", "log_fdw",
    "ltree", "moddatetime", "old_snapshot", "orafce", "pg_bigm", "pg_buffercache", "pg_cron", "pg_freespacemap",
    "pg_hint_plan", "pg_partman", "pg_prewarm", "pg_proctab", "pg_repack", "pg_similarity", "pg_stat_statements",
    "pg_tle", "pg_trgm", "pg_visibility", "pgaudit", "pgcrypto", "pglogical", "pgrouting", "pgrowlocks",
    "pgstattuple", "plperl", "plpgsql", "plprofiler", "plrust", "pltcl", "plv8", "postgis", "postgis_raster",
    "postgis_tiger_geocoder", "postgis_topology", "postgres_fdw", "prefix", "rdkit", "refint", "seg", "sslinfo",
    "tablefunc", "tcn", "tds_fdw", "tsm_system_rows", "tsm_system_time", "unaccent", "uuid-ossp", "vector",
})

SUBSCRIPTION_COMMANDS = ("CREATE SUBSCRIPTION", "ALTER SUBSCRIPTION", "DROP SUBSCRIPTION")
QUERY_COMMANDS = ("SELECT", "WITH", "TABLE", "VALUES")
PARAMETER_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)?$")
RELOAD_TIMEOUT = 10.0       # the postmaster re-reads its configuration within a moment of SIGHUP
RDS_MODIFY_BATCH = 20       # modify_db_cluster_parameter_group takes at most 20 parameters a call


# -- the statement filter ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Statement:
    """One SQL statement: its text (without the final ``;``), its first two words (upper case, outside
    comments and literals) and the string literals it holds, in order."""

    text: str
    words: tuple[str, ...]
    literals: tuple[str, ...]

    @property
    def command(self) -> str:
        return " ".join(self.words)


_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")


def parse_single_statement(sql: str) -> Statement:
    """Lex ``sql`` as PostgreSQL and psql do and return its one statement.

    Raises :class:`ConfigError` (without echoing the SQL: it may hold a password) for more than one
    statement, for a backslash or a ``:name`` outside literals (psql would run it as a meta-command or
    substitute a variable), and for an unterminated literal or comment.

    >>> s = parse_single_statement("/* x; */ drop  subscription -- y;\\n IF EXISTS s;")
    >>> s.command, s.text
    ('DROP SUBSCRIPTION', '/* x; */ drop  subscription -- y;\\n IF EXISTS s')
    >>> parse_single_statement("SELECT 1; SELECT 2")
    Traceback (most recent call last):
    ...
    runbook.errors.ConfigError: one SQL statement expected, got 2
    """
    statements: list[tuple[str, str, list[str]]] = []   # (text, skeleton, literals)
    text, skeleton, literals = [], [], []
    i, n = 0, len(sql)

    def cut() -> None:
        statements.append(("".join(text), "".join(skeleton), list(literals)))
        text.clear(), skeleton.clear(), literals.clear()

    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == ";":
            cut()
            i += 1
            continue
        if c == "\\":
            raise ConfigError("a backslash outside a string literal is not allowed (psql would run it as a "
                              "meta-command)")
        if c == ":" and nxt == ":":
            text.append("::"), skeleton.append("::")
            i += 2
            continue
        if c == ":" and nxt and (nxt.isalpha() or nxt in "_'\"{"):
            raise ConfigError("':name' outside a string literal is not allowed (psql variable syntax)")
        if c == "-" and nxt == "-":
            end = sql.find("\n", i)
            end = n if end < 0 else end
            text.append(sql[i:end]), skeleton.append(" ")
            i = end
            continue
        if c == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise ConfigError("unterminated /* comment */ in the SQL")
            text.append(sql[i:j]), skeleton.append(" ")
            i = j
            continue
        if c == "'":
            escape = i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] in "_$"))
            j, value = i + 1, []
            while True:
                if j >= n:
                    raise ConfigError("unterminated string literal in the SQL")
                ch = sql[j]
                if escape and ch == "\\" and j + 1 < n:
                    value.append(sql[j:j + 2])
                    j += 2
                elif ch == "'" and sql[j + 1:j + 2] == "'":
                    value.append("'")
                    j += 2
                elif ch == "'":
                    j += 1
                    break
                else:
                    value.append(ch)
                    j += 1
            text.append(sql[i:j]), skeleton.append(" '' "), literals.append("".join(value))
            i = j
            continue
        if c == '"':
            j = i + 1
            while True:
                end = sql.find('"', j)
                if end < 0:
                    raise ConfigError("unterminated quoted identifier in the SQL")
                if sql[end + 1:end + 2] == '"':
                    j = end + 2
                    continue
                break
            text.append(sql[i:end + 1]), skeleton.append(' "" ')
            i = end + 1
            continue
        if c == "$" and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_$")):
            m = _DOLLAR_TAG.match(sql, i)
            if m:
                close = sql.find(m.group(0), m.end())
                if close < 0:
                    raise ConfigError("unterminated dollar-quoted string in the SQL")
                end = close + len(m.group(0))
                text.append(sql[i:end]), skeleton.append(" '' "), literals.append(sql[m.end():close])
                i = end
                continue
        text.append(c), skeleton.append(c)
        i += 1
    cut()
    real = [s for s in statements if s[1].strip()]
    if len(real) != 1:
        raise ConfigError(f"one SQL statement expected, got {len(real)}")
    body, skel, lits = real[0]
    words = tuple(w.upper() for w in re.findall(r"[A-Za-z_]+", skel)[:2])
    return Statement(body.strip(), words, tuple(lits))


def subscription_statement_of(sql: str) -> Statement:
    """The one ``CREATE|ALTER|DROP SUBSCRIPTION`` statement in ``sql``, or :class:`ConfigError`.

    Every password in a ``CONNECTION '...'`` is registered for redaction first.

    >>> subscription_statement_of("create subscription s connection 'password=pw' publication p").command
    'CREATE SUBSCRIPTION'
    >>> subscription_statement_of("DROP TABLE orders")
    Traceback (most recent call last):
    ...
    runbook.errors.ConfigError: only CREATE/ALTER/DROP SUBSCRIPTION may run through the Aurora API, not DROP TABLE
    """
    try:
        statement = parse_single_statement(sql)
    except ConfigError as exc:
        raise ConfigError(f"refusing a subscription statement: {exc}") from None
    for literal in statement.literals:
        _register_conninfo_secret(literal)
    if statement.command not in SUBSCRIPTION_COMMANDS:
        raise ConfigError("only CREATE/ALTER/DROP SUBSCRIPTION may run through the Aurora API, "
                          f"not {statement.command or 'an empty statement'}")
    return statement


def read_only_query_of(sql: str) -> Statement:
    """The one ``SELECT``/``WITH``/``TABLE``/``VALUES`` statement in ``sql``, or :class:`ConfigError`."""
    statement = parse_single_statement(sql)
    if not statement.words or statement.words[0] not in QUERY_COMMANDS:
        raise ConfigError(f"only a read-only query ({', '.join(QUERY_COMMANDS)}) may run through the Aurora API's "
                          f"query(), not {statement.command or 'an empty statement'}")
    return statement


def _register_conninfo_secret(literal: str) -> None:
    """A literal that is a connection string: register its password so that no error shows it."""
    if "password" not in literal.lower() and "://" not in literal:
        return
    from psycopg.conninfo import conninfo_to_dict

    try:
        password = conninfo_to_dict(literal.replace("\\'", "'")).get("password")
    except Exception:  # noqa: BLE001 - not a valid conninfo: redact()'s patterns still mask password=...
        return
    register_secret(str(password) if password is not None else None)


def _timeout_ms(timeout: float) -> int:
    return max(1, int(timeout * 1000))


# -- the interface -----------------------------------------------------------------------------------

class AuroraApi(ABC):
    """What only the RDS API (or Aurora's ``rds_superuser``) can do to the Aurora cluster.

    Contract: every method returns within its ``timeout`` or raises :class:`~runbook.errors.TimeoutExpired`;
    nothing logs or raises a secret (a password in a statement is masked in every error). Statements are
    refused (:class:`~runbook.errors.ConfigError`, nothing run) before anything reaches the server.
    """

    #: the TLS mode a client (e.g. the reverse subscription) uses to reach the writer: AWS forces TLS
    #: (``rds.force_ssl``); the sandbox's stand-in has no certificate
    sslmode: str = "require"

    name = "aurora"

    @abstractmethod
    def subscription_statement(self, sql: str, database: str, *, timeout: float = 120.0) -> None:
        """Run one ``CREATE SUBSCRIPTION`` / ``ALTER SUBSCRIPTION`` / ``DROP SUBSCRIPTION`` in ``database``.

        Anything else (another command, a second statement) raises ConfigError and runs nothing. On AWS
        it runs as the master user (Aurora lets ``rds_superuser`` create subscriptions); in the sandbox as
        the node's superuser (PostgreSQL 15 lets only a superuser). The statement runs outside a
        transaction block (``CREATE SUBSCRIPTION`` creating a slot requires it)."""

    @abstractmethod
    def query(self, sql: str, database: str, *, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Rows of one read-only query (``SELECT``/``WITH``/``TABLE``/``VALUES``), as JSON values
        (LSNs and timestamps as text), in a read-only transaction: tern's own catalog queries that the
        master role may not run as itself (e.g. ``pg_replication_origin_progress()``, revoked from public).
        Not for user input: in the sandbox it runs as a superuser."""

    @abstractmethod
    def set_parameters(self, params: Mapping[str, str]) -> bool:
        """Set server parameters (Aurora names, e.g. ``rds.logical_replication``); dynamic ones take effect
        now. Returns whether a reboot is still needed for some setting to take effect (it never reboots)."""

    @abstractmethod
    def reboot(self, timeout: float) -> None:
        """Restart the writer and return once it accepts connections (pending parameters applied)."""

    @abstractmethod
    def snapshot(self, label: str, timeout: float) -> str:
        """Take a snapshot of the whole cluster named by ``label`` and wait for it; returns its identifier
        (a path in the sandbox). A completed snapshot with that label is not taken again."""

    @abstractmethod
    def snapshot_exists(self, label: str) -> bool:
        """Whether a completed snapshot with ``label`` exists."""

    def allowed_extensions(self) -> set[str]:
        """Aurora PostgreSQL 15's extension allow-list; the sandbox refuses the others as Aurora does."""
        return set(AURORA_PG15_EXTENSIONS)

    def create_extension(self, name: str, database: str, *, schema: str | None = None,
                         timeout: float = 120.0) -> None:
        """``CREATE EXTENSION IF NOT EXISTS`` for an allow-listed extension, as Aurora's master may (the
        sandbox's master, no superuser, may create only trusted ones itself). Others: ConfigError."""
        if name not in self.allowed_extensions():
            raise ConfigError(f"extension {name!r} is not on Aurora PostgreSQL 15's allow-list")
        statement = _sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(_sql.Identifier(name))
        if schema:
            statement += _sql.SQL(" SCHEMA {}").format(_sql.Identifier(schema))
        self._run_privileged(statement.as_string(None), database, timeout=timeout)

    @abstractmethod
    def _run_privileged(self, statement: str, database: str, *, timeout: float) -> None:
        """Run one statement already checked by the caller (never caller-supplied SQL)."""


def aurora_api_for(aurora: contract.Aurora, **kwargs: Any) -> AuroraApi:
    """The implementation named by the contract's ``aurora.api`` (``local``: the sandbox, ``rds``: AWS)."""
    api = aurora.api
    if api is None:
        raise ContractError("aurora.api is missing from the outputs (written before it existed): rebuild the "
                            "sandbox (`invoke sandbox.down`, then `invoke sandbox.up`) or run `pulumi up`")
    if api.kind == "local":
        return LocalAuroraApi(aurora, **kwargs)
    return RdsAuroraApi(aurora, **kwargs)


# -- the sandbox's stand-in ---------------------------------------------------------------------------

# Aurora parameters the stand-in knows how to play; any other rds.* parameter is refused
LOCAL_TRANSLATIONS: dict[str, dict[str, tuple[str, str]]] = {
    "rds.logical_replication": {"1": ("wal_level", "logical"), "0": ("wal_level", "replica")},
}


class LocalAuroraApi(AuroraApi):
    """The sandbox's RDS stand-in: the Aurora node's superuser over its unix socket (``aurora.api.kind == local``)."""

    sslmode = "prefer"

    def __init__(self, aurora: contract.Aurora, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from ..postgres import PgHost
        from .local_host import LocalHost

        api = aurora.api
        if not isinstance(api, contract.AuroraLocalApi):
            raise ContractError("aurora.api: the local stand-in needs kind local")
        self.aurora = aurora
        self.pg = PgHost(LocalHost(self.name, os_user=api.os_user), bin_dir=api.bin_dir, data_dir=api.data_dir,
                         socket_dir=api.socket_dir, port=api.port, database=aurora.database,
                         superuser=api.superuser, log_file=api.log_file)
        self.sleep, self.clock = sleep, clock

    def _psql(self, script: str, database: str, *, timeout: float) -> str:
        try:
            return self.pg.psql(script, database=database, timeout=timeout + 10)
        except RunbookError as exc:
            # psql echoes the failing line (a CONNECTION string with its password): mask it
            raise type(exc)(redact(exc)) from None

    def subscription_statement(self, sql: str, database: str, *, timeout: float = 120.0) -> None:
        statement = subscription_statement_of(sql)
        log.info("aurora stand-in: %s in %s", statement.command, database)
        self._psql(f"SET statement_timeout = {_timeout_ms(timeout)};\n{statement.text};\n", database, timeout=timeout)

    def query(self, sql: str, database: str, *, timeout: float = 60.0) -> list[dict[str, Any]]:
        import json

        statement = read_only_query_of(sql)
        out = self._psql(f"SET statement_timeout = {_timeout_ms(timeout)};\nBEGIN READ ONLY;\n"
                         f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({statement.text}\n) t;\nCOMMIT;\n",
                         database, timeout=timeout)
        return json.loads(out.strip() or "[]")

    def _run_privileged(self, statement: str, database: str, *, timeout: float) -> None:
        self._psql(f"SET statement_timeout = {_timeout_ms(timeout)};\n{statement};\n", database, timeout=timeout)

    def set_parameters(self, params: Mapping[str, str]) -> bool:
        from ..postgres import literal

        settings: dict[str, str] = {}
        for name, value in params.items():
            if not PARAMETER_NAME.match(name):
                raise ConfigError(f"not a parameter name: {name!r}")
            if name.startswith("rds."):
                played = LOCAL_TRANSLATIONS.get(name, {}).get(str(value))
                if played is None:
                    raise ConfigError(f"the sandbox's Aurora stand-in does not emulate {name} = {value!r}")
                name, value = played
            settings[name] = str(value)
        if settings:
            before = self._conf_load_time()
            self._psql("".join(f"ALTER SYSTEM SET {n} = {literal(v)};\n" for n, v in settings.items())
                       + "SELECT pg_reload_conf();\n", "postgres", timeout=30)
            # a new session forks from the postmaster: once it shows a newer load time, the reload happened
            wait_until(lambda: self._conf_load_time() != before, timeout=RELOAD_TIMEOUT, interval=0.1,
                       what="the Aurora stand-in to reload its configuration", clock=self.clock, sleep=self.sleep)
        row = self.pg.query_one("SELECT coalesce(bool_or(pending_restart), false) AS pending FROM pg_settings")
        return bool(row["pending"])

    def _conf_load_time(self) -> str:
        return self.pg.query_one("SELECT pg_conf_load_time()::text AS loaded_at")["loaded_at"]

    def reboot(self, timeout: float) -> None:
        started = self.clock()
        self.pg.stop(mode="fast", timeout=max(1.0, timeout / 2))
        self.pg.start(timeout=max(1.0, timeout - (self.clock() - started)))

        def ready() -> bool:
            res = self.pg.host.run([f"{self.pg.bin_dir}/pg_isready", "-h", self.pg.socket_dir, "-p", str(self.pg.port)],
                                   timeout=10, check=False)
            return res.returncode == 0

        wait_until(ready, timeout=max(1.0, timeout - (self.clock() - started)), interval=0.1,
                   what="the Aurora stand-in to accept connections", clock=self.clock, sleep=self.sleep)

    def _snapshots(self):
        from .snapshots import LocalSnapshots

        return LocalSnapshots(self.pg)

    def snapshot(self, label: str, timeout: float) -> str:
        snaps = self._snapshots()
        if snaps.exists(label):
            return snaps.path(label)
        return snaps.create(label, timeout=timeout)

    def snapshot_exists(self, label: str) -> bool:
        return self._snapshots().exists(label)


# -- AWS ----------------------------------------------------------------------------------------------

class RdsAuroraApi(AuroraApi):
    """The real cluster: the RDS API for the control plane, the master user for SQL (``kind == rds``)."""

    def __init__(self, aurora: contract.Aurora, *, rds=None, connect: Callable[..., Any] | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 poll_interval: float = 10.0, connect_timeout: float = 10.0) -> None:
        api = aurora.api
        if not isinstance(api, contract.AuroraRdsApi):
            raise ContractError("aurora.api: the RDS adapter needs kind rds")
        if rds is None:
            import boto3

            rds = boto3.client("rds", region_name=api.region)
        if connect is None:
            from ..pg import connect
        self.aurora, self.api, self.rds, self._connect = aurora, api, rds, connect
        self.sleep, self.clock, self.poll_interval, self.connect_timeout = sleep, clock, poll_interval, connect_timeout

    # SQL as the master user
    def _url(self, database: str) -> str:
        from ..pg import make_url
        from ..secrets import resolve

        a = self.aurora
        # rds.force_ssl=1 on the cluster (infra/aurora.py): TLS or nothing
        return make_url(a.writer_endpoint, a.port, a.master_user, resolve(a.master_password), database) + \
            "?sslmode=require"

    def _execute(self, statement: str, database: str, *, timeout: float, purpose: str,
                 read_only: bool = False) -> Any:
        options = f"-c statement_timeout={_timeout_ms(timeout)}"
        if read_only:
            options += " -c default_transaction_read_only=on"
        try:
            with self._connect(self._url(database), purpose=purpose, timeout=self.connect_timeout,
                               options=options) as conn:
                cur = conn.execute(statement)
                return cur.fetchone() if cur.description else None
        except RunbookError as exc:
            raise type(exc)(redact(exc)) from None
        except Exception as exc:  # noqa: BLE001 - psycopg's errors quote the statement: mask, keep the class name
            raise DatabaseError(f"aurora: {purpose} failed: {type(exc).__name__}: {redact(exc).strip()}") from None

    def subscription_statement(self, sql: str, database: str, *, timeout: float = 120.0) -> None:
        statement = subscription_statement_of(sql)
        log.info("aurora: %s in %s as the master user", statement.command, database)
        self._execute(statement.text, database, timeout=timeout, purpose="aurora-subscription")

    def query(self, sql: str, database: str, *, timeout: float = 60.0) -> list[dict[str, Any]]:
        import json

        statement = read_only_query_of(sql)
        row = self._execute(f"SELECT coalesce(json_agg(t), '[]'::json) FROM ({statement.text}\n) t", database,
                            timeout=timeout, purpose="aurora-query", read_only=True)
        value = row[0] if row else []
        return json.loads(value) if isinstance(value, str) else list(value)

    def _run_privileged(self, statement: str, database: str, *, timeout: float) -> None:
        self._execute(statement, database, timeout=timeout, purpose="aurora-extension")

    # the control plane
    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.rds, operation)(**kwargs)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise RunbookError(f"RDS {operation} failed: {err.get('Code', '?')}: {redact(err.get('Message', ''))}",
                               operation=operation) from None
        except BotoCoreError as exc:
            raise RunbookError(f"RDS {operation} failed: {redact(exc)}", operation=operation) from None

    def _writer(self) -> dict[str, Any]:
        clusters = self._call("describe_db_clusters", DBClusterIdentifier=self.api.cluster_identifier)["DBClusters"]
        members = clusters[0].get("DBClusterMembers", []) if clusters else []
        for member in members:
            if member.get("IsClusterWriter"):
                return member
        raise RunbookError(f"Aurora cluster {self.api.cluster_identifier} has no writer instance")

    def _parameters(self, names: set[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        marker = None
        while True:
            kwargs: dict[str, Any] = {"DBClusterParameterGroupName": self.api.parameter_group}
            if marker:
                kwargs["Marker"] = marker
            page = self._call("describe_db_cluster_parameters", **kwargs)
            for p in page.get("Parameters", []):
                if p.get("ParameterName") in names:
                    found[p["ParameterName"]] = p
            marker = page.get("Marker")
            if not marker:
                return found

    def set_parameters(self, params: Mapping[str, str]) -> bool:
        wanted = {name: str(value) for name, value in params.items()}
        current = self._parameters(set(wanted))
        unknown = sorted(set(wanted) - set(current))
        if unknown:
            raise ConfigError(f"parameter group {self.api.parameter_group} has no parameter {', '.join(unknown)}")
        fixed = sorted(n for n in wanted if current[n].get("IsModifiable") is False)
        if fixed:
            raise ConfigError(f"Aurora does not let these parameters be modified: {', '.join(fixed)}")
        changes = [{"ParameterName": n, "ParameterValue": v,
                    "ApplyMethod": "pending-reboot" if current[n].get("ApplyType") == "static" else "immediate"}
                   for n, v in wanted.items() if current[n].get("ParameterValue") != v]
        for i in range(0, len(changes), RDS_MODIFY_BATCH):
            self._call("modify_db_cluster_parameter_group", DBClusterParameterGroupName=self.api.parameter_group,
                       Parameters=changes[i:i + RDS_MODIFY_BATCH])
        static_changed = any(c["ApplyMethod"] == "pending-reboot" for c in changes)
        return static_changed or self._writer().get("DBClusterParameterGroupStatus") == "pending-reboot"

    def reboot(self, timeout: float) -> None:
        writer = self._writer()["DBInstanceIdentifier"]
        self._call("reboot_db_instance", DBInstanceIdentifier=writer)
        seen = {"status": "rebooting", "parameters": "?"}

        def rebooted() -> bool:
            inst = self._call("describe_db_instances", DBInstanceIdentifier=writer)["DBInstances"][0]
            seen["status"] = inst.get("DBInstanceStatus", "?")
            if seen["status"] != "available":
                return False
            # the reboot is over once the writer runs the group's values (no change left pending-reboot)
            seen["parameters"] = self._writer().get("DBClusterParameterGroupStatus", "in-sync")
            return seen["parameters"] == "in-sync"

        wait_until(rebooted, timeout=timeout, interval=self.poll_interval, what=f"Aurora writer {writer} to reboot",
                   last=lambda: f"status {seen['status']}, parameters {seen['parameters']}",
                   clock=self.clock, sleep=self.sleep)

    def _snapshots(self):
        from .aws_snapshots import AuroraSnapshots

        return AuroraSnapshots(self.api.cluster_identifier, rds=self.rds, sleep=self.sleep,
                               poll_interval=self.poll_interval)

    def snapshot(self, label: str, timeout: float) -> str:
        return self._snapshots().create(label, timeout=timeout)

    def snapshot_exists(self, label: str) -> bool:
        return self._snapshots().exists(label)
