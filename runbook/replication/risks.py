"""The preflight of hop 2 as a risk register: each finding has a severity and what tern does about it.

Severities: ``block`` (tern refuses to start replication), ``warn`` (tern proceeds, doing what the
finding says), ``info``. Found on the EC2 leader (tern is superuser there) and on Aurora.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..postgres import PgHost
from . import PUBLICATION, SUBSCRIPTION, TERN_SCHEMA

USER_TABLES = (f"n.nspname NOT IN ('pg_catalog', 'information_schema', '{TERN_SCHEMA}') "
               "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'")


@dataclass
class Finding:
    risk: str
    severity: str        # block | warn | info
    objects: list[str]
    action: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def register(leader: PgHost, database: str, *, allowed_extensions: set[str], replica_identity_full: bool,
             target_has_data: bool, max_lag_bytes: int) -> list[Finding]:
    q = lambda sql: leader.query(sql, database=database)  # noqa: E731
    out: list[Finding] = []
    no_key = [r["tbl"] for r in q(f"""
        SELECT n.nspname || '.' || c.relname AS tbl FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND {USER_TABLES} AND c.relpersistence = 'p'
          AND c.relreplident <> 'f'
          AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND (i.indisprimary OR i.indisreplident))
        ORDER BY 1""")]
    if no_key:
        out.append(Finding("tables without a primary key or replica identity", "warn" if replica_identity_full
                           else "block", no_key,
                           "REPLICA IDENTITY FULL is set on them (every UPDATE/DELETE logs the whole old row and "
                           "Aurora finds it by a full scan: slower apply)" if replica_identity_full else
                           "refused: their UPDATE/DELETE would fail on Aurora; add a primary key, or run again "
                           "with --replica-identity-full (slower apply)"))
    unlogged = [r["tbl"] for r in q(f"""
        SELECT n.nspname || '.' || c.relname AS tbl FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'u' AND {USER_TABLES} ORDER BY 1""")]
    if unlogged:
        out.append(Finding("unlogged tables", "warn", unlogged,
                           "not replicated (no WAL): created empty on Aurora; their content is not migrated"))
    lobs = q("SELECT count(*) AS n FROM pg_largeobject_metadata")[0]["n"]
    if lobs:
        out.append(Finding("large objects", "block", [f"{lobs} large objects"],
                           "refused: logical replication does not carry large objects; move them into bytea first"))
    exts = [r["e"] for r in q("SELECT extname AS e FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1")]
    missing = [e for e in exts if e not in allowed_extensions]
    if missing:
        out.append(Finding("extensions Aurora does not offer", "warn", missing,
                           "not created on Aurora; tern refuses if a copied object depends on one (the schema copy "
                           "fails loudly)"))
    matviews = [r["tbl"] for r in q(f"""
        SELECT n.nspname || '.' || c.relname AS tbl FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind = 'm' AND {USER_TABLES} ORDER BY 1""")]
    if matviews:
        out.append(Finding("materialized views", "warn", matviews,
                           "not replicated: refreshed on Aurora at the switch"))
    seqs = [r["s"] for r in q("SELECT schemaname || '.' || sequencename AS s FROM pg_sequences "
                              f"WHERE schemaname <> '{TERN_SCHEMA}' ORDER BY 1")]
    if seqs:
        out.append(Finding("sequences", "info", seqs,
                           "never replicated: every one is set on Aurora at or past the frozen source's value at "
                           "the switch"))
    odd = [r["c"] for r in q(f"""
        SELECT n.nspname || '.' || c.relname || '.' || a.attname || ' (' || format_type(a.atttypid, NULL) || ')' AS c
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type t ON t.oid = a.atttypid
        WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND {USER_TABLES}
          AND (t.typname IN ('oid', 'regclass', 'regtype', 'regproc', 'lo', 'xml', 'money') OR t.typtype = 'c')
        ORDER BY 1""")]
    if odd:
        out.append(Finding("columns whose values depend on the cluster (OIDs) or on settings", "warn", odd,
                           "copied as text; OID values will not point at the same objects on Aurora"))
    long = [r["p"] for r in q("""
        SELECT pid::text || ' (' || usename || ', ' || round(extract(epoch FROM now() - xact_start))::text || ' s)' AS p
        FROM pg_stat_activity WHERE xact_start < now() - interval '5 minutes' AND backend_type = 'client backend'""")]
    if long:
        out.append(Finding("long transactions", "warn", long,
                           "the initial copy's snapshot waits for them; a slot holds WAL while they run"))
    pubs = [r["p"] for r in q(f"SELECT pubname AS p FROM pg_publication WHERE pubname <> '{PUBLICATION}'")]
    if pubs:
        out.append(Finding("publications already present", "info", pubs, "left alone (tern uses its own)"))
    slots = q("SELECT slot_name AS s, active AS a, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS held "
              f"FROM pg_replication_slots WHERE slot_type = 'logical' AND slot_name <> '{SUBSCRIPTION}'")
    if slots:
        out.append(Finding("logical slots already present", "warn",
                           [f"{s['s']} ({'active' if s['a'] else 'INACTIVE'}, holds {s['held'] or 0:,} bytes)"
                            for s in slots], "left alone; an inactive one holds WAL until the disk fills: drop it"))
    settings = q("SELECT current_setting('wal_level') AS wal_level, "
                 "current_setting('max_replication_slots')::int AS slots, "
                 "(SELECT count(*) FROM pg_replication_slots)::int AS used, "
                 "current_setting('max_wal_senders')::int AS senders")[0]
    if settings["wal_level"] != "logical":
        out.append(Finding("wal_level", "block", [settings["wal_level"]],
                           "refused: the leader must run with wal_level = logical (restore sets it; changing it "
                           "needs a restart, which is downtime)"))
    if settings["slots"] - settings["used"] < 2:
        out.append(Finding("free replication slots", "block", [f"{settings['used']} of {settings['slots']} used"],
                           "refused: tern needs one for Aurora (and keeps one for the rollback)"))
    if target_has_data:
        out.append(Finding("Aurora already holds tables", "info", ["the app's database"],
                           "the schema copy is skipped where it is already equal; the subscription resumes"))
    return out


def blocking(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "block"]
