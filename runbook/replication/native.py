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


def prepare_leader(leader: PgHost, database: str, app_role: str, password: str) -> str:
    """tern's schema and sentinel table (owned by the app's role), the replication role, the publication."""
    exists = leader.query(f"SELECT 1 FROM pg_roles WHERE rolname = {literal(REPLICATION_ROLE)}")
    verb = "ALTER" if exists else "CREATE"
    leader.psql(BYPASS_GUARD
                + f"{verb} ROLE {REPLICATION_ROLE} LOGIN REPLICATION PASSWORD {literal(scram_verifier(password))};\n"
                + f"GRANT pg_read_all_data TO {REPLICATION_ROLE};\n"
                + f"CREATE SCHEMA IF NOT EXISTS {TERN_SCHEMA} AUTHORIZATION \"{app_role}\";\n"
                + f"CREATE TABLE IF NOT EXISTS {TERN_SCHEMA}.sentinel (run_id text PRIMARY KEY, "
                  "written_at timestamptz NOT NULL DEFAULT now());\n"
                + f"ALTER TABLE {TERN_SCHEMA}.sentinel OWNER TO \"{app_role}\";\n", database=database)
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


def table_states(master: psycopg.Connection) -> dict[str, str]:
    """Per table: i (initialize), d (copying), f/s (finishing), r (ready: streaming changes)."""
    rows = master.execute(
        "SELECT n.nspname || '.' || c.relname, r.srsubstate FROM pg_subscription_rel r "
        "JOIN pg_subscription s ON s.oid = r.srsubid JOIN pg_class c ON c.oid = r.srrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE s.subname = %s ORDER BY 1", (SUBSCRIPTION,)).fetchall()
    return {t: s for t, s in rows}


def lag(leader: PgHost) -> dict[str, Any]:
    """Bytes between the leader's *current* LSN and what Aurora confirmed (the slot), never from sent_lsn."""
    rows = leader.query("SELECT pg_current_wal_insert_lsn()::text AS now, confirmed_flush_lsn::text AS confirmed, "
                        "active, wal_status FROM pg_replication_slots "
                        f"WHERE slot_name = {literal(SUBSCRIPTION)}")
    if not rows:
        return {"slot": False, "lag_bytes": None, "active": False, "wal_status": None, "leader_lsn": None}
    r = rows[0]
    behind = None if r["confirmed"] is None else lsn_to_int(r["now"]) - lsn_to_int(r["confirmed"])
    return {"slot": True, "lag_bytes": behind, "active": r["active"], "wal_status": r["wal_status"],
            "leader_lsn": r["now"], "confirmed_lsn": r["confirmed"]}


def master_connection(url: str, timeout: float):
    return connect(url, purpose="aurora", timeout=timeout)
