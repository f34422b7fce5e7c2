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


# -- the DMS engine's own risks ------------------------------------------------------------------------------
# What DMS treats as a LOB on a PostgreSQL source (migrated piece by piece in full LOB mode, truncated above
# LobMaxSize in limited LOB mode with only a log warning: pitfall 4): text, unbounded varchar, bytea, json(b),
# xml, arrays.
LOB_COLUMNS = f"""
SELECT n.nspname || '.' || c.relname AS tbl, a.attname AS col, format_type(a.atttypid, a.atttypmod) AS type,
       t.typname IN ('json', 'jsonb') AS json
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND c.relpersistence = 'p' AND {USER_TABLES}
  AND (t.typname IN ('text', 'bytea', 'json', 'jsonb', 'xml') OR t.typcategory = 'A'
       OR (t.typname = 'varchar' AND a.atttypmod < 0))
ORDER BY 1, 2"""
# types DMS carries as strings or not at all between two PostgreSQL databases: check their validation
DMS_ODD_TYPES = f"""
SELECT n.nspname || '.' || c.relname || '.' || a.attname || ' (' || format_type(a.atttypid, NULL) || ')' AS c
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped AND {USER_TABLES}
  AND (t.typtype IN ('c', 'r', 'm') OR t.typname IN ('point', 'line', 'lseg', 'box', 'path', 'polygon', 'circle',
       'tsvector', 'tsquery', 'pg_lsn', 'txid_snapshot', 'pg_snapshot', 'bit', 'varbit', 'money'))
ORDER BY 1"""
JSON_SAMPLE_BYTES = 100 * 1024     # JSON(B) values above this are worth a finding (DMS moves them as LOBs)


def _dms_selected(schema: str, table: str, mappings: dict[str, Any]) -> bool:
    """Whether the task's table mappings select ``schema.table`` (selection rules; ``%`` is DMS's wildcard;
    an exclude rule wins over an include)."""
    import fnmatch

    def matches(rule: dict[str, Any]) -> bool:
        loc = rule.get("object-locator") or {}
        pat_s = str(loc.get("schema-name", "%")).replace("%", "*")
        pat_t = str(loc.get("table-name", "%")).replace("%", "*")
        return fnmatch.fnmatchcase(schema, pat_s) and fnmatch.fnmatchcase(table, pat_t)

    rules = [r for r in mappings.get("rules") or [] if r.get("rule-type") == "selection" and matches(r)]
    return any(r.get("rule-action") == "include" for r in rules) and not any(
        r.get("rule-action") == "exclude" for r in rules)


def dms_facts(leader: PgHost, database: str, *, sample_timeout: float = 10.0) -> dict[str, Any]:
    """What the DMS findings need to know of the leader (tern is superuser there). JSON(B) sizes come from a
    block sample (``TABLESAMPLE SYSTEM (1)``, each statement bounded by ``sample_timeout``): a size above it
    may exist unseen, which is why full LOB mode is what tern asks for."""
    q = lambda sql: leader.query(sql, database=database)  # noqa: E731
    lobs = q(LOB_COLUMNS)
    json_max: dict[str, int] = {}
    ms = max(1, int(sample_timeout * 1000))
    for col in (c for c in lobs if c["json"]):
        schema_name, _, table = col["tbl"].partition(".")
        ident = '"{}"."{}"'.format(schema_name.replace('"', '""'), table.replace('"', '""'))
        column = '"{}"'.format(col["col"].replace('"', '""'))
        try:
            text = leader.psql(f"SET statement_timeout = {ms};\nSELECT coalesce(max(pg_column_size({column})), 0) "
                               f"FROM {ident} TABLESAMPLE SYSTEM (1);", database=database, timeout=sample_timeout + 10)
            json_max[f"{col['tbl']}.{col['col']}"] = int(text.strip().splitlines()[-1])
        except Exception:  # noqa: BLE001 - a sample that cannot be read is a finding of its own, not a crash
            json_max[f"{col['tbl']}.{col['col']}"] = -1
    tables = [r["t"] for r in q("""
        SELECT n.nspname || '.' || c.relname AS t FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relpersistence = 'p'
          AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
          AND n.nspname NOT LIKE 'pg_temp%%' ORDER BY 1""")]
    triggers = [r["t"] for r in q(f"""
        SELECT n.nspname || '.' || c.relname || ': ' || g.tgname AS t FROM pg_trigger g
        JOIN pg_class c ON c.oid = g.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT g.tgisinternal AND {USER_TABLES} ORDER BY 1""")]
    return {"lob_columns": [f"{c['tbl']}.{c['col']} ({c['type']})" for c in lobs], "json_max_bytes": json_max,
            "odd_types": [r["c"] for r in q(DMS_ODD_TYPES)], "tables": tables, "triggers": triggers,
            "pglogical": bool(q("SELECT 1 AS x FROM pg_extension WHERE extname = 'pglogical'"))}


def dms_findings(facts: dict[str, Any], definition: dict[str, Any], source_endpoint: dict[str, Any],
                 target_endpoint: dict[str, Any], *, task_status: Any = None, replica_identity_full: bool = False,
                 aurora_has_rows: bool = False, native_subscription: bool = False) -> list[Finding]:
    """The DMS engine's risk register, from the leader's facts (:func:`dms_facts`), the task's definition
    (:meth:`runbook.adapters.dms.DmsTask.definition`) and its endpoints (``DescribeEndpoints``). Pure: no I/O."""
    out: list[Finding] = dms_task_findings(definition, tables=facts.get("tables") or [])
    settings = definition.get("settings") or {}
    meta = settings.get("TargetMetadata") or {}
    lobs = facts.get("lob_columns") or []
    big_json = {c: n for c, n in (facts.get("json_max_bytes") or {}).items() if n > JSON_SAMPLE_BYTES}
    full_lob = bool(meta.get("FullLobMode")) and meta.get("SupportLobs", True) is not False
    if lobs:
        if meta.get("SupportLobs") is False:
            out.append(Finding("LOB columns (DMS)", "block", lobs,
                               "refused: the task does not migrate LOBs (SupportLobs false): these columns would "
                               "arrive empty"))
        elif full_lob:
            out.append(Finding("LOB columns (DMS)", "info", lobs,
                               "full LOB mode: each value migrated whole, whatever its size (a slower full load)"))
        else:
            max_kb = int(meta.get("LobMaxSize") or 0)
            largest = max(list(big_json.values()) + [0])
            out.append(Finding("LOB columns (DMS)", "block" if largest > max_kb * 1024 else "warn", lobs,
                               f"limited LOB mode truncates every value above LobMaxSize ({max_kb} KB) with only a "
                               "log warning: use full LOB mode (FullLobMode true), or size LobMaxSize from the data"))
    if big_json:
        out.append(Finding("JSON(B) values above 100 KB (DMS)", "warn" if full_lob else "block",
                           [f"{c}: {n:,} bytes (sampled)" for c, n in sorted(big_json.items())],
                           "moved as LOBs piece by piece (full LOB mode: slow but whole)" if full_lob else
                           "refused: limited LOB mode would cut them; use full LOB mode"))
    unread = [c for c, n in (facts.get("json_max_bytes") or {}).items() if n < 0]
    if unread:
        out.append(Finding("JSON(B) columns whose size could not be sampled", "warn", unread,
                           "their largest value is unknown: full LOB mode carries any size"))
    pg_src = source_endpoint.get("PostgreSQLSettings") or {}
    if pg_src.get("CaptureDdls", True) is not False:
        out.append(Finding("DMS DDL capture on the leader", "block", ["CaptureDdls true (DMS's default)"],
                           "refused: at its start DMS would create its DDL artifacts (a table, a function, an event "
                           "trigger: superuser only) on the leader; tern refuses DDL during hop 2 with its own guard "
                           "instead: set CaptureDdls false on the source endpoint"))
    if pg_src.get("HeartbeatEnable"):
        out.append(Finding("DMS heartbeat on the leader", "warn", [
            f"every {pg_src.get('HeartbeatFrequency') or 5} min in schema {pg_src.get('HeartbeatSchema') or 'public'}"],
            "DMS writes on the leader as the replication role, which the fence lets through: a heartbeat inside "
            "failover-aurora's window makes its proof refuse and the failover falls back (safe; run it again); "
            "its table is created at the task's first start, before the DDL guard"))
    if str(pg_src.get("PluginName") or "").lower() == "pglogical" and not facts.get("pglogical"):
        out.append(Finding("DMS decoding plugin", "block", ["PluginName pglogical"],
                           "refused: the leader has no pglogical extension (adding it needs a restart); set "
                           "PluginName test_decoding on the source endpoint"))
    triggers = facts.get("triggers") or []
    script = str((target_endpoint.get("PostgreSQLSettings") or {}).get("AfterConnectScript") or "")
    replica_writes = "session_replication_role" in script.lower() and "replica" in script.lower()
    if triggers and not replica_writes:
        out.append(Finding("triggers that would fire on DMS's writes", "block", triggers,
                           "refused: DMS writes to Aurora as an ordinary session, so these triggers would fire on "
                           "every row it applies; set the target endpoint's AfterConnectScript to "
                           "SET session_replication_role = replica (infra/dms.py does)"))
    odd = facts.get("odd_types") or []
    if odd:
        out.append(Finding("column types DMS carries as text or not at all", "warn", odd,
                           "checked by DMS's validation and tern's gate; a mismatch refuses the failover"))
    out.append(Finding("DDL", "info", ["neither engine replicates DDL"],
                       "the DDL guard on the leader refuses it from the end of replicate-aurora until the switch"))
    if native_subscription:
        out.append(Finding("native subscription on Aurora", "block", ["tern_aurora"],
                           "refused: Aurora already follows the leader through native logical replication; two "
                           "engines would apply every change twice (keep --engine native, or rebuild Aurora)"))
    status = getattr(task_status, "status", None)
    if status == "failed-move" or getattr(task_status, "failure", None):
        out.append(Finding("DMS task state", "block", [getattr(task_status, "failure", None) or str(status)],
                           "refused: the task is in a failed state; fix the cause (its CloudWatch log) and resume "
                           "or reload it with DMS before running replicate-aurora again"))
    if aurora_has_rows and getattr(task_status, "never_started", False):
        out.append(Finding("Aurora's tables hold rows", "block", ["the app's database on Aurora"],
                           "refused: the task's first start loads every table into them (DO_NOTHING keeps the rows): "
                           "duplicates; empty Aurora's tables first"))
    return out


def dms_task_findings(definition: dict[str, Any], *, tables: list[str] | tuple[str, ...] = ()) -> list[Finding]:
    """What the DMS task's own declaration must say for tern to trust it (also re-checked by failover-aurora's
    preflight): full load and CDC, target tables left alone, validation on, transactional apply (the sentinel
    proof), and a selection of tern's sentinel and of every one of the leader's ``tables``. Pure."""
    out: list[Finding] = []
    settings = definition.get("settings") or {}
    if definition.get("migration_type") != "full-load-and-cdc":
        out.append(Finding("DMS migration type", "block", [str(definition.get("migration_type"))],
                           "refused: the task must be full-load-and-cdc (a copy, then every change until the switch)"))
    prep = (settings.get("FullLoadSettings") or {}).get("TargetTablePrepMode")
    if prep != "DO_NOTHING":
        out.append(Finding("DMS target table preparation", "block", [str(prep)],
                           "refused: tern copies the schema to Aurora first (keys, types, defaults DMS would not "
                           "create); the task must leave it alone (TargetTablePrepMode DO_NOTHING)"))
    validation = settings.get("ValidationSettings") or {}
    if not validation.get("EnableValidation"):
        out.append(Finding("DMS validation", "block", ["EnableValidation false"],
                           "refused: tern reads DMS's per-table validation (failed and suspended records) before "
                           "and during failover-aurora; enable it in the task settings"))
    if (settings.get("ChangeProcessingTuning") or {}).get("BatchApplyEnabled"):
        out.append(Finding("DMS batch apply", "block", ["BatchApplyEnabled true"],
                           "refused: failover-aurora proves catch-up by a sentinel row written last on the leader; "
                           "that proof holds only when DMS applies transactions one by one in commit order "
                           "(transactional apply: BatchApplyEnabled false)"))
    control = (settings.get("ControlTablesSettings") or {}).get("ControlSchema") or ""
    if control != TERN_SCHEMA:
        out.append(Finding("DMS control tables on Aurora", "block", [f"ControlSchema {control or '(the default)'}"],
                           "refused: DMS creates its control tables (awsdms_apply_exceptions, "
                           "awsdms_validation_failures_v1) on Aurora, where tern's verification would count them as "
                           f"differences; set ControlTablesSettings.ControlSchema to {TERN_SCHEMA} (left out of it)"))
    mappings = definition.get("mappings") or {}
    unselected = [t for t in tables if not _dms_selected(*t.split(".", 1), mappings)]
    sentinel = f"{TERN_SCHEMA}.sentinel"
    if not _dms_selected(TERN_SCHEMA, "sentinel", mappings):
        out.append(Finding("tern's sentinel table not in the DMS task", "block", [sentinel],
                           "refused: failover-aurora's catch-up proof is that row arriving on Aurora; add a selection "
                           f"rule for schema {TERN_SCHEMA}, table sentinel (infra/dms.py declares one)"))
    unselected = [t for t in unselected if t != sentinel]
    if unselected:
        out.append(Finding("tables the DMS task does not select", "block", unselected,
                           "refused: they would not reach Aurora; add their schemas to the task's table mappings "
                           "(infra: DmsArgs.schemas)"))
    return out
