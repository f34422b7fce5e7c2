"""Native logical replication: a publication on the EC2 leader, a subscription on Aurora.

On Aurora the subscription statements go through the Aurora adapter (on AWS the master user, a
member of ``rds_superuser``, may run them; the sandbox's stand-in runs exactly those statements
through its privileged path). Everything else on Aurora runs as its master role.
"""

from __future__ import annotations

from typing import Any

import psycopg

from ..pg import connect, lsn_to_int, scram_verifier
from ..postgres import PgHost, literal
from . import PUBLICATION, SUBSCRIPTION, TERN_SCHEMA

REPLICATION_ROLE = "tern_replicator"
# tern's own sessions on the leader bypass its DDL guard (event triggers fire only for origin sessions)
BYPASS_GUARD = "SET session_replication_role = replica;\n"

GUARD = f"""
CREATE OR REPLACE FUNCTION {TERN_SCHEMA}.refuse_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'tern: % refused: this database replicates to Aurora and neither logical replication nor DMS '
                  'carries DDL; finish the migration (or remove the guard with invoke replicate-aurora --stop) first',
                  tg_tag;
END $$;
DROP EVENT TRIGGER IF EXISTS tern_ddl_guard;
CREATE EVENT TRIGGER tern_ddl_guard ON ddl_command_start EXECUTE FUNCTION {TERN_SCHEMA}.refuse_ddl();
"""


def prepare_leader(leader: PgHost, database: str, app_role: str, password: str, *, publication: bool = True) -> str:
    """tern's schema and sentinel table (owned by the app's role), the replication role, the publication (not
    for DMS, which decodes the leader's WAL through a slot of its own)."""
    exists = leader.query(f"SELECT 1 FROM pg_roles WHERE rolname = {literal(REPLICATION_ROLE)}")
    verb = "ALTER" if exists else "CREATE"
    leader.psql(BYPASS_GUARD
                + f"{verb} ROLE {REPLICATION_ROLE} LOGIN REPLICATION PASSWORD {literal(scram_verifier(password))};\n"
                + f"GRANT pg_read_all_data TO {REPLICATION_ROLE};\n"
                + f"CREATE SCHEMA IF NOT EXISTS {TERN_SCHEMA} AUTHORIZATION \"{app_role}\";\n"
                + f"CREATE TABLE IF NOT EXISTS {TERN_SCHEMA}.sentinel (run_id text PRIMARY KEY, "
                  "written_at timestamptz NOT NULL DEFAULT now());\n"
                + f"ALTER TABLE {TERN_SCHEMA}.sentinel OWNER TO \"{app_role}\";\n", database=database)
    if not publication:
        return f"replication role {REPLICATION_ROLE} and {TERN_SCHEMA}.sentinel ready (no publication: DMS decodes the WAL)"
    if not leader.query(f"SELECT 1 FROM pg_publication WHERE pubname = {literal(PUBLICATION)}", database=database):
        leader.psql(BYPASS_GUARD + f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES "
                    "WITH (publish_via_partition_root = true);", database=database)
        return f"publication {PUBLICATION} created (all tables, partitions through their root)"
    return f"publication {PUBLICATION} present"


def install_guard(leader: PgHost, database: str) -> None:
    leader.psql(BYPASS_GUARD + GUARD, database=database)


def remove_guard(leader: PgHost, database: str) -> None:
    leader.psql(BYPASS_GUARD + "DROP EVENT TRIGGER IF EXISTS tern_ddl_guard;", database=database)


def conninfo(host: str, port: int, database: str, password: str, user: str = REPLICATION_ROLE,
             sslmode: str = "require") -> str:
    def q(v: str) -> str:
        return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"

    return (f"host={q(host)} port={int(port)} dbname={q(database)} user={q(user)} password={q(password)} "
            f"sslmode={sslmode} application_name={SUBSCRIPTION}")


def subscription_exists(master: psycopg.Connection, name: str = SUBSCRIPTION) -> bool:
    return bool(master.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone())


def subscribe(api, master: psycopg.Connection, database: str, info: str) -> str:
    if subscription_exists(master):
        api.subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} ENABLE", database)
        return f"subscription {SUBSCRIPTION} present (enabled)"
    api.subscription_statement(f"CREATE SUBSCRIPTION {SUBSCRIPTION} CONNECTION {literal(info)} "
                               f"PUBLICATION {PUBLICATION} WITH (copy_data = true)", database)
    return f"subscription {SUBSCRIPTION} created: initial copy of every table, then changes as they commit"


# pg_subscription_rel.srsubstate
STATES = {"i": "initialize", "d": "copying", "f": "finished copy", "s": "synchronized", "r": "ready"}


def table_states(master: psycopg.Connection) -> dict[str, str]:
    """Per table: i (initialize), d (copying), f/s (finishing), r (ready: streaming changes)."""
    rows = master.execute(
        "SELECT n.nspname || '.' || c.relname, r.srsubstate FROM pg_subscription_rel r "
        "JOIN pg_subscription s ON s.oid = r.srsubid JOIN pg_class c ON c.oid = r.srrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE s.subname = %s ORDER BY 1", (SUBSCRIPTION,)).fetchall()
    return {t: s for t, s in rows}


def lag(leader: PgHost) -> dict[str, Any]:
    """One look at the leader: its *current* LSN (``pg_current_wal_lsn()``, what it wrote, never ``sent_lsn``)
    against what Aurora confirmed (the slot's ``confirmed_flush_lsn``: applied and flushed there), on the
    leader's clock (``at``, epoch seconds). Also what Aurora's apply worker reported applied
    (``applied_lsn``, not yet flushed there), PostgreSQL's ``replay_lag`` for it (seconds), and what the
    slot may still hold before it is lost (``safe_wal_size``)."""
    rows = leader.query(
        "SELECT extract(epoch FROM clock_timestamp())::float8 AS at, pg_current_wal_lsn()::text AS now, "
        "s.slot_name IS NOT NULL AS slot, s.confirmed_flush_lsn::text AS confirmed, coalesce(s.active, false) AS active, "
        "s.wal_status, s.safe_wal_size, r.replay_lsn::text AS applied, "
        "extract(epoch FROM r.replay_lag)::float8 AS replay_lag "
        f"FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = {literal(SUBSCRIPTION)} "
        "LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid")
    r = rows[0]
    behind = None if r["confirmed"] is None else max(0, lsn_to_int(r["now"]) - lsn_to_int(r["confirmed"]))
    return {"slot": bool(r["slot"]), "lag_bytes": behind, "active": bool(r["active"]), "wal_status": r["wal_status"],
            "leader_lsn": r["now"], "confirmed_lsn": r["confirmed"], "applied_lsn": r["applied"],
            "replay_lag": r["replay_lag"], "safe_wal_size": r["safe_wal_size"], "at": r["at"]}


def sample(leader: PgHost, seconds: float, sleep=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two looks (:func:`lag`) ``seconds`` apart, for the apply headroom (:mod:`.headroom`)."""
    import time

    first = lag(leader)
    (sleep or time.sleep)(seconds)
    return first, lag(leader)


def subscription_enabled(master: psycopg.Connection, name: str = SUBSCRIPTION) -> bool | None:
    """Whether the subscription is enabled (None: there is none)."""
    row = master.execute("SELECT subenabled FROM pg_subscription WHERE subname = %s", (name,)).fetchone()
    return None if row is None else bool(row[0])


def apply_worker_running(master: psycopg.Connection, name: str = SUBSCRIPTION) -> bool:
    """The subscription's apply worker runs (table-sync workers, relid not null, aside)."""
    return bool(master.execute("SELECT 1 FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL "
                               "AND pid IS NOT NULL", (name,)).fetchone())


def applied_commit_lsn(api, database: str, name: str = SUBSCRIPTION) -> str | None:
    """The end LSN, on the leader, of the last transaction Aurora applied and committed: the
    subscription's replication origin's ``remote_lsn`` (``pg_replication_origin_status`` is revoked
    from public: read through the Aurora adapter's catalog query)."""
    rows = api.query("SELECT o.remote_lsn::text AS lsn FROM pg_replication_origin_status o "
                     "JOIN pg_subscription s ON o.external_id = 'pg_' || s.oid::text "
                     f"WHERE s.subname = {literal(name)}", database)
    return rows[0]["lsn"] if rows else None


def master_connection(url: str, timeout: float):
    return connect(url, purpose="aurora", timeout=timeout)
