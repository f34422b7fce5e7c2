"""The verification engine: schema, counts, sampling and full-content checksums.

* Each side is read in one snapshot: a coordinator connection opens a REPEATABLE READ,
  READ ONLY transaction and exports its snapshot; every worker connection imports it.
* ``full``: per table (or slice of a large table), one grouped scan per side - both sides at
  once - gives every chunk's ``count(*)`` and the sum of its rows' hashes (``hashing.py``: exact
  where equality is looser than identity, and mixed non-linearly so differences never cancel).
  Chunks are equal ranges of an integer leading key, else buckets of a hash of the key. A chunk
  that differs is split into sub-buckets by a second hash of the key (one more scan of just
  those chunks), and the rows of the differing sub-buckets are compared one by one: each is
  reported by key as missing, extra or changed (with the columns that differ). A table
  without a primary key gets a whole-table multiset hash (not localizable).
* The result is ``ok`` only when everything requested was checked and equal: an error,
  a table that could not be checked, or any difference makes it fail.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

import psycopg
from psycopg import sql

from ..errors import ConfigError, RunbookError
from ..pg import connect
from ..redact import redact
from . import schema as schema_mod
from .hashing import SESSION_OPTIONS, SESSION_SETTINGS, TEXT_ROW_HASH, column_expression, hashed_as_text, load_types, row_hash

MODES = ("schema", "counts", "sample", "full")
LEAF_ROWS = 2000          # differing chunks are split into sub-buckets of about this many rows
CHUNKS_PER_SCAN = 40      # a scan (one task) covers at most this many chunks
MAX_REPORTED_ROWS = 1000  # per table
MAX_SAMPLE_ROWS = 20000  # a sample never fetches more rows than this per table (default)
SAMPLE_TIMEOUT = 60.0    # nor reads longer than this per statement (seconds; default)
NEWEST_ROWS = 100        # a sample also compares the rows with the highest keys

Progress = Callable[[str, int, int], None]

# SESSION_OPTIONS (hashing.py): JIT costs more than it saves on checksum scans; work_mem, since
# the planner cannot know the chunk aggregates are tiny; text output settings pinned on both sides


@dataclass
class RowDifference:
    key: dict[str, Any]
    kind: str                      # missing | extra | changed
    columns: list[str] = field(default_factory=list)

    def line(self) -> str:
        key = ", ".join(f"{k}={v}" for k, v in self.key.items())
        if self.kind == "missing":
            return f"row ({key}) is missing on the target"
        if self.kind == "extra":
            return f"row ({key}) exists only on the target"
        return f"row ({key}) differs in {', '.join(self.columns) or 'its content'}"


@dataclass
class TableReport:
    table: str
    primary_key: list[str] = field(default_factory=list)
    source_rows: int | None = None
    target_rows: int | None = None
    chunks: int = 0
    differing_chunks: int = 0
    checked_rows: int = 0
    rows: list[RowDifference] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # what was not checked on purpose (not a difference)
    error: str | None = None
    seconds: float = 0.0
    checked: bool = False

    @property
    def ok(self) -> bool:
        return self.checked and self.error is None and not self.rows and not self.problems

    def lines(self) -> list[str]:
        out = [f"{self.table}: {p}" for p in self.problems]
        out += [f"{self.table}: {r.line()}" for r in self.rows]
        if self.error:
            out.append(f"{self.table}: could not be checked: {self.error}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {"table": self.table, "ok": self.ok, "primary_key": self.primary_key,
                "source_rows": self.source_rows, "target_rows": self.target_rows, "chunks": self.chunks,
                "differing_chunks": self.differing_chunks, "checked_rows": self.checked_rows,
                "missing": [r.key for r in self.rows if r.kind == "missing"],
                "extra": [r.key for r in self.rows if r.kind == "extra"],
                "changed": [{"key": r.key, "columns": r.columns} for r in self.rows if r.kind == "changed"],
                "problems": self.problems, "notes": self.notes, "error": self.error,
                "seconds": round(self.seconds, 3)}


@dataclass
class VerifyReport:
    mode: str
    schema: list[str] = field(default_factory=list)
    sequences: list[str] = field(default_factory=list)
    tables: list[TableReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    snapshot: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    sample_percent: float = 0.0
    skipped: list[str] = field(default_factory=list)   # unlogged tables, not compared on purpose
    sequences_checked: bool = True                      # False: sequences="skip" (a logical copy has none yet)

    @property
    def ok(self) -> bool:
        return not self.schema and not self.sequences and not self.errors and all(t.ok for t in self.tables)

    def differences(self) -> list[str]:
        out = list(self.errors) + list(self.schema) + list(self.sequences)
        for t in self.tables:
            out += t.lines()
        return out

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "mode": self.mode, "seconds": round(self.seconds, 3),
                "schema_differences": self.schema, "sequence_differences": self.sequences, "errors": self.errors,
                "snapshot": self.snapshot, "tables": [t.to_json() for t in self.tables],
                "sample_percent": self.sample_percent, "skipped_unlogged": self.skipped}

    def summary(self) -> dict[str, Any]:
        """The short form the failover journals and reports carry."""
        return {"ok": self.ok, "mode": self.mode, "tables": len(self.tables),
                "rows": sum(t.source_rows or 0 for t in self.tables),
                "sampled_rows": sum(t.checked_rows for t in self.tables), "sequences_checked": self.sequences_checked,
                "sample_percent": self.sample_percent, "skipped_unlogged": self.skipped,
                "differences": self.differences()[:50]}


# -- snapshots ------------------------------------------------------------------------------
class Side:
    """One database, read in one snapshot by any number of connections.

    ``borrowed``: connections opened by the caller (a failover's sessions on a fenced source, which
    admits no new one); they are used as they are, never closed, and left idle in autocommit.
    """

    def __init__(self, name: str, url: str, stack: ExitStack, timeout: float,
                 borrowed: list[psycopg.Connection] | None = None) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.stack = stack
        self.spare = list(borrowed[1:]) if borrowed else None
        if borrowed:
            self.coordinator = self._borrow(borrowed[0])
        else:
            self.coordinator = stack.enter_context(connect(url, purpose=f"verify-{name}", autocommit=False,
                                                           timeout=timeout, options=SESSION_OPTIONS))
        self._begin(self.coordinator)
        try:
            self.snapshot: str | None = self.coordinator.execute("SELECT pg_export_snapshot()").fetchone()[0]
        except psycopg.Error:
            # cannot export here: read everything through this one connection, in one snapshot
            self.coordinator.rollback()
            self._begin(self.coordinator)
            self.snapshot = None
        self._lock = threading.Lock()

    def _borrow(self, conn: psycopg.Connection) -> psycopg.Connection:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        autocommit = conn.autocommit
        conn.autocommit = False

        def give_back() -> None:
            try:
                conn.rollback()
                conn.autocommit = autocommit
            except psycopg.Error:
                pass

        self.stack.callback(give_back)
        return conn

    def _begin(self, conn: psycopg.Connection, snapshot: str | None = None) -> None:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot:
            conn.execute("SET TRANSACTION SNAPSHOT %s" % sql.Literal(snapshot).as_string(None))
        if self.spare is not None:   # a borrowed session: the options the connection string would set
            for key, value in SESSION_SETTINGS.items():
                conn.execute("SELECT set_config(%s, %s, true)", (key, value))

    @property
    def max_workers(self) -> int:
        if self.snapshot is None:
            return 1
        return 64 if self.spare is None else max(1, len(self.spare))

    def worker_connection(self) -> psycopg.Connection:
        if self.snapshot is None:
            return self.coordinator
        if self.spare is not None:
            conn = self._borrow(self.spare.pop(0))
        else:
            conn = self.stack.enter_context(connect(self.url, purpose=f"verify-{self.name}", autocommit=False,
                                                    timeout=self.timeout, options=SESSION_OPTIONS))
        self._begin(conn, self.snapshot)
        return conn


# -- table model ------------------------------------------------------------------------------
TABLES_SQL = """
SELECT n.nspname || '.' || c.relname,
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord)
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}') AS pk,
       coalesce((SELECT format_type(a.atttypid, NULL) FROM pg_index i
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                 WHERE i.indrelid = c.oid AND i.indisprimary), '') AS pk_type,
       (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       (SELECT array_agg(a.atttypid::bigint ORDER BY a.attnum) FROM pg_attribute a
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS types,
       (SELECT array_agg(coalesce(co.collisdeterministic, true) ORDER BY a.attnum) FROM pg_attribute a
        LEFT JOIN pg_collation co ON co.oid = a.attcollation
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS deterministic,
       c.relpersistence
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tern') AND n.nspname NOT LIKE 'pg_toast%%'
  AND n.nspname NOT LIKE 'pg_temp%%'
ORDER BY 1
"""

SEQUENCES_SQL = ("SELECT schemaname || '.' || sequencename, last_value, has_sequence_privilege("
                 "quote_ident(schemaname) || '.' || quote_ident(sequencename), 'SELECT') FROM pg_sequences "
                 "WHERE schemaname <> 'tern' ORDER BY 1")

INTEGER_TYPES = {"smallint", "integer", "bigint"}


@dataclass
class Table:
    name: str
    pk: list[str]
    pk_type: str
    columns: list[str]
    text_hashed: list[str] = field(default_factory=list)
    persistence: str = "p"
    hash_expr: str = ""

    def __post_init__(self) -> None:
        # see hashing.py: exact (text) where equality is looser than identity or depends on
        # OIDs, and each row's record hash mixed non-linearly before it is summed
        self.hash_expr = row_hash(self.columns, set(self.text_hashed)) if self.columns else TEXT_ROW_HASH
        key = [column_expression(c, c in self.text_hashed) for c in self.pk]
        self._key_row = sql.SQL(", ").join(key).as_string(None) if self.pk else ""

    def key_hash(self, seed: int) -> str:
        """A hash of the primary key (text for OID-dependent types); seeds give independent buckets."""
        return f"hash_record_extended(ROW({self._key_row}), {int(seed)})" if self.pk else ""

    @property
    def ident(self) -> sql.Composable:
        schema, _, name = self.name.partition(".")
        return sql.Identifier(schema, name)

    @property
    def pk_cols(self) -> sql.Composable:
        return sql.SQL(", ").join(sql.Identifier(c) for c in self.pk)


@dataclass
class Scan:
    """One task of a full verification: a slice of a table (``where``) and how its rows are bucketed.

    ``bucket`` maps a row to its chunk: an equal-width range of an integer leading key (clamped,
    so rows outside the source's range still land in the first or last chunk), or a hash of the
    key. ``bucket_where(b)`` selects a chunk's rows cheaply (an index range) where possible.
    """

    where: sql.Composable
    params: list[Any]
    bucket: sql.Composable
    chunks: int
    lead: str | None = None
    lo: int = 0
    width: int = 1

    def bucket_where(self, buckets: list[int]) -> tuple[sql.Composable, list[Any]]:
        if self.lead is None:
            return sql.SQL("{} = ANY(%s)").format(self.bucket), [buckets]
        col = sql.Identifier(self.lead)
        parts, params = [], []
        for b in buckets:
            lower, upper = self.lo + b * self.width, self.lo + (b + 1) * self.width
            if b <= 0 and b >= self.chunks - 1:
                parts.append(sql.SQL("true"))
            elif b <= 0:
                parts.append(sql.SQL("{} < %s").format(col))
                params.append(upper)
            elif b >= self.chunks - 1:
                parts.append(sql.SQL("{} >= %s").format(col))
                params.append(lower)
            else:
                parts.append(sql.SQL("({c} >= %s AND {c} < %s)").format(c=col))
                params += [lower, upper]
        return sql.SQL("({})").format(sql.SQL(" OR ").join(parts)), params


# -- the engine ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """What a run checks and its bounds (validated by :func:`verify`)."""

    mode: str = "full"
    sample_percent: float = 5.0
    sample_rows: int = MAX_SAMPLE_ROWS
    sample_timeout: float = SAMPLE_TIMEOUT
    counts: bool = True      # sample mode: also count every table's rows on both sides (O(rows))
    jobs: int = 2
    chunk_rows: int = 50_000
    sample_keys: dict[str, list[tuple]] | None = None   # sample mode: keys chosen (and read) earlier


@dataclass
class SamplePlan:
    """A gate's sample chosen before a failover's window, its rows already read once on both sides.

    Inside the window the gate then reads pages that are in memory: a sample of cold rows costs
    one random read per index level and heap page, which on a large database (or EBS) is seconds
    for a few thousand rows. The keys are data, so a plan lives in memory only (never journaled);
    a resumed run without one samples inside the window as before."""

    keys: dict[str, list[tuple]] = field(default_factory=dict)
    rows: int = 0
    seconds: float = 0.0


def verify(source_url: str, target_url: str, *, mode: str = "full", tables: list[str] | None = None,
           sample_percent: float = 5.0, jobs: int = 2, chunk_rows: int = 50_000, sequences: str = "at_least",
           timeout: float = 10.0, progress: Progress | None = None, sample_rows: int = MAX_SAMPLE_ROWS,
           sample_timeout: float = SAMPLE_TIMEOUT, counts: bool = True,
           source_connections: list[psycopg.Connection] | None = None,
           skip_unlogged: bool = False, ignore_extensions: bool = False,
           target_connections: list[psycopg.Connection] | None = None,
           sample_plan: SamplePlan | None = None) -> VerifyReport:
    """Compare ``target_url`` with ``source_url``. In ``sample`` mode the sample is spread over the
    whole table (block sampling), at most ``sample_rows`` rows per table, each statement bounded by
    ``sample_timeout`` seconds; ``counts=False`` skips the O(rows) row counts (a failover's window).
    ``source_connections``: read the source through these open sessions (a fenced source admits no
    new one); ``target_connections`` likewise for the target. ``skip_unlogged``: unlogged tables (empty on
    any physical copy) are listed, not compared."""
    if mode not in MODES:
        raise ConfigError(f"unknown verification mode {mode!r}; choose one of: {', '.join(MODES)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= 64:
        raise ConfigError(f"--jobs must be an integer between 1 and 64, got {jobs!r}")
    if isinstance(sample_percent, bool) or not isinstance(sample_percent, (int, float)) \
            or not 0 < sample_percent <= 100:
        raise ConfigError(f"--sample-pct must be a number in (0, 100], got {sample_percent!r}")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"--chunk-rows must be a positive integer, got {chunk_rows!r}")
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 1:
        raise ConfigError(f"the sample's row bound must be a positive integer, got {sample_rows!r}")
    if not sample_timeout > 0:
        raise ConfigError(f"the sample's time bound must be positive, got {sample_timeout!r}")
    opts = Options(mode, float(sample_percent), sample_rows, float(sample_timeout), counts, jobs, chunk_rows,
                   sample_plan.keys if sample_plan is not None else None)
    t0 = time.monotonic()
    report = VerifyReport(mode=mode, sample_percent=sample_percent if mode == "sample" else 0.0)
    with ExitStack() as stack:
        src = Side("source", source_url, stack, timeout, borrowed=source_connections)
        dst = Side("target", target_url, stack, timeout, borrowed=target_connections)
        report.snapshot = {"source": "exported" if src.snapshot else "single connection",
                           "target": "exported" if dst.snapshot else "single connection"}
        s_schema = schema_mod.describe(src.coordinator)
        d_schema = schema_mod.describe(dst.coordinator)
        s_tables = _tables(src.coordinator)
        d_tables = _tables(dst.coordinator)
        wanted = _select(tables, s_tables, d_tables)
        report.schema = schema_mod.compare(s_schema, d_schema, set(wanted) if tables else None)
        if ignore_extensions:
            report.schema = [line for line in report.schema
                             if not (line.startswith("extension ") and line.endswith("is missing on the target"))]
        if mode == "schema":
            report.seconds = time.monotonic() - t0
            return report
        report.sequences_checked = sequences != "skip"
        report.sequences = _sequences(src.coordinator, dst.coordinator, sequences) if report.sequences_checked else []
        todo = [s_tables[n] for n in wanted if n in s_tables and n in d_tables]
        if skip_unlogged:
            report.skipped = sorted(t.name for t in todo if t.persistence == "u")
            todo = [t for t in todo if t.persistence != "u"]
        for n in wanted:
            if n not in d_tables and n in s_tables:
                tr = TableReport(n, error="table is missing on the target")
                report.tables.append(tr)
            elif n not in s_tables:
                report.tables.append(TableReport(n, error="table exists only on the target"))
        report.tables += _run_tables(todo, src, dst, opts, progress)
        report.tables.sort(key=lambda t: t.table)
    report.seconds = time.monotonic() - t0
    return report


def _tables(conn) -> dict[str, Table]:
    types = load_types(conn)
    out = {}
    for name, pk, pk_type, columns, type_oids, deterministic, persistence in conn.execute(TABLES_SQL).fetchall():
        columns = list(columns or [])
        text = [c for c, oid, det in zip(columns, type_oids or [], deterministic or [])
                if hashed_as_text(oid, types, det)]
        out[name] = Table(name, list(pk), pk_type, columns, text, persistence)
    return out


def _select(tables: list[str] | None, s_tables: dict, d_tables: dict) -> list[str]:
    if not tables:
        return sorted(set(s_tables) | set(d_tables))
    out = []
    for t in tables:
        name = t if "." in t else f"public.{t}"
        if name not in s_tables and name not in d_tables:
            raise ConfigError(f"table {t!r} exists on neither side")
        out.append(name)
    return out


def _sequences(src, dst, mode: str) -> list[str]:
    s = {r[0]: (r[1], r[2]) for r in src.execute(SEQUENCES_SQL).fetchall()}
    d = {r[0]: (r[1], r[2]) for r in dst.execute(SEQUENCES_SQL).fetchall()}
    out = []
    for name in sorted(set(s) | set(d)):
        if name not in d:
            out.append(f"sequence {name} is missing on the target")
            continue
        if name not in s:
            continue  # reported by the schema check
        (sv, s_priv), (dv, d_priv) = s[name], d[name]
        if not (s_priv and d_priv):
            out.append(f"sequence {name} could not be read (no SELECT privilege)")
        elif mode == "equal" and sv != dv:
            out.append(f"sequence {name}: source {sv}, target {dv}")
        elif (sv or 0) > (dv or 0):
            out.append(f"sequence {name} is behind: source {sv}, target {dv} (the next insert would reuse keys)")
    return out


def _run_tables(todo: list[Table], src: Side, dst: Side, opts: Options,
                progress: Progress | None) -> list[TableReport]:
    mode, jobs = opts.mode, opts.jobs
    reports = {t.name: TableReport(t.name, primary_key=t.pk) for t in todo}
    tasks: queue.Queue = queue.Queue()
    # plan every table on the coordinators (cheap: counts or key boundaries), then hash chunks in parallel
    for t in todo:
        r = reports[t.name]
        for c in (src.coordinator, dst.coordinator):
            c.execute("SAVEPOINT tern_plan")
        try:
            _plan_table(t, r, src.coordinator, dst.coordinator, opts, tasks)
        except psycopg.Error as exc:
            r.error = redact(str(exc).strip().splitlines()[0])
            for c in (src.coordinator, dst.coordinator):
                c.execute("ROLLBACK TO SAVEPOINT tern_plan")
        if progress:
            progress(t.name, 0, r.chunks)
    done_chunks: dict[str, int] = {t.name: 0 for t in todo}
    lock = threading.Lock()
    n_workers = min(jobs, max(1, tasks.qsize()), src.max_workers, dst.max_workers) \
        if (src.snapshot and dst.snapshot) else 1
    if n_workers > 1 and (src.spare is not None and len(src.spare) < n_workers):
        n_workers = 1

    def worker() -> None:
        with lock:
            s_conn = src.worker_connection() if n_workers > 1 else src.coordinator
            d_conn = dst.worker_connection() if n_workers > 1 else dst.coordinator
        with ThreadPoolExecutor(max_workers=1) as other_side:
            while True:
                try:
                    table, chunk, kind = tasks.get_nowait()
                except queue.Empty:
                    return
                r = reports[table.name]
                t0 = time.monotonic()
                try:
                    if kind == "sample":
                        _sample(table, r, s_conn, d_conn, opts)
                    elif kind == "whole":
                        _whole_table(table, r, s_conn, d_conn, other_side)
                    else:
                        _scan(table, r, chunk, s_conn, d_conn, other_side, lock)
                except Exception as exc:  # noqa: BLE001 - never let a table pass that was not checked
                    # this worker's snapshot transaction is gone: record, and leave the rest to the others
                    with lock:
                        r.error = describe_error(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
                    _reset(s_conn)
                    _reset(d_conn)
                    return
                with lock:
                    r.seconds += time.monotonic() - t0
                    done_chunks[table.name] += 1
                    if progress:
                        progress(table.name, done_chunks[table.name], r.chunks)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n_workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    while not tasks.empty():  # every worker failed: what is left was not checked
        table, _, _ = tasks.get_nowait()
        reports[table.name].error = reports[table.name].error or "not checked: the verification workers failed"
    for r in reports.values():
        if r.error is None:
            r.checked = True
        if mode == "full" and r.primary_key and r.error is None and r.source_rows != r.target_rows:
            r.problems.insert(0, f"row count: source {r.source_rows}, target {r.target_rows}")
    return list(reports.values())


def _reset(conn) -> None:
    """After an error the snapshot transaction is aborted: nothing more can be read consistently."""
    try:
        conn.rollback()
    except psycopg.Error:
        pass


def _plan_table(t: Table, r: TableReport, src, dst, opts: Options, tasks: queue.Queue) -> None:
    mode = opts.mode
    if mode == "full" and t.pk:
        # each chunk's checksum counts its rows: no separate count pass
        r.source_rows, r.target_rows = 0, 0
        for scan in _scans(t, src, opts.chunk_rows):
            r.chunks += scan.chunks
            tasks.put((t, scan, "scan"))
        return
    if mode == "sample" and not opts.counts:
        r.chunks = 1
        tasks.put((t, None, "sample"))
        return
    count = sql.SQL("SELECT count(*) FROM {}").format(t.ident)
    r.source_rows = src.execute(count).fetchone()[0]
    r.target_rows = dst.execute(count).fetchone()[0]
    if r.source_rows != r.target_rows:
        r.problems.append(f"row count: source {r.source_rows}, target {r.target_rows}")
    if mode == "counts":
        return
    if mode == "sample":
        if r.source_rows:
            r.chunks = 1
            tasks.put((t, None, "sample"))
        return
    r.chunks = 1
    tasks.put((t, None, "whole"))   # no primary key: a whole-table multiset hash


def _scans(t: Table, conn, chunk_rows: int) -> list[Scan]:
    """Split a table into scans of up to CHUNKS_PER_SCAN chunks of about ``chunk_rows`` rows."""
    estimate = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                            (t.ident.as_string(None),)).fetchone()[0]
    if estimate < 0:   # never analyzed
        estimate = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t.ident)).fetchone()[0]
    n = max(1, -(-max(estimate, 0) // chunk_rows))
    if t.pk_type in INTEGER_TYPES:
        lead = sql.Identifier(t.pk[0])
        lo, hi = conn.execute(sql.SQL("SELECT min({c}), max({c}) FROM {t}").format(c=lead, t=t.ident)).fetchone()
        if lo is not None:
            width = max(1, -(-(hi - lo + 1) // n))
            n = max(1, -(-(hi - lo + 1) // width))
            bucket = sql.SQL("least(greatest(({c} - {lo}) / {w}, 0), {last})").format(
                c=lead, lo=sql.Literal(lo), w=sql.Literal(width), last=sql.Literal(n - 1))
            scans = []
            for first in range(0, n, CHUNKS_PER_SCAN):
                last = min(n, first + CHUNKS_PER_SCAN) - 1
                where, params = sql.SQL("true"), []
                if first > 0 and last < n - 1:
                    where, params = sql.SQL("({c} >= %s AND {c} < %s)").format(c=lead), \
                        [lo + first * width, lo + (last + 1) * width]
                elif first > 0:
                    where, params = sql.SQL("{} >= %s").format(lead), [lo + first * width]
                elif last < n - 1:
                    where, params = sql.SQL("{} < %s").format(lead), [lo + (last + 1) * width]
                scans.append(Scan(where, params, bucket, n, t.pk[0], lo, width))
            return scans
    bucket = sql.SQL("(({k}) & 9223372036854775807) %% {n}").format(k=sql.SQL(t.key_hash(0)), n=sql.Literal(n))
    return [Scan(sql.SQL("true"), [], bucket, n)]


def _both(other_side: ThreadPoolExecutor, s_conn, d_conn, query, params):
    """The same query on both sides at once."""
    fut = other_side.submit(lambda: s_conn.execute(query, params).fetchall())
    try:
        d_rows = d_conn.execute(query, params).fetchall()
    except BaseException:
        try:
            fut.result()     # never leave the other side's query running behind our back
        except BaseException:  # noqa: BLE001 - the target's error is the one reported
            pass
        raise
    return fut.result(), d_rows


def _with_fallback_hash(t: Table, s_conn, d_conn, other_side, make_query):
    """Run ``make_query()``; if a column type has no hash function, hash the row's text instead."""
    try:
        for c in (s_conn, d_conn):
            c.execute("SAVEPOINT tern_hash")
        q, p = make_query()
        result = _both(other_side, s_conn, d_conn, q, p)
        for c in (s_conn, d_conn):
            c.execute("RELEASE SAVEPOINT tern_hash")
        return result
    except psycopg.errors.UndefinedFunction:
        for c in (s_conn, d_conn):
            c.execute("ROLLBACK TO SAVEPOINT tern_hash")
        t.hash_expr = TEXT_ROW_HASH
        q, p = make_query()
        return _both(other_side, s_conn, d_conn, q, p)


def _scan(t: Table, r: TableReport, scan: Scan, s_conn, d_conn, other_side, lock) -> None:
    """Pass 1: every chunk's count and hash sum in one scan per side (both at once). If some differ,
    pass 2 splits just those chunks into sub-buckets by a second hash of the key, and pass 3
    compares the rows of the differing sub-buckets - each row named missing, extra or changed."""
    def pass1():
        return sql.SQL("SELECT {b}, count(*), coalesce(sum({h}), 0) FROM {t} t WHERE {w} GROUP BY 1").format(
            b=scan.bucket, h=sql.SQL(t.hash_expr), t=t.ident, w=scan.where), scan.params

    s_rows, d_rows = _with_fallback_hash(t, s_conn, d_conn, other_side, pass1)
    s_map = {row[0]: (row[1], row[2]) for row in s_rows}
    d_map = {row[0]: (row[1], row[2]) for row in d_rows}
    with lock:
        r.source_rows = (r.source_rows or 0) + sum(c for c, _ in s_map.values())
        r.target_rows = (r.target_rows or 0) + sum(c for c, _ in d_map.values())
        r.checked_rows += sum(c for c, _ in s_map.values())
    differing = sorted(b for b in set(s_map) | set(d_map) if s_map.get(b) != d_map.get(b))
    if not differing:
        return
    with lock:
        r.differing_chunks += len(differing)
    biggest = max(max(s_map.get(b, (0, 0))[0], d_map.get(b, (0, 0))[0]) for b in differing)
    subs = max(1, -(-biggest // LEAF_ROWS))
    sub = sql.SQL("((({k}) & 9223372036854775807) %% {n})").format(
        k=sql.SQL(t.key_hash(1)), n=sql.Literal(subs)) if subs > 1 else sql.SQL("0")
    in_chunks, in_params = scan.bucket_where(differing)
    where = sql.SQL("{} AND {} AND {} = ANY(%s)").format(scan.where, in_chunks, scan.bucket)
    params = scan.params + in_params + [differing]
    pairs = [(b, 0) for b in differing]
    if subs > 1:
        q2 = sql.SQL("SELECT {b}, {s}, count(*), coalesce(sum({h}), 0) FROM {t} t WHERE {w} GROUP BY 1, 2").format(
            b=scan.bucket, s=sub, h=sql.SQL(t.hash_expr), t=t.ident, w=where)
        s2, d2 = _both(other_side, s_conn, d_conn, q2, params)
        s2m = {(row[0], row[1]): (row[2], row[3]) for row in s2}
        d2m = {(row[0], row[1]): (row[2], row[3]) for row in d2}
        pairs = sorted(k for k in set(s2m) | set(d2m) if s2m.get(k) != d2m.get(k))
        if not pairs:
            return
    rows_where = sql.SQL("{} AND ({}, {}) IN (SELECT * FROM unnest(%s::int[], %s::int[]))").format(
        where, scan.bucket, sub)
    _compare_rows(t, r, rows_where, params + [[b for b, _ in pairs], [x for _, x in pairs]],
                  s_conn, d_conn, other_side, lock)


def _compare_rows(t: Table, r: TableReport, where: sql.Composable, params: list[Any], s_conn, d_conn,
                  other_side, lock) -> None:
    q = sql.SQL("SELECT {c}, {h} FROM {t} t WHERE {w}").format(c=t.pk_cols, h=sql.SQL(t.hash_expr), t=t.ident, w=where)
    s_rows, d_rows = _both(other_side, s_conn, d_conn, q, params)
    s_map = {tuple(row[:-1]): row[-1] for row in s_rows}
    d_map = {tuple(row[:-1]): row[-1] for row in d_rows}
    found: list[RowDifference] = []
    changed = []
    for key in s_map:
        if key not in d_map:
            found.append(RowDifference(dict(zip(t.pk, key)), "missing"))
        elif s_map[key] != d_map[key]:
            changed.append(key)
    for key in d_map:
        if key not in s_map:
            found.append(RowDifference(dict(zip(t.pk, key)), "extra"))
    for key in changed[:MAX_REPORTED_ROWS]:
        found.append(RowDifference(dict(zip(t.pk, key)), "changed", _changed_columns(t, key, s_conn, d_conn)))
    with lock:
        room = MAX_REPORTED_ROWS - len(r.rows)
        r.rows += found[:max(room, 0)]
        if len(found) > room > -1 and not any("more differing rows" in p for p in r.problems):
            r.problems.append(f"more differing rows than the {MAX_REPORTED_ROWS} listed")


def _changed_columns(t: Table, key: tuple, s_conn, d_conn) -> list[str]:
    cond = sql.SQL(" AND ").join(sql.SQL("{} = {}").format(sql.Identifier(c), sql.Placeholder()) for c in t.pk)
    cols = sql.SQL(", ").join(sql.SQL("md5({}::text)").format(sql.Identifier(c)) for c in t.columns)
    q = sql.SQL("SELECT {cols} FROM {t} WHERE {cond}").format(cols=cols, t=t.ident, cond=cond)
    s = s_conn.execute(q, list(key)).fetchone()
    d = d_conn.execute(q, list(key)).fetchone()
    if s is None or d is None:
        return []
    return [c for c, a, b in zip(t.columns, s, d) if a != b]


def _whole_table(t: Table, r: TableReport, s_conn, d_conn, other_side) -> None:
    def query():
        return sql.SQL("SELECT count(*), coalesce(sum({h}), 0) FROM {t} t").format(
            h=sql.SQL(t.hash_expr), t=t.ident), []

    (s_count, s_sum), (d_count, d_sum) = [rows[0] for rows in
                                          _with_fallback_hash(t, s_conn, d_conn, other_side, query)]
    r.checked_rows += s_count
    if (s_count, s_sum) != (d_count, d_sum):
        r.problems.append("content differs (no primary key: the rows cannot be named; whole-table multiset hash)")


def _sample(t: Table, r: TableReport, s_conn, d_conn, opts: Options) -> None:
    """Compare a sample of rows in full. Block sampling (TABLESAMPLE SYSTEM) reads only the
    sampled pages, spread over the whole heap, and the rows are thinned at random to the bound;
    every statement runs under ``sample_timeout``."""
    timeout_ms = max(1, int(opts.sample_timeout * 1000))
    for c in (s_conn, d_conn):
        c.execute(sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(timeout_ms)))
    try:
        _sample_rows(t, r, s_conn, d_conn, opts)
    finally:
        for c in (s_conn, d_conn):
            if c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
                c.execute("SET LOCAL statement_timeout = 0")


def _sample_rows(t: Table, r: TableReport, s_conn, d_conn, opts: Options) -> None:
    if not t.pk:
        if not opts.counts:
            r.notes.append("no primary key: rows cannot be sampled by key (left to the full verification)")
            return
        q = sql.SQL("SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0) FROM {} t").format(t.ident)
        if s_conn.execute(q).fetchone() != d_conn.execute(q).fetchone():
            r.problems.append("content differs (no primary key: the rows cannot be named)")
        r.checked_rows = r.source_rows or 0
        return
    if r.source_rows == 0:
        return
    planned = opts.sample_keys.get(t.name) if opts.sample_keys is not None else None
    keys = list(planned) if planned is not None else _sample_keys(t, s_conn, opts, r.source_rows)
    # and the rows with the highest keys: where the last writes before a switch usually are (a
    # backward index scan over pages that are in memory)
    newest = sql.SQL("SELECT {c} FROM {t} ORDER BY {d} LIMIT %s").format(
        c=t.pk_cols, t=t.ident, d=sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(c)) for c in t.pk))
    keys = list(dict.fromkeys([tuple(k) for k in keys] + [tuple(k) for k in s_conn.execute(newest, (NEWEST_ROWS,))]))
    if not keys:
        return
    r.checked_rows = len(keys)
    q = _rows_query(t)
    arrays = _key_arrays(t, keys)
    s_rows = {tuple(row[:-1]): row[-1] for row in s_conn.execute(q, arrays).fetchall()}
    d_rows = {tuple(row[:-1]): row[-1] for row in d_conn.execute(q, arrays).fetchall()}
    if planned is not None:   # a planned key may have been deleted since; the target must agree
        for key in d_rows:
            if key not in s_rows:
                r.rows.append(RowDifference(dict(zip(t.pk, key)), "extra"))
    for key in s_rows:
        if key not in d_rows:
            r.rows.append(RowDifference(dict(zip(t.pk, key)), "missing"))
        elif s_rows[key] != d_rows[key]:
            r.rows.append(RowDifference(dict(zip(t.pk, key)), "changed", _changed_columns(t, key, s_conn, d_conn)))
        if len(r.rows) >= MAX_REPORTED_ROWS:
            break


def _sample_keys(t: Table, conn, opts: Options, rows: int | None) -> list[tuple]:
    """At most ``opts.sample_rows`` keys, from pages spread over the whole heap (block sampling)."""
    pages, estimate = conn.execute(
        "SELECT greatest(pg_relation_size(%s::regclass) / current_setting('block_size')::int, 1), "
        "(SELECT reltuples FROM pg_class WHERE oid = %s::regclass)",
        (t.ident.as_string(None), t.ident.as_string(None))).fetchone()
    total = rows if rows is not None else max(int(estimate or 0), 0)
    per_page = (estimate / pages) if estimate and estimate > 0 else 1.0   # unknown: assume one row per page
    wanted = min(opts.sample_rows, max(50, int(total * opts.sample_percent / 100)))
    # read about four times the rows wanted (more pages, fewer rows from each), then thin at random
    # (and never fewer than 32 pages, so that a small sample is not one unlucky page or none)
    block_pct = min(100.0, 100.0 * max(32.0, 4 * wanted / max(per_page, 1.0)) / pages)
    query = sql.SQL("SELECT {c} FROM (SELECT {c} FROM {t} TABLESAMPLE SYSTEM (%s)) s ORDER BY random() LIMIT %s") \
        .format(c=t.pk_cols, t=t.ident)
    keys = conn.execute(query, (block_pct, wanted)).fetchall()
    if not keys and block_pct < 100:
        keys = conn.execute(query, (100.0, wanted)).fetchall()   # the sampled pages held no row
    return [tuple(k) for k in keys]


def _rows_query(t: Table) -> sql.Composable:
    return sql.SQL("SELECT {c}, t::text FROM {t} t WHERE ({c}) IN (SELECT * FROM unnest({a}))").format(
        c=t.pk_cols, t=t.ident, a=sql.SQL(", ").join(sql.Placeholder() for _ in t.pk))


def _key_arrays(t: Table, keys: list[tuple]) -> list[list[Any]]:
    return [[k[i] for k in keys] for i in range(len(t.pk))]


def choose_sample(source_url: str, target_url: str, *, sample_percent: float, sample_rows: int,
                  sample_timeout: float, timeout: float = 10.0, skip_unlogged: bool = True,
                  source_connections: list[psycopg.Connection] | None = None) -> SamplePlan:
    """Choose a gate's sample now (block sampling on the source) and read its rows once on both
    sides, so that the gate inside the window finds them in memory. Every statement is bounded by
    ``sample_timeout``; a table whose sample cannot be chosen is left to the gate's own sampling."""
    opts = Options("sample", float(sample_percent), sample_rows, float(sample_timeout), False)
    plan = SamplePlan()
    t0 = time.monotonic()
    timeout_ms = max(1, int(sample_timeout * 1000))
    with ExitStack() as stack:
        if source_connections:
            src = source_connections[0]
        else:
            src = stack.enter_context(connect(source_url, purpose="gate-sample", autocommit=True, timeout=timeout,
                                              options=SESSION_OPTIONS))
        dst = stack.enter_context(connect(target_url, purpose="gate-sample", autocommit=True, timeout=timeout,
                                          options=SESSION_OPTIONS))
        tables = _tables(src)
        for conn in (src, dst):
            conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(timeout_ms)))
        try:
            for t in tables.values():
                if not t.pk or (skip_unlogged and t.persistence == "u"):
                    continue
                try:
                    keys = _sample_keys(t, src, opts, None)
                    if keys:
                        for conn in (src, dst):   # read once: the pages (heap, index, TOAST) are then in memory
                            conn.execute(_rows_query(t), _key_arrays(t, keys)).fetchall()
                except psycopg.Error:
                    continue
                plan.keys[t.name] = keys
                plan.rows += len(keys)
        finally:
            for conn in (src, dst):
                if not conn.closed:
                    conn.execute("SET statement_timeout = 0")
    plan.seconds = round(time.monotonic() - t0, 3)
    return plan


def describe_error(exc: Exception) -> str:
    return redact(exc) if isinstance(exc, RunbookError) else f"{type(exc).__name__}: {redact(exc)}"
