"""``invoke replicate-aurora``: set up and start replication from the EC2 leader into Aurora.

Journaled steps (running it again resumes, or finds everything in place); the engine-specific ones go
through the engine interface (:mod:`.engines`), and the engine is recorded in the run's context (``engine``)
for ``invoke status`` and ``invoke failover-aurora``.

1. ``preflight``: the risk register (:mod:`.risks`; DMS adds its own: task settings, endpoints, LOB columns,
   JSON(B) above 100 KB, types it carries as text, triggers, DDL capture); a ``block`` finding refuses,
   nothing changed.
2. ``prepare_leader``: tern's schema and sentinel table, the replication role, the publication (native only).
3. ``aurora_role``: the app's role on Aurora (same password verifier), owner of its database.
4. ``schema``: tables, sequences, types, functions, views (and, for DMS, primary keys: its "do nothing" target
   preparation needs them before the full load), as the app's role; autovacuum off on them for the copy.
5. native ``subscribe`` / DMS ``start_task``: :meth:`.engines.Engine.start` - the subscription on Aurora; or the
   DMS source endpoint repointed at the leader (never the first instance) and the task started
   (``start-replication`` the first time, ``resume-processing`` after).
6. native ``initial_sync`` / DMS ``full_load``: :meth:`.engines.Engine.wait_synchronised`, bounded by
   ``restore_timeout``.
7. ``schema_after``: whatever the copy's finisher (:class:`IndexBuilder`: each table's primary key, indexes,
   statistics and foreign keys as its copy ends) left: keys, indexes, foreign keys, triggers; autovacuum back.
8. DMS only, ``validation``: DMS's per-table validation counts (failed, suspended records) - refused on any.
9. ``ddl_guard``: DDL on the leader is refused from now on (an event trigger), since neither
   engine replicates DDL.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from psycopg import sql

from .. import measure
from ..adapters import app_for
from ..adapters.aurora import aurora_api_for
from ..contract import Outputs
from ..errors import ConfigError, PreflightError, Refused, RunbookError, StepError
from ..failover.context import Context
from ..journal import Journal, RunLock
from ..secrets import resolve
from ..settings import Settings
from ..steps import Runner, Step
from . import ENGINES, engines, native, risks, schema
from .engines import STATUS_KEYS  # noqa: F401 - the status keys' historical home
from .leader import aurora_master_url, leader, leader_url

KIND = "replicate-aurora"
log = logging.getLogger(__name__)


def _leader(ctx: Context):
    return ctx.pg(ctx.data["leader"])


def _db(ctx: Context) -> str:
    return ctx.replica(ctx.data["leader"]).database


def preflight(ctx: Context) -> dict[str, Any]:
    r = leader(ctx.app, ctx.outputs)
    pg = ctx.pg(r.name)
    if pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        raise PreflightError(f"{r.name} is still a standby: run failover-ec2 first")
    api = aurora_api_for(ctx.outputs.aurora)
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        has_data = schema.has_tables(master)
    findings = risks.register(pg, r.database, allowed_extensions=api.allowed_extensions(),
                              replica_identity_full=bool(ctx.data.get("replica_identity_full")),
                              target_has_data=has_data, max_lag_bytes=ctx.settings.max_lag_bytes)
    findings = engines.for_run(ctx).risks(ctx, pg, r.database, findings)
    blocks = risks.blocking(findings)
    register = [f.to_json() for f in findings]
    if blocks:
        raise PreflightError("refused: " + "; ".join(f"{f.risk}: {', '.join(f.objects[:5])} - {f.action}"
                                                     for f in blocks), register=register)
    if ctx.data.get("replica_identity_full"):
        for f in findings:
            if f.risk.startswith("tables without a primary key"):
                pg.psql(native.BYPASS_GUARD + "".join(f"ALTER TABLE {_qualified(t)} REPLICA IDENTITY FULL;\n"
                                                      for t in f.objects), database=r.database)
    slots = [row["s"] for row in pg.query("SELECT slot_name AS s FROM pg_replication_slots WHERE slot_type = 'logical'")]
    return {"leader": r.name, "risk_register": register, "slots_before": slots,
            "detail": f"leader {r.name}; {len(findings)} findings, none blocking"}


def _qualified(name: str) -> str:
    schema_name, _, table = name.partition(".")
    return f'"{schema_name}"."{table}"'


def prepare_leader(ctx: Context) -> dict[str, Any]:
    password = resolve(ctx.outputs.credentials.replication_password)
    what = native.prepare_leader(_leader(ctx), _db(ctx), schema.app_role(ctx.source_url()), password,
                                 publication=engines.for_run(ctx).publishes)
    return {"detail": what}


def aurora_role(ctx: Context) -> dict[str, Any]:
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        what = schema.copy_role(_leader(ctx), _db(ctx), master, schema.app_role(ctx.source_url()),
                                ctx.outputs.aurora.master_user)
    return {"detail": what}


def copy_schema(ctx: Context) -> dict[str, Any]:
    api = aurora_api_for(ctx.outputs.aurora)
    pre, extensions, skipped = schema.without_extensions(schema.dump(_leader(ctx), _db(ctx), "pre-data"),
                                                         api.allowed_extensions())
    keys, _ = schema.split_post_data(schema.dump(_leader(ctx), _db(ctx), "post-data"))
    role = schema.app_role(ctx.source_url())
    # native: each table's primary key is built when its copy ends (IndexBuilder), as pgcopydb does - a copy
    # into a table without an index is faster than one that maintains it row by row; DMS needs them first
    keys_now = engines.for_run(ctx).name != "native"
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        if schema.has_tables(master):
            return {"detail": "Aurora already has the tables: schema copy skipped"}
        for name, in_schema in extensions:
            api.create_extension(name, ctx.outputs.aurora.database, schema=in_schema)
        schema.restore(master, pre, role, "schema (tables, types, functions, views)")
        if keys_now:
            schema.restore(master, keys, role, "primary keys")
        else:   # partitioned tables and partitions keep their keys first (the finisher sees only the roots)
            schema.restore(master, schema.keys_of(keys, schema.partitioned_tables(_leader(ctx), _db(ctx))), role,
                           "primary keys of partitioned tables")
        schema.set_autovacuum(master, role, enabled=False)   # on again at schema_after
    note = f"; extensions not offered by Aurora, not created: {', '.join(skipped)}" if skipped else ""
    what = "primary keys" if keys_now else "primary keys as each table's copy ends"
    return {"skipped_extensions": skipped, "detail": f"tables, sequences, types, functions, views; {what}" + note}


def start(ctx: Context) -> dict[str, Any]:
    """Start replicating (:meth:`.engines.Engine.start`: idempotent, first time or again)."""
    return engines.for_run(ctx).start(ctx)


def initial_sync(ctx: Context) -> dict[str, Any]:
    """Every table copied, changes streaming (:meth:`.engines.Engine.wait_synchronised`), bounded.

    Native engine: each table's indexes are built as soon as its copy ended, while the other tables
    still copy (as pgcopydb does); what this misses, schema_after builds."""
    engine = engines.for_run(ctx)
    builder = IndexBuilder(ctx) if engine.name == "native" else None
    if builder is not None:
        builder.start()
    try:
        result = engine.wait_synchronised(ctx, ctx.settings.restore_timeout)
    except BaseException:
        if builder is not None:   # the sync did not end: nothing to finish, what it builds is cancelled
            try:
                builder.finish(wait=0)
            except StepError as exc:
                log.warning("%s", exc)   # schema_after refuses to start beside it (stop_finishers)
        raise
    if builder is not None:
        # bounded (restore_timeout more), then cancelled: the step never ends with the finisher still building
        builder.finish(wait=ctx.settings.restore_timeout)
    result.update(measure.volume(_leader(ctx), _db(ctx), prefix="initial_sync_"))   # for `invoke estimate`
    if builder is not None and (builder.built or builder.primary_keys or builder.analyzed or builder.foreign_keys):
        result["detail"] = result.get("detail", "") + (
            f"; as each table's copy ended: {builder.primary_keys} primary keys and {builder.built} indexes built, "
            f"{builder.analyzed} tables analyzed, "
            f"{builder.foreign_keys} foreign keys added"
            + (f" ({len(builder.failed)} left to schema_after: {builder.failed[0]})" if builder.failed else ""))
    return result


CONSTRAINT_TABLE = re.compile(r'ALTER TABLE (?:ONLY )?((?:"[^"]+"|[^\s."(]+)\.(?:"[^"]+"|[^\s"(]+))')
INDEX_TABLE = re.compile(r'\bON (?:ONLY )?((?:"[^"]+"|[^\s."(]+)\.(?:"[^"]+"|[^\s"(]+))')
REFERENCED_TABLE = re.compile(r'\bREFERENCES ((?:"[^"]+"|[^\s."(]+)\.(?:"[^"]+"|[^\s"(]+))')


def _table(match: re.Match) -> str:
    """``schema.table`` as pg_subscription_rel names it (no quotes)."""
    return ".".join(part.strip('"') for part in re.findall(r'"[^"]+"|[^.]+', match.group(1)))


FINISHER_CANCEL_SECONDS = 30.0   # after a finisher is cancelled, how long its statements get to stop


class Finisher:
    """A thread that builds on Aurora beside the initial copy (:class:`IndexBuilder`). Every one alive is
    known, and :func:`stop_finishers` cancels and joins them, bounded: ``schema_after`` never builds beside
    one (two sessions building the same key or index: one fails, or waits on the other's lock).

    ``finish`` (the copy ended: what started may end, then the thread does) or ``cancel`` (end now: the
    statements its tracked connections run on Aurora are cancelled)."""

    _live: set["Finisher"] = set()
    _live_lock = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name
        self._stop = threading.Event()         # the copy ended
        self._cancelled = threading.Event()    # end now
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()         # re-entrant: a worker opens a tracked connection under it
        self._open: set[Any] = set()           # its connections (cancelled by cancel())

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        with Finisher._live_lock:
            Finisher._live.add(self)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._run()
        finally:
            with Finisher._live_lock:
                Finisher._live.discard(self)

    def _run(self) -> None:
        raise NotImplementedError

    @contextmanager
    def tracked(self, opening: Any) -> Iterator[Any]:
        """``opening`` (a connection's context manager), its connection cancelled by :meth:`cancel`."""
        with opening as conn:
            with self._lock:
                self._open.add(conn)
            try:
                yield conn
            finally:
                with self._lock:
                    self._open.discard(conn)

    def cancel(self) -> None:
        self._cancelled.set()
        self._stop.set()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            try:
                conn.cancel_safe(timeout=5)
            except Exception:  # noqa: BLE001 - a closed or broken connection runs nothing
                pass

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=max(0.0, timeout))

    def finish(self, wait: float) -> None:
        """The copy ended: let what started end, for up to ``wait`` seconds, then cancel the rest. Never
        returns while the thread still lives (StepError)."""
        self._stop.set()
        if wait > 0:
            self.join(wait)
        stop_finishers([self])


def stop_finishers(finishers: list[Finisher] | None = None, timeout: float | None = None) -> None:
    """No finisher (``finishers``, default every one alive in this process) still builds on Aurora: each is
    cancelled and joined within ``timeout`` (``FINISHER_CANCEL_SECONDS``); one still alive then raises StepError."""
    timeout = FINISHER_CANCEL_SECONDS if timeout is None else timeout
    if finishers is None:
        with Finisher._live_lock:
            finishers = list(Finisher._live)
    live = [f for f in finishers if f.alive]
    for f in live:
        f.cancel()
    deadline = time.monotonic() + timeout
    for f in live:
        f.join(deadline - time.monotonic())
    still = sorted({f.name for f in live if f.alive})
    if still:
        raise StepError(f"{', '.join(still)} still building on Aurora {timeout:.0f}s after it was cancelled: "
                        "nothing else builds beside it (run the same command again)")


class IndexBuilder(Finisher):
    """Finishes each table on Aurora as soon as its initial copy is committed (state ``f``, ``s`` or ``r``),
    while the other tables still copy, as pgcopydb does: its primary key first (native: the copy ran
    without it, faster; from its own session, so that the apply's catch-up never waits behind other
    tables' indexes), then its secondary indexes and unique constraints
    (``INDEX_JOBS`` at once), then ``ANALYZE`` (Aurora has no statistics for a table filled by a copy:
    the app's first queries after the switch would be planned blind) and each foreign key whose two
    tables are indexed. Best effort: what it could not build is left to schema_after, which builds
    whatever is missing and reports what fails."""

    def __init__(self, ctx: Context) -> None:
        super().__init__("tern-index-builder")
        self.ctx = ctx
        keys, rest = schema.split_post_data(schema.dump(_leader(ctx), _db(ctx), "post-data"))
        self.head = schema.preamble(rest)
        self.role = schema.app_role(ctx.source_url())
        self.keys: dict[str, list[str]] = {}             # table -> its primary key (built first)
        self.pending: dict[str, list[str]] = {}          # table -> its index builds, not started
        self.foreign: list[tuple[str, str, str]] = []     # (table, referenced table, statement), not started
        for _kind, body in schema.entries(keys):
            m = CONSTRAINT_TABLE.search(body)
            if m:
                self.keys.setdefault(_table(m), []).append(body)
        for kind, body in schema.entries(rest):
            if kind == "INDEX":
                m = INDEX_TABLE.search(body)
            elif kind in ("FK CONSTRAINT", "CONSTRAINT") and "FOREIGN KEY" in body:   # pg_dump: FK CONSTRAINT
                m, ref = CONSTRAINT_TABLE.search(body), REFERENCED_TABLE.search(body)
                if m and ref:
                    self.foreign.append((_table(m), _table(ref), body))
                continue
            elif kind == "CONSTRAINT" and (" UNIQUE " in body or " EXCLUDE " in body):
                m = CONSTRAINT_TABLE.search(body)   # a unique constraint is an index build too
            else:
                continue
            if m:
                self.pending.setdefault(_table(m), []).append(body)
        self.built = 0
        self.primary_keys = 0
        self.analyzed = 0
        self.foreign_keys = 0
        self.failed: list[str] = []

    def _run(self) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        url, timeout = aurora_master_url(self.ctx.outputs), self.ctx.settings.connect_timeout
        local = threading.local()
        opened = ExitStack()   # every worker's connection, closed when the builds are done

        def run(body: str, what: str) -> bool:
            if self.cancelled:
                return False
            try:
                if not hasattr(local, "conn"):
                    with self._lock:
                        local.conn = opened.enter_context(self.tracked(native.master_connection(url, timeout)))
                    local.conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(
                        sql.Literal(INDEX_MAINTENANCE_WORK_MEM)))
                schema.restore(local.conn, self.head + body, self.role, what)
                return True
            except Exception as exc:  # noqa: BLE001 - best effort: schema_after builds what is missing
                if self.cancelled:
                    return False
                with self._lock:
                    self.failed.append(str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__)
                return False

        def build(body: str) -> None:
            if run(body, "index"):
                with self._lock:
                    self.built += 1

        def build_keys(bodies: list[str]) -> None:
            if self.cancelled:
                return
            # its own session: never queued behind indexes
            with self.tracked(native.master_connection(url, timeout)) as conn:
                conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(INDEX_MAINTENANCE_WORK_MEM)))
                for body in bodies:
                    for attempt in range(3):   # the sync waits on the key: a transient failure is tried again
                        if self.cancelled:
                            return
                        if schema.present(conn, body):
                            break
                        try:
                            schema.restore(conn, self.head + body, self.role, "primary key")
                            with self._lock:
                                self.primary_keys += 1
                            break
                        except Exception as exc:  # noqa: BLE001 - best effort: schema_after builds what is missing
                            if self.cancelled:
                                return
                            if attempt == 2:
                                with self._lock:
                                    self.failed.append(str(exc).strip().splitlines()[0] if str(exc)
                                                       else type(exc).__name__)
                            else:
                                time.sleep(0.5 * (attempt + 1))

        def analyze(table: str) -> None:
            ident = sql.Identifier(*table.split(".", 1)).as_string(None)
            if run(f"ANALYZE {ident};\n", "statistics"):
                with self._lock:
                    self.analyzed += 1

        def foreign_key(body: str) -> None:
            if run(body, "foreign key"):
                with self._lock:
                    self.foreign_keys += 1

        keying: dict[str, Future] = {}            # table -> its primary key (the apply's replica identity)
        indexing: dict[str, list[Future]] = {}   # table -> its index builds, once its key is there
        analyzing: dict[str, Future] = {}         # table -> its ANALYZE, once its indexes are built
        fks: list[Future] = []
        try:
            with self.tracked(native.master_connection(url, timeout)) as watch, \
                    ThreadPoolExecutor(max_workers=INDEX_JOBS, thread_name_prefix="tern-index") as pool, \
                    ThreadPoolExecutor(max_workers=1, thread_name_prefix="tern-keys") as key_pool:
                while not self.cancelled:   # cancelled: what is queued returns at once, what runs is cancelled
                    synced = self._stop.is_set()   # the sync ended: every table is copied (one more look)
                    states = native.table_states(watch)
                    # f: its copy is committed (the table-sync worker now catches up on the changes made
                    # meanwhile, and an UPDATE or DELETE there needs the key: it retries until the key is built)
                    for table in [t for t, st in states.items() if st in ("f", "s", "r") and t not in keying]:
                        keying[table] = key_pool.submit(build_keys, self.keys.pop(table, []))
                    for table in [t for t, f in keying.items() if f.done() and t not in indexing]:
                        indexing[table] = [pool.submit(build, body) for body in self.pending.pop(table, [])]
                    for table, futures in indexing.items():
                        if table not in analyzing and all(f.done() for f in futures):
                            analyzing[table] = pool.submit(analyze, table)
                    # a foreign key needs its two tables copied and their keys and unique indexes built (not
                    # their statistics: its validation is one anti-join, planned well enough without them)
                    indexed = {t for t, futures in indexing.items() if all(f.done() for f in futures)}
                    finished = {t for t, f in analyzing.items() if f.done()}
                    for fk in [fk for fk in self.foreign if fk[0] in indexed and fk[1] in indexed]:
                        self.foreign.remove(fk)
                        fks.append(pool.submit(foreign_key, fk[2]))
                    # done when the sync ended and what started for the copied tables is done (a table
                    # whose copy failed is not waited for: schema_after reports it)
                    if synced and set(keying) <= finished and not self.foreign_waiting(indexed) \
                            and all(f.done() for f in fks):
                        break
                    self._stop.wait(0.2)
        except Exception:  # noqa: BLE001 - best effort, as above
            pass
        finally:
            opened.close()

    def foreign_waiting(self, finished: set[str]) -> bool:
        """A foreign key not started whose two tables are ready for it (it starts at the next look)."""
        return any(child in finished and parent in finished for child, parent, _ in self.foreign)


def validation(ctx: Context) -> dict[str, Any]:
    """DMS's validation counts (failed and suspended records, per table): any refuses."""
    return engines.for_run(ctx).check_validation(ctx)


INDEX_JOBS = 2                    # indexes built at once on Aurora after the copy (as pgcopydb's --index-jobs)
INDEX_MAINTENANCE_WORK_MEM = "512MB"   # per index build (Aurora's default is 64 MB)


def schema_after(ctx: Context) -> dict[str, Any]:
    """Indexes (``INDEX_JOBS`` at once, each with ``INDEX_MAINTENANCE_WORK_MEM``), then foreign keys,
    triggers and the rest, in dump order, after the initial copy. Never beside a finisher of the copy
    still building (:func:`stop_finishers`: cancelled and joined, bounded, else this step fails)."""
    from concurrent.futures import ThreadPoolExecutor

    stop_finishers()
    keys, rest = schema.split_post_data(schema.dump(_leader(ctx), _db(ctx), "post-data"))
    role = schema.app_role(ctx.source_url())
    head = schema.preamble(rest)
    key_items = schema.entries(keys)   # first: a table in state r without its key stalls the whole apply
    items = schema.entries(rest)
    indexes = [(k, b) for k, b in items if k == "INDEX"]
    others = [(k, b) for k, b in items if k != "INDEX"]
    counts = {"done": 0, "skipped": 0}
    lock = threading.Lock()

    def apply(master, kind: str, body: str) -> None:
        for attempt in range(5):
            try:
                schema.restore(master, head + body, role, kind.lower())
                with lock:
                    counts["done"] += 1
            except Exception as exc:  # noqa: BLE001 - already there (a resumed run) is fine
                if "already exists" in str(exc):
                    with lock:
                        counts["skipped"] += 1
                elif "deadlock detected" in str(exc) and attempt < 4:
                    time.sleep(0.5 * (attempt + 1))   # the apply worker held the table: try again
                    continue
                else:
                    raise
            return

    def build(share: list[tuple[str, str]]) -> None:
        with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
            master.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(INDEX_MAINTENANCE_WORK_MEM)))
            for kind, body in share:
                if schema.present(master, body):   # built as its table's copy ended, or by an earlier run
                    with lock:
                        counts["skipped"] += 1
                    continue
                apply(master, kind, body)

    build(key_items)
    jobs = max(1, min(INDEX_JOBS, len(indexes)))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for f in [pool.submit(build, indexes[i::jobs]) for i in range(jobs)]:
            f.result()
    build(others)   # foreign keys need their referenced keys; triggers last, as the dump orders them
    analyzed = analyze_unanalyzed(ctx, role)
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        # copy_schema turned it off for the copy: back as on the leader
        schema.set_autovacuum(master, role, enabled=True, leader=schema.autovacuum_settings(_leader(ctx), _db(ctx)))
    return {"detail": f"{counts['done']} indexes, foreign keys and triggers created ({jobs} index builds at once)"
                      + (f", {counts['skipped']} already there" if counts["skipped"] else "")
                      + (f"; {analyzed} tables analyzed" if analyzed else "")}


def analyze_unanalyzed(ctx: Context, role: str) -> int:
    """``ANALYZE`` every table Aurora has no statistics for (those the copy's finisher did not reach, every
    table after a DMS full load): the app's first queries after the switch are planned on real figures."""
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        tables = master.execute("SELECT schemaname, relname FROM pg_stat_user_tables WHERE last_analyze IS NULL "
                                "AND last_autoanalyze IS NULL ORDER BY 1, 2").fetchall()
        for nsp, rel in tables:
            schema.restore(master, sql.SQL("ANALYZE {}").format(sql.Identifier(nsp, rel)).as_string(master), role,
                           "statistics")
    return len(tables)


def ddl_guard(ctx: Context) -> dict[str, Any]:
    native.install_guard(_leader(ctx), _db(ctx))
    return {"detail": "DDL on the leader is refused while replication runs (event trigger tern_ddl_guard)"}


def guard_installed(ctx: Context) -> bool:
    return bool(_leader(ctx).query("SELECT 1 FROM pg_event_trigger WHERE evtname = 'tern_ddl_guard' "
                                   "AND evtenabled <> 'D'", database=_db(ctx)))


def plan(engine: str = "native") -> list[Step]:
    if engine == "dms":
        replicate = [Step("start_task", "DMS: the source endpoint follows the leader; start the task "
                                        "(start-replication the first time, resume-processing after)", start),
                     Step("full_load", "DMS: full load of every table, then changes (CDC)", initial_sync)]
        checks = [Step("validation", "DMS: validation counts (failed, suspended records)", validation)]
    else:
        replicate = [Step("subscribe", "Aurora: the subscription", start),
                     Step("initial_sync", "initial copy of every table", initial_sync)]
        checks = []
    return [
        Step("preflight", "preflight: the risk register", preflight),
        Step("prepare_leader", "leader: replication role, tern's sentinel" + (", publication" if engine != "dms"
                                                                                else ""), prepare_leader),
        Step("aurora_role", "Aurora: the app's role and its database", aurora_role),
        Step("schema", "Aurora: the schema (before the copy)", copy_schema),
        *replicate,
        Step("schema_after", "Aurora: indexes, foreign keys, triggers (after the copy)", schema_after),
        *checks,
        Step("ddl_guard", "leader: refuse DDL while replication runs", ddl_guard, check=guard_installed),
    ]


def replicate_aurora(outputs: Outputs, settings: Settings, *, engine: str = "native", dry_run: bool = False,
                     replica_identity_full: bool = False,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "dms" and outputs.dms is None:
        raise ConfigError("engine dms needs the stack's DMS task (outputs.dms); the sandbox runs native")
    app = app_for(outputs.app)
    state_dir = Path(settings.state_dir)
    source = leader_url(app, outputs)
    if dry_run:
        journal = Journal.current(state_dir, KIND) or Journal(Path("/dev/null"), "dry-run", KIND)
        ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress,
                      source_override=source)
        ctx.data["replica_identity_full"] = replica_identity_full
        ctx.data.setdefault("engine", engine)
        runner = Runner(journal, plan(ctx.data["engine"]), confirm=lambda q: True, falls_back=False)
        rows = [{"step": s.name, "title": s.title, "state": st} for s, st in runner.plan(ctx)]
        try:
            register = preflight(ctx)["risk_register"]
            error = None
        except (PreflightError, ConfigError) as exc:
            register, error = exc.context.get("register", []), str(exc)
        return {"dry_run": True, "plan": rows, "risk_register": register, "refused": error}
    with RunLock(state_dir, KIND):
        journal = Journal.current(state_dir, KIND)
        if journal is None:
            journal = Journal.create(state_dir, KIND, engine=engine, replica_identity_full=replica_identity_full)
        else:
            started_with = journal.context().get("engine") or "native"
            if started_with != engine:
                raise ConfigError(f"run {journal.run_id} is in progress with engine {started_with}; run again with "
                                  f"--engine {started_with} to resume it")
            if progress:
                progress(f"resuming run {journal.run_id}")
        ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress,
                      source_override=source)
        ctx.data["replica_identity_full"] = replica_identity_full
        ctx.data.setdefault("engine", engine)
        runner = Runner(journal, plan(engine), confirm=lambda q: True, falls_back=False,
                        progress=progress or (lambda m: None))
        try:
            runner.run(ctx)
        except StepError as exc:
            exc.context["run_id"] = journal.run_id
            cause = exc.__cause__
            exc.context["risk_register"] = journal.context().get("risk_register") or (
                cause.context.get("register") if isinstance(cause, PreflightError) else None)
            if exc.context.get("step") == "preflight":
                journal.finish("refused", str(exc))   # nothing changed: the next run starts afresh
                raise Refused(str(exc), **exc.context) from exc.__cause__   # an unmet precondition: exit 2
            raise
        finally:
            ctx.close()
    data = journal.context()
    result = {"run_id": journal.run_id, "kind": KIND, "outcome": "completed", "engine": engine,
              "leader": data.get("leader"), "risk_register": data.get("risk_register"),
              "initial_sync_seconds": data.get("initial_sync_seconds"),
              "steps": [{"name": s.name, "outcome": s.outcome, "detail": s.detail} for s in journal.steps()]}
    if engine == "dms":   # the outputs contract's names for what ran (ARNs, never a credential)
        d = outputs.dms
        result["dms"] = {"region": d.region, "replication_task_arn": d.replication_task_arn,
                         "replication_instance_arn": d.replication_instance_arn,
                         "source_endpoint_arn": d.source_endpoint_arn, "target_endpoint_arn": d.target_endpoint_arn,
                         "start": data.get("dms_start"), "source": data.get("dms_source"), "slot": data.get("dms_slot"),
                         "validation": data.get("validation")}
    return result


def replication_status(outputs: Outputs, *, timeout: float, sample_seconds: float,
                       sleep: Callable[[float], None] = time.sleep, state_dir=None) -> dict[str, Any]:
    """For ``invoke status``: replication into Aurora as it is now, through the engine replicate-aurora recorded
    in ``state_dir`` (native when none; :func:`.engines.for_status`). Never raises: what it cannot see, it says."""
    from ..redact import redact

    engine = engines.for_status(outputs, state_dir)
    out = engines.blank_status(engine.name)
    if engine.name == "native":
        out["subscription"] = native.SUBSCRIPTION
    try:
        r = leader(app_for(outputs.app), outputs)
    except RunbookError as exc:
        out["note"] = f"no EC2 leader to replicate from yet: {redact(exc)}"
        return out
    return engine.status(r, timeout=timeout, sample_seconds=sample_seconds, sleep=sleep)
