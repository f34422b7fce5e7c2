"""The schema, copied from the EC2 leader to Aurora as Aurora's master role (no superuser there).

* The app's role is created on Aurora with the same SCRAM verifier (read on the leader, where tern
  is superuser): the app's own URL works unchanged at Aurora. The master is made a member of it,
  and the app's database is handed to it, as on Heroku (the app owns its database: the fence works
  there too, for the rollback).
* ``pg_dump --schema-only --no-owner --no-acl`` on the leader's host; restored with ``SET ROLE``
  to the app's role, so every object belongs to it. Extensions Aurora does not offer are left out.
* Split for a fast initial copy: tables and sequences before it; each table's primary key (the replica
  identity the apply needs), then its secondary indexes, as soon as its copy ends (native; DMS gets the
  keys first); foreign keys and triggers after.
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from ..errors import DatabaseError, PreflightError
from ..pg import url_user
from ..postgres import PgHost, literal
from ..redact import register_secret

ENTRY = re.compile(r"^--\n-- (?:Name|Data for Name): .*?; Type: (?P<type>[A-Z ]+);", re.M)
HEADER = re.compile(r"^-- Name: (?P<name>.*?); Type: (?P<type>[A-Z ]+); Schema: (?P<schema>[^;]*);", re.M)


def dump(leader: PgHost, database: str, section: str) -> str:
    argv = [f"{leader.bin_dir.rstrip('/')}/pg_dump", "-h", leader.socket_dir, "-p", str(leader.port),
            "-U", leader._user(), "-d", database, "--schema-only", "--no-owner", "--no-acl",
            f"--section={section}", "--no-comments", "--no-publications", "--no-subscriptions"]
    res = leader.host.run(argv, timeout=600)
    # psql meta-commands (pg_dump's \restrict guard lines) are not SQL: the restore runs over psycopg
    return "".join(line for line in res.stdout.splitlines(keepends=True) if not line.startswith("\\"))


def entries(text: str) -> list[tuple[str, str]]:
    """(type, statement text) per dump entry."""
    marks = list(ENTRY.finditer(text))
    out = []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append((m["type"].strip(), text[m.start():end]))
    return out


def preamble(text: str) -> str:
    m = ENTRY.search(text)
    return text[:m.start()] if m else text


def without_extensions(text: str, allowed: set[str]) -> tuple[str, list[tuple[str, str | None]], list[str]]:
    """The dump without its CREATE EXTENSION entries; (name, schema) of those Aurora offers (created
    through the Aurora adapter, as rds_superuser may), and the names of those it does not."""
    skipped: list[str] = []
    wanted: list[tuple[str, str | None]] = []
    kept = []
    for kind, body in entries(text):
        if kind == "EXTENSION":
            m = re.search(r"CREATE EXTENSION IF NOT EXISTS (\S+)(?: WITH SCHEMA (\S+))?;", body)
            ext = m.group(1).strip('"') if m else ""
            if ext in allowed:
                wanted.append((ext, m.group(2).strip('"') if m and m.group(2) else None))
            else:
                skipped.append(ext)
            continue
        kept.append(body)
    return preamble(text) + "".join(kept), wanted, skipped


def partitioned_tables(leader: PgHost, database: str) -> set[str]:
    """``schema.table`` of every partitioned table and partition on the leader: their keys are built before the
    copy (the subscription lists only the root, so the copy's finisher never sees a partition's state)."""
    rows = leader.query("SELECT n.nspname || '.' || c.relname AS tbl FROM pg_class c JOIN pg_namespace n "
                        "ON n.oid = c.relnamespace WHERE c.relkind = 'p' OR c.relispartition", database=database)
    return {r["tbl"] for r in rows}


def keys_of(keys_text: str, tables: set[str]) -> str:
    """The key entries of ``keys_text`` (split_post_data's first part) that belong to ``tables``."""
    out = []
    for _kind, body in entries(keys_text):
        m = re.search(r'ALTER TABLE (?:ONLY )?((?:"[^"]+"|[^\s."(]+)\.(?:"[^"]+"|[^\s"(]+))', body)
        name = ".".join(part.strip('"') for part in re.findall(r'"[^"]+"|[^.]+', m.group(1))) if m else ""
        if name in tables:
            out.append(body)
    return preamble(keys_text) + "".join(out)


def split_post_data(text: str) -> tuple[str, str]:
    """(primary keys, the rest): keys before the initial copy, the rest after it."""
    keys, rest = [], []
    for kind, body in entries(text):
        if kind == "EVENT TRIGGER":
            continue   # tern's DDL guard belongs to the leader only
        (keys if kind == "CONSTRAINT" and "PRIMARY KEY" in body else rest).append(body)
    head = preamble(text)
    return head + "".join(keys), head + "".join(rest)


def copy_role(leader: PgHost, database: str, aurora: psycopg.Connection, role: str, master: str) -> str:
    """The app's role on Aurora with the leader's password verifier; the master a member; the app's
    database owned by it. Returns what was done.

    The verifier is a secret (an offline guess at the password starts from it): it is read only where it
    stays between tern and the server (:meth:`PgHost.query_private`: the local socket or TLS, never the
    host's command channel, which keeps what it carries) and registered so that no message shows it."""
    rows = leader.query_private(f"SELECT rolpassword AS v FROM pg_authid WHERE rolname = {literal(role)}",
                                database=database)
    verifier = str(rows[0]["v"]) if rows and rows[0].get("v") else ""
    register_secret(verifier)
    if not verifier.startswith("SCRAM-SHA-256$"):
        raise PreflightError(f"the app's role {role} has no SCRAM password on the leader: cannot copy it to Aurora")
    exists = aurora.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    aurora.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(verifier)))
    aurora.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(master)))
    db = aurora.execute("SELECT current_database()").fetchone()[0]
    aurora.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(db), sql.Identifier(role)))
    return f"role {role} {'updated' if exists else 'created'} on Aurora (same password verifier), owns {db}"


def restore(aurora: psycopg.Connection, text: str, role: str, what: str) -> None:
    """Run dump text on Aurora as the app's role; a statement Aurora refuses stops it with a clear message."""
    try:
        with aurora.transaction():
            aurora.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            aurora.execute(text)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PreflightError(f"Aurora refused part of the {what} (no superuser there): "
                             f"{str(exc).strip().splitlines()[0]}") from None
    except psycopg.Error as exc:
        raise DatabaseError(f"copying the {what} to Aurora failed: {str(exc).strip().splitlines()[0]}") from None


def present(aurora: psycopg.Connection, body: str) -> bool:
    """The object a post-data dump entry creates (index, constraint, trigger) is on Aurora already - read in
    the catalog, without the table locks the statement itself would wait for (autovacuum, the apply)."""
    m = HEADER.search(body)
    if not m:
        return False
    kind, nsp, name = m["type"].strip(), m["schema"].strip(), m["name"].strip()
    if kind == "INDEX":
        return bool(aurora.execute("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                                   "WHERE n.nspname = %s AND c.relname = %s", (nsp, name)).fetchone())
    table, _, obj = name.partition(" ")   # "table name" for constraints and triggers
    if kind in ("CONSTRAINT", "FK CONSTRAINT", "CHECK CONSTRAINT"):
        return bool(aurora.execute("SELECT 1 FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid "
                                   "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
                                   "AND c.relname = %s AND k.conname = %s", (nsp, table, obj)).fetchone())
    if kind == "TRIGGER":
        return bool(aurora.execute("SELECT 1 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                                   "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s "
                                   "AND c.relname = %s AND t.tgname = %s", (nsp, table, obj)).fetchone())
    return False


def set_autovacuum(aurora: psycopg.Connection, role: str, enabled: bool, leader: dict[str, str] | None = None) -> int:
    """Autovacuum off on every table during the initial copy, on again after it: a vacuum started by the
    bulk inserts holds a lock every index build and foreign key of that table then waits for (up to
    deadlock_timeout, until PostgreSQL cancels the vacuum). tern analyzes each table itself; the vacuum
    runs once autovacuum is back. Anti-wraparound vacuums run either way.

    ``enabled``: each table as on the leader - its own ``autovacuum_enabled`` where it set one
    (``leader``: table -> value, from :func:`autovacuum_settings`), the default elsewhere. Returns the
    number of tables."""
    # the app's tables only (an extension's, e.g. PostGIS's spatial_ref_sys, belong to the master: left alone)
    tables = aurora.execute("SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c "
                            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                            "AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_' "
                            "AND c.relowner = (SELECT oid FROM pg_roles WHERE rolname = %s) ORDER BY 1",
                            (role,)).fetchall()
    leader = leader or {}
    statements = []
    for (t,) in tables:
        if not enabled:
            statements.append(f"ALTER TABLE {t} SET (autovacuum_enabled = false);\n")
        elif t in leader:
            statements.append(f"ALTER TABLE {t} SET (autovacuum_enabled = {literal(leader[t])});\n")
        else:
            statements.append(f"ALTER TABLE {t} RESET (autovacuum_enabled);\n")
    if statements:
        restore(aurora, "".join(statements), role, "autovacuum settings")
    return len(tables)


def autovacuum_settings(leader: PgHost, database: str) -> dict[str, str]:
    """The tables the app set ``autovacuum_enabled`` on, on the leader (``schema.table`` -> value)."""
    # not "t": PgHost.query wraps the select as t (json_agg(t) would aggregate the column, not the row)
    rows = leader.query("SELECT format('%I.%I', n.nspname, c.relname) AS tbl, split_part(o, '=', 2) AS val "
                        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, unnest(c.reloptions) o "
                        "WHERE c.relkind = 'r' AND o LIKE 'autovacuum\\_enabled=%'", database=database)
    return {r["tbl"]: r["val"] for r in rows}


def has_tables(aurora: psycopg.Connection) -> bool:
    return bool(aurora.execute(
        "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') LIMIT 1").fetchone())


def app_role(app_url: str) -> str:
    return url_user(app_url)
