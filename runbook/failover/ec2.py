"""Failover 1: Heroku -> EC2 (``invoke failover-ec2``).

The plan, in order (each a :class:`~runbook.steps.Step`):

1. ``preflight``: replicas healthy and within the lag threshold; the candidate (named, or
   the most advanced); collation versions and amcheck on the candidate.
2. ``snapshot``: a snapshot of the candidate (before any downtime).
3. ``stop_workers``: background jobs first (formation to 0, saved for later).
4. ``maintenance_on``: the web stops taking writes.
5. ``fence``: the source becomes read-only for the app role, its sessions are terminated,
   and a fresh write attempt must fail.
6. ``detach_others``: the other replicas stop reading the archive (they stream from the new
   leader after the promotion instead; see :func:`detach_others`).
7. ``flush``: record the source's final LSN, fill the current WAL segment with
   ``pg_logical_emit_message`` so it is archived now (no superuser, no archive_timeout wait),
   wait until the candidate has replayed the final LSN.
8. ``verify``: row counts, sequences and a sample of rows, frozen source against the
   caught-up candidate - *before* the point of no return, so a difference still falls back.
9. ``promote`` (**point of no return**): pg_promote, checkpoint, lift the copied fence,
   writable on a new timeline.
10. ``switch``: DATABASE_URL to the new leader (the source URL kept for rollback).
11. ``start_app``: web out of maintenance, then the workers back.
12. ``smoke_test``: one write and one read through the app on the new leader.
13. ``repoint``: the other replicas stream from the new leader (slot, replication role), or
    are rebuilt from it when they provably cannot follow the new timeline (never on a timer;
    see :mod:`runbook.failover.repoint`); one not following fails the step. It runs after the
    app is back because it does not concern the app: it stays out of the downtime.

Any failure before ``promote`` falls back: the source is unfenced and the app restarted on it.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from ..adapters.snapshots import snapshots_for
from ..errors import DatabaseError, PreflightError, RunbookError, StepError, TimeoutExpired, VerificationError
from ..pg import connect, lsn_to_int, url_endpoint, url_user
from ..postgres import literal
from ..status import TIMELINE_SQL, replica_status
from ..steps import Step
from ..verify import gate
from .context import Context
from .repoint import repoint

KIND = "failover-ec2"


# -- 1. preflight ---------------------------------------------------------------------
def replica_health(ctx: Context) -> tuple[int, dict[str, dict[str, Any]]]:
    with ctx.source("preflight") as conn:
        source_lsn = lsn_to_int(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    return source_lsn, {r.name: replica_status(r, source_lsn) for r in ctx.outputs.replicas}


def healthy(status: dict[str, Any], max_lag: int) -> str | None:
    """None when healthy, else why not."""
    if status["role"] != "standby":
        return f"role is {status['role']}" + (f" ({status['error']})" if status.get("error") else "")
    if status["lag_bytes"] is None:
        return "lag unknown"
    if status["lag_bytes"] > max_lag:
        return f"{status['lag_bytes']:,} bytes behind the source (threshold {max_lag:,})"
    return None


def preflight(ctx: Context) -> dict[str, Any]:
    _, statuses = replica_health(ctx)
    max_lag = ctx.settings.max_lag_bytes
    problems = {n: healthy(s, max_lag) for n, s in statuses.items()}
    wanted = ctx.data.get("requested_candidate")
    if wanted:
        if problems[wanted]:
            raise PreflightError(f"candidate {wanted} is not ready: {problems[wanted]}")
        candidate = wanted
    else:
        ready = [n for n, p in problems.items() if p is None]
        if not ready:
            raise PreflightError("no replica is ready: " + "; ".join(f"{n}: {p}" for n, p in problems.items()))
        candidate = max(ready, key=lambda n: lsn_to_int(statuses[n]["lsn"]) or 0)
    collation = check_collation(ctx, candidate)
    with ctx.source("preflight") as conn:
        timeline = conn.execute(f"SELECT {TIMELINE_SQL}").fetchone()[0]
    host, port = ctx.source_endpoint()
    return {"candidate": candidate, "others": [n for n in statuses if n != candidate],
            "source_timeline": timeline, "source_endpoint": f"{host}:{port}",
            "formation": ctx.app.formation(), "collation": collation,
            "detail": f"candidate {candidate}; {collation}"}


def check_collation(ctx: Context, candidate: str) -> str:
    """Collation provider versions must match, and text indexes must pass amcheck, on the candidate."""
    pg = ctx.pg(candidate)
    db = ctx.replica(candidate).database
    with ctx.source("preflight") as conn:
        src = conn.execute("SELECT pg_database_collation_actual_version(oid) FROM pg_database "
                           "WHERE datname = current_database()").fetchone()[0]
    row = pg.query_one("SELECT datcollversion AS recorded, pg_database_collation_actual_version(oid) AS actual "
                       f"FROM pg_database WHERE datname = {literal(db)}")
    if src != row["actual"] or (row["recorded"] and row["recorded"] != row["actual"]):
        raise PreflightError(f"{candidate}: collation version differs from the source's (source {src}, replica "
                             f"{row['actual']}, recorded {row['recorded']}): text indexes may be corrupt")
    has_amcheck = pg.query("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'")
    if not has_amcheck:
        return f"collation version {src} matches; amcheck not installed in the source, indexes not checked"
    indexes = pg.query("""
        SELECT DISTINCT i.indexrelid::regclass::text AS name, i.indexrelid::int AS oid
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE am.amname = 'btree' AND a.attcollation <> 0 AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    """)
    for idx in indexes:
        try:
            pg.psql(f"SELECT bt_index_check({int(idx['oid'])}::regclass)", timeout=600)
        except DatabaseError as exc:
            raise PreflightError(f"{candidate}: amcheck failed on index {idx['name']}: {exc}") from None
    return f"collation version {src} matches; amcheck passed on {len(indexes)} text indexes"


# -- 2. snapshot -------------------------------------------------------------------------
def snapshot_label(ctx: Context) -> str:
    return f"{ctx.journal.run_id}"


def snapshot_done(ctx: Context) -> bool:
    name = ctx.data["candidate"]
    return snapshots_for(ctx.replica(name), ctx.pg(name)).exists(snapshot_label(ctx))


def snapshot(ctx: Context) -> dict[str, Any]:
    name = ctx.data["candidate"]
    where = snapshots_for(ctx.replica(name), ctx.pg(name)).create(snapshot_label(ctx),
                                                                  timeout=ctx.settings.restore_timeout)
    return {"snapshot": {name: where}, "detail": f"{name}: {where}"}


# -- 3/4. stop the app ---------------------------------------------------------------------
def background_types(ctx: Context) -> dict[str, int]:
    return {t: n for t, n in ctx.data["formation"].items() if t != "web"}


def stop_workers(ctx: Context) -> dict[str, Any]:
    ctx.app.scale({t: 0 for t in background_types(ctx)}, timeout=ctx.settings.stop_app_timeout)
    return {"detail": f"scaled {', '.join(background_types(ctx)) or 'nothing'} to 0"}


def workers_stopped(ctx: Context) -> bool:
    running = ctx.app.running()
    return all(running.get(t, 0) == 0 for t in background_types(ctx))


def restore_workers(ctx: Context) -> None:
    ctx.app.scale(background_types(ctx), timeout=ctx.settings.stop_app_timeout)


def maintenance_on(ctx: Context) -> dict[str, Any]:
    ctx.app.set_maintenance(True)
    return {"maintenance_at": time.time()}


# -- 5. fence ----------------------------------------------------------------------------
def fence_statements(db: str, role: str, on: bool) -> list[psycopg.sql.Composable]:
    """Make (or stop making) every new session of ``role`` and of ``db`` read-only by default."""
    action = psycopg.sql.SQL("SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only")
    return [psycopg.sql.SQL("ALTER DATABASE {} {}").format(psycopg.sql.Identifier(db), action),
            psycopg.sql.SQL("ALTER ROLE {} {}").format(psycopg.sql.Identifier(role), action)]


def set_fence(ctx: Context, on: bool) -> tuple[str, str]:
    with ctx.source("fence" if on else "unfence") as conn:
        db, role = conn.execute("SELECT current_database(), current_user").fetchone()
        for statement in fence_statements(db, role, on):
            conn.execute(statement)
    return db, role


def fence(ctx: Context) -> dict[str, Any]:
    db, role = set_fence(ctx, True)
    with ctx.source("fence") as conn:
        killed = conn.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE usename = current_user AND pid <> pg_backend_pid()").fetchone()[0]
    return {"fenced_at": time.time(), "detail": f"database {db} and role {role} read-only; {killed} sessions terminated"}


def prove_fenced(ctx: Context) -> None:
    """A fresh session of the app role must not be able to write."""
    with connect(ctx.source_url(), purpose="fence-proof", timeout=ctx.settings.connect_timeout) as conn:
        try:
            conn.execute("CREATE TABLE tern_fence_probe ()")
        except psycopg.errors.ReadOnlySqlTransaction:
            pass
        else:
            conn.execute("DROP TABLE tern_fence_probe")
            raise StepError("the fence does not hold: a new session of the app role could write")
        others = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = current_user "
                              "AND pid <> pg_backend_pid() AND backend_xid IS NOT NULL").fetchone()[0]
        if others:
            raise StepError(f"the fence does not hold: {others} sessions of the app role still hold a write transaction")


def fence_holds(ctx: Context) -> bool:
    try:
        prove_fenced(ctx)
        return True
    except (StepError, DatabaseError):
        return False


def unfence(ctx: Context) -> None:
    set_fence(ctx, False)


# -- 5b. detach the other replicas from the archive --------------------------------------------
def detach_others(ctx: Context) -> dict[str, Any]:
    """Stop the non-candidate replicas reading the archive before its last segment is filled.

    That segment ends inside a record the new leader never replays (the fill crosses into the
    next segment); a replica that read it could not follow the new timeline. Instead, after the
    promotion the others stream what they miss from the new leader, which keeps it (wal_keep_size).
    """
    done, skipped = [], []
    for name in ctx.data["others"]:
        pg = ctx.pg(name)
        try:
            pg.psql("ALTER SYSTEM SET restore_command = '';\nSELECT pg_reload_conf();")
            done.append(name)
        except RunbookError as exc:
            skipped.append(f"{name} ({exc})")
    detail = f"detached {', '.join(done) or 'none'}" + (f"; unreachable: {'; '.join(skipped)}" if skipped else "")
    return {"detached": done, "detail": detail}


def others_detached(ctx: Context) -> bool:
    for name in ctx.data["others"]:
        try:
            if ctx.pg(name).query_one("SELECT current_setting('restore_command') AS c")["c"]:
                return False
        except RunbookError:
            continue
    return True


def attach_to_archive(ctx: Context, name: str) -> None:
    from ..archive import restore_command

    cmd = restore_command(ctx.outputs.source.archive)
    ctx.pg(name).psql(f"ALTER SYSTEM SET restore_command = {literal(cmd)};\nSELECT pg_reload_conf();")


def reattach_others(ctx: Context) -> None:
    for name in ctx.data["others"]:
        try:
            attach_to_archive(ctx, name)
        except RunbookError:
            if ctx.pg(name).has_data() and ctx.pg(name).is_running():
                raise


# -- 6. flush ----------------------------------------------------------------------------
def replayed(ctx: Context, name: str) -> int | None:
    row = ctx.pg(name).query_one("SELECT pg_last_wal_replay_lsn()::text AS lsn, pg_is_in_recovery() AS r")
    if not row["r"]:
        raise StepError(f"{name} is no longer a standby")
    return lsn_to_int(row["lsn"])


def flush_done(ctx: Context) -> bool:
    final = ctx.data.get("final_lsn")
    if final is None:
        return False
    try:
        return (replayed(ctx, ctx.data["candidate"]) or 0) >= lsn_to_int(final)
    except RunbookError:
        return False


def flush(ctx: Context) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    if ctx.data.get("final_lsn") is None:
        with ctx.source("flush") as conn:
            final = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        # journaled at once: a resumed run waits for this same LSN
        ctx.journal.record("flush", "progress", context={"final_lsn": final})
        ctx.data["final_lsn"] = final
    final_lsn = lsn_to_int(ctx.data["final_lsn"])
    with ctx.source("flush") as conn:
        seg = conn.execute("SELECT setting::bigint * CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 "
                           "WHEN 'MB' THEN 1048576 ELSE 1 END FROM pg_settings WHERE name = 'wal_segment_size'"
                           ).fetchone()[0]
        pos = lsn_to_int(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
        if ctx.settings.flush_mode not in ("fill", "archive_timeout"):
            raise PreflightError(f"unknown flush_mode {ctx.settings.flush_mode!r} (fill or archive_timeout)")
        if ctx.settings.flush_mode == "fill" and (pos // seg == final_lsn // seg or pos % seg == 0):
            # fill the rest of the segment holding the final LSN: it is complete, so it is archived now
            fill = seg - pos % seg + 64
            conn.execute("BEGIN")
            conn.execute("SELECT pg_logical_emit_message(true, 'tern-flush', repeat('x', %s))", (fill,))
            conn.execute("COMMIT")
    t0 = time.monotonic()
    deadline = t0 + ctx.settings.catchup_timeout
    while True:
        candidate = ctx.data["candidate"]
        try:
            lsn = replayed(ctx, candidate)
            if lsn is not None and lsn >= final_lsn:
                break
        except RunbookError as exc:
            updates.update(switch_candidate(ctx, candidate, str(exc)))
            continue
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"{candidate} did not replay the final LSN {ctx.data['final_lsn']} within "
                                 f"{ctx.settings.catchup_timeout:.0f}s")
        time.sleep(ctx.settings.poll_interval)
    updates["catchup_seconds"] = round(time.monotonic() - t0, 3)
    updates["detail"] = (f"final LSN {ctx.data['final_lsn']} replayed by {ctx.data['candidate']} in "
                         f"{updates['catchup_seconds']:.2f}s")
    return updates


def switch_candidate(ctx: Context, failed: str, why: str) -> dict[str, Any]:
    """The candidate died during catch-up: take the most advanced other standby (and snapshot it)."""
    best, best_lsn = None, -1
    for name in ctx.data["others"]:
        try:
            lsn = replayed(ctx, name)
        except RunbookError:
            continue
        if lsn is not None and lsn > best_lsn:
            best, best_lsn = name, lsn
    if best is None:
        raise StepError(f"candidate {failed} failed ({why}) and no other replica is available")
    others = [n for n in ctx.data["others"] if n != best] + [failed]
    ctx.say(f"candidate {failed} failed ({why}); switching to {best}")
    attach_to_archive(ctx, best)   # it was detached from the archive with the others
    ctx.data.update(candidate=best, others=others)
    ctx.journal.record("flush", "progress", context={"candidate": best, "others": others,
                                                      "candidate_failed": {failed: why}})
    snap = snapshot(ctx)
    ctx.journal.record("flush", "progress", context={"snapshot": {**ctx.data.get("snapshot", {}), **snap["snapshot"]}})
    return {"candidate": best, "others": others}


# -- 7. verify ---------------------------------------------------------------------------
def verify(ctx: Context) -> dict[str, Any]:
    # A physical copy shows each sequence up to 32 values ahead (PostgreSQL WAL-logs sequences
    # ahead of use, SEQ_LOG_VALS): a target at or ahead of the source is right; behind is a loss.
    result = gate(ctx.source_url(), ctx.replica_url(ctx.data["candidate"]),
                  sample_percent=ctx.settings.sample_percent, sequences="at_least",
                  timeout=ctx.settings.connect_timeout)
    summary = result.summary()
    ctx.journal.record("verify", "progress", context={"verification": summary})
    if not result.ok:
        raise VerificationError("frozen source and candidate differ: " + "; ".join(result.differences()[:10]))
    return {"verification": summary, "detail": f"{summary['tables']} tables, {summary['rows']:,} rows counted, "
                                               f"{summary['sampled_rows']:,} sampled, sequences at or ahead, schema equal"}


# -- 8. promote (point of no return) -------------------------------------------------
def promote(ctx: Context) -> dict[str, Any]:
    name = ctx.data["candidate"]
    pg = ctx.pg(name)
    if pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        pg.psql(f"SELECT pg_promote(true, {int(ctx.settings.promote_timeout)})", timeout=ctx.settings.promote_timeout + 10)
    deadline = time.monotonic() + ctx.settings.promote_timeout
    while pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"{name} did not leave recovery within {ctx.settings.promote_timeout:.0f}s")
        time.sleep(ctx.settings.poll_interval)
    pg.psql("CHECKPOINT", timeout=ctx.settings.promote_timeout)
    # the fence reached the replica through WAL: lift it on the new leader only
    url = ctx.source_url()
    db = url_endpoint(url)[2]
    role = url_user(url)
    pg.psql("SET default_transaction_read_only = off;\n"
            + "".join(st.as_string(None) + ";\n" for st in fence_statements(db, role, False)))
    timeline = pg.query_one("SELECT timeline_id FROM pg_control_checkpoint()")["timeline_id"]
    return {"new_leader": name, "leader_timeline": timeline, "promoted_at": time.time(),
            "detail": f"{name} leads on timeline {timeline}"}


def verify_promoted(ctx: Context) -> None:
    name = ctx.data["candidate"]
    pg = ctx.pg(name)
    row = pg.query_one("SELECT pg_is_in_recovery() AS r, (SELECT timeline_id FROM pg_control_checkpoint()) AS tl")
    if row["r"]:
        raise StepError(f"{name} is still in recovery")
    if row["tl"] <= ctx.data["source_timeline"]:
        raise StepError(f"{name} is on timeline {row['tl']}, not past the source's {ctx.data['source_timeline']}")
    with connect(ctx.replica_url(name), purpose="promote-check", timeout=ctx.settings.connect_timeout) as conn:
        if conn.execute("SHOW default_transaction_read_only").fetchone()[0] != "off":
            raise StepError(f"{name} is still read-only for the app role")
        conn.execute("SELECT txid_current()")


# -- 9. repoint: runbook/failover/repoint.py (imported above; the next plan imports it too) --


# -- 10-12. switch, start, smoke test -----------------------------------------------------
def leader_endpoint(ctx: Context) -> tuple[str, int]:
    r = ctx.replica(ctx.data["candidate"])
    return r.host, r.port


def switched(ctx: Context) -> bool:
    url = ctx.app.config_var(ctx.outputs.source.database_url_var)
    return bool(url) and url_endpoint(url)[:2] == leader_endpoint(ctx)


def switch(ctx: Context) -> dict[str, Any]:
    source = ctx.source_url()
    new = ctx.replica_url(ctx.data["candidate"])
    ctx.app.set_config_vars({ctx.outputs.source.database_url_var: new, "TERN_SOURCE_DATABASE_URL": source})
    host, port = leader_endpoint(ctx)
    return {"switched_at": time.time(), "detail": f"{ctx.outputs.source.database_url_var} -> {host}:{port} "
                                                  "(source URL kept in TERN_SOURCE_DATABASE_URL)"}


def start_app(ctx: Context) -> dict[str, Any]:
    ctx.app.set_maintenance(False)
    ctx.app.scale(background_types(ctx), timeout=ctx.settings.stop_app_timeout)
    return {"started_at": time.time(), "detail": f"maintenance off; formation {ctx.data['formation']}"}


def app_started(ctx: Context) -> bool:
    running = ctx.app.running()
    return not ctx.app.maintenance() and all(running.get(t, 0) >= n for t, n in background_types(ctx).items())


def smoke_test(ctx: Context) -> dict[str, Any]:
    host, port = leader_endpoint(ctx)
    since = ctx.data.get("switched_at", 0.0)
    what = ctx.app.smoke_test(host, port, since=since, timeout=ctx.settings.smoke_timeout)
    return {"smoke_test": what, "detail": what}


def plan() -> list[Step]:
    return [
        Step("preflight", "preflight: replicas, candidate, collation", preflight),
        Step("snapshot", "snapshot of the candidate", snapshot, check=snapshot_done),
        Step("stop_workers", "stop background workers", stop_workers, check=workers_stopped, revert=restore_workers),
        Step("maintenance_on", "maintenance mode on (web stops writing)", maintenance_on,
             check=lambda ctx: ctx.app.maintenance(), revert=lambda ctx: ctx.app.set_maintenance(False)),
        Step("fence", "fence the source (read-only for the app role) and prove it", fence, check=fence_holds,
             verify=prove_fenced, revert=unfence),
        Step("detach_others", "detach the other replicas from the archive", detach_others, check=others_detached,
             revert=reattach_others),
        Step("flush", "flush the last WAL segment and wait for the candidate", flush, check=flush_done),
        Step("verify", "verify frozen source against the candidate", verify),
        # no check: promote's act is idempotent and must always record the new leader's context
        Step("promote", "promote the candidate", promote, verify=verify_promoted, point_of_no_return=True),
        Step("switch", "switch DATABASE_URL to the new leader", switch, check=switched),
        Step("start_app", "start the web, then the workers", start_app, check=app_started),
        Step("smoke_test", "smoke test through the app", smoke_test),
        # after the app is back: following the new leader concerns only the other replicas
        Step("repoint", "repoint the other replicas to the new leader", repoint),
    ]


STEP_NAMES = [s.name for s in plan()]
