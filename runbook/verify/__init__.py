"""Verification between two databases: the gate before each point of no return.

This module holds the *gate* the failovers call: row counts of every table, every
sequence, and a sample of rows compared in full. Both sides are read in one
REPEATABLE READ snapshot each. Any difference fails and is named; a table that could
not be checked fails too - the gate never passes on something it did not see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from ..pg import connect

MAX_SAMPLE_KEYS = 20000

TABLES_SQL = """
SELECT n.nspname, c.relname, c.relkind,
       coalesce((SELECT array_agg(a.attname ORDER BY k.ord)
                 FROM pg_index i
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}') AS pk
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
  AND n.nspname NOT LIKE 'pg_temp%%'
ORDER BY 1, 2
"""

SEQUENCES_SQL = "SELECT schemaname || '.' || sequencename, last_value FROM pg_sequences ORDER BY 1"


@dataclass
class TableResult:
    table: str
    source_rows: int | None = None
    target_rows: int | None = None
    sampled: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences and self.source_rows is not None


@dataclass
class GateResult:
    tables: list[TableResult] = field(default_factory=list)
    sequences: list[dict[str, Any]] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    sample_percent: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differences and all(t.ok for t in self.tables)

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "tables": len(self.tables), "rows": sum(t.source_rows or 0 for t in self.tables),
                "sampled_rows": sum(t.sampled for t in self.tables), "sequences": len(self.sequences),
                "sample_percent": self.sample_percent, "differences": self.all_differences()[:50]}

    def all_differences(self) -> list[str]:
        out = list(self.differences)
        for t in self.tables:
            out += [f"{t.table}: {d}" for d in t.differences]
        return out


def _tables(conn: psycopg.Connection) -> dict[str, list[str]]:
    return {f"{r[0]}.{r[1]}": list(r[3]) for r in conn.execute(TABLES_SQL).fetchall()}


def _ident(qualified: str) -> sql.Composable:
    schema, _, name = qualified.partition(".")
    return sql.Identifier(schema, name)


def gate(source_url: str, target_url: str, *, sample_percent: float, sequences: str = "equal",
         timeout: float = 10.0) -> GateResult:
    """Counts, sequences and a row sample, source against target. ``sequences``: ``equal`` or ``at_least``."""
    result = GateResult(sample_percent=sample_percent)
    with connect(source_url, purpose="verify-source", autocommit=False, timeout=timeout) as src, \
            connect(target_url, purpose="verify-target", autocommit=False, timeout=timeout) as dst:
        for conn in (src, dst):
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        s_tables, d_tables = _tables(src), _tables(dst)
        for missing in sorted(set(s_tables) - set(d_tables)):
            result.differences.append(f"table {missing} is missing on the target")
        for extra in sorted(set(d_tables) - set(s_tables)):
            result.differences.append(f"table {extra} exists only on the target")
        for table in sorted(set(s_tables) & set(d_tables)):
            result.tables.append(_check_table(src, dst, table, s_tables[table], sample_percent))
        s_seq = dict(src.execute(SEQUENCES_SQL).fetchall())
        d_seq = dict(dst.execute(SEQUENCES_SQL).fetchall())
        for name in sorted(set(s_seq) | set(d_seq)):
            sv, dv = s_seq.get(name), d_seq.get(name)
            result.sequences.append({"sequence": name, "source": sv, "target": dv})
            if name not in d_seq:
                result.differences.append(f"sequence {name} is missing on the target")
            elif name not in s_seq:
                result.differences.append(f"sequence {name} exists only on the target")
            elif sequences == "equal" and sv != dv:
                result.differences.append(f"sequence {name}: source {sv}, target {dv}")
            elif sequences == "at_least" and (sv or 0) > (dv or 0):
                result.differences.append(f"sequence {name} is behind: source {sv}, target {dv}")
        src.rollback()
        dst.rollback()
    return result


def _check_table(src, dst, table: str, pk: list[str], sample_percent: float) -> TableResult:
    r = TableResult(table)
    ident = _ident(table)
    count = sql.SQL("SELECT count(*) FROM {}").format(ident)
    r.source_rows = src.execute(count).fetchone()[0]
    r.target_rows = dst.execute(count).fetchone()[0]
    if r.source_rows != r.target_rows:
        r.differences.append(f"row count: source {r.source_rows}, target {r.target_rows}")
    if sample_percent <= 0 or r.source_rows == 0:
        return r
    if not pk:
        # no key to sample by: compare a multiset hash of the whole table
        h = sql.SQL("SELECT coalesce(sum(hashtext(t::text)::numeric), 0) FROM {} t").format(ident)
        if src.execute(h).fetchone()[0] != dst.execute(h).fetchone()[0]:
            r.differences.append("content differs (no primary key: rows cannot be named)")
        r.sampled = r.source_rows
        return r
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in pk)
    pct = min(100.0, max(sample_percent, 100.0 * 50 / max(r.source_rows, 1)))  # at least ~50 rows
    keys = src.execute(sql.SQL("SELECT {c} FROM {t} TABLESAMPLE BERNOULLI (%s) LIMIT %s").format(c=cols, t=ident),
                       (pct, MAX_SAMPLE_KEYS)).fetchall()
    if not keys:
        return r
    r.sampled = len(keys)
    rows_sql = sql.SQL("SELECT {c}, t::text FROM {t} t WHERE ({c}) IN (SELECT * FROM unnest({arrays}))").format(
        c=cols, t=ident, arrays=sql.SQL(", ").join(sql.Placeholder() for _ in pk))
    arrays = [[k[i] for k in keys] for i in range(len(pk))]
    s_rows = {tuple(row[:-1]): row[-1] for row in src.execute(rows_sql, arrays).fetchall()}
    d_rows = {tuple(row[:-1]): row[-1] for row in dst.execute(rows_sql, arrays).fetchall()}
    for key in sorted(s_rows, key=str):
        if key not in d_rows:
            r.differences.append(f"row {dict(zip(pk, key))} is missing on the target")
        elif s_rows[key] != d_rows[key]:
            r.differences.append(f"row {dict(zip(pk, key))} differs")
        if len(r.differences) >= 20:
            r.differences.append("... (more differences not listed)")
            break
    return r
