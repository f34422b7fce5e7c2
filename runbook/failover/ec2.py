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
from ..errors import (DatabaseError, NotPromoted, PreflightError, RunbookError, StepError, TimeoutExpired,
                      VerificationError)
from ..measure import record_lag
from ..polling import wait_until
from ..pg import connect, lsn_to_int, replay_target, url_endpoint, url_user
from ..postgres import literal
from ..status import TIMELINE_SQL, replica_status
from ..steps import Step
from ..verify import choose_sample, gate
from . import fence as fence_mod
from .app_steps import (app_started, background_types, maintenance_step, restore_workers, start_app, stop_workers,
                        workers_stopped)
from .fence import next_xid
from . import pooler_switch, witness
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
    wanted = ctx.data.requested_candidate
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
        prepared = fence_mod.prepared_transactions(conn)
        if prepared:
            raise PreflightError(f"{len(prepared)} prepared transactions on the source ({', '.join(prepared[:5])}) "
                                 "could commit after the copy: COMMIT PREPARED or ROLLBACK PREPARED them first")
        limit, system_id = conn.execute(
            "SELECT datconnlimit, (SELECT system_identifier::text FROM pg_control_system()) "
            "FROM pg_database WHERE datname = current_database()").fetchone()
        unlogged = [r[0] for r in conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p') ORDER BY 1").fetchall()]
    host, port = ctx.source_endpoint()
    notes = [collation]
    if unlogged:
        notes.append(f"unlogged tables are not copied by a physical replica and will be EMPTY on the new leader: "
                     f"{', '.join(unlogged)}")
    if pooler_switch.mode(ctx) == "pooler":
        notes.append(pooler_switch.check(ctx))
    return {"candidate": candidate, "others": [n for n in statuses if n != candidate],
            "source_timeline": timeline, "source_endpoint": f"{host}:{port}",
            "source_connection_limit": limit, "source_system_identifier": system_id, "unlogged_tables": unlogged,
            "formation": ctx.app.formation(), "collation": collation,
            "detail": f"candidate {candidate}; " + "; ".join(notes)}


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


# -- 3/4. stop the app: runbook/failover/app_steps.py (shared with failover-aurora) -------
# -- 5. fence ----------------------------------------------------------------------------
def fence(ctx: Context) -> dict[str, Any]:
    done = fence_mod.apply(ctx.held(), app_url=ctx.source_url(), timeout=ctx.settings.stop_app_timeout,
                           interval=ctx.settings.poll_interval)
    return {"fenced_at": time.time(), "fence": done,
            "detail": f"database {done['database']}: new sessions refused (connection limit {done['limit']}, "
                      f"tern's own), read-only defaults; {done['terminated']} sessions terminated"}


def prove_fenced(ctx: Context) -> None:
    fence_mod.prove(ctx.held(), app_url=ctx.source_url())


def fence_holds(ctx: Context) -> bool:
    try:
        prove_fenced(ctx)
        return True
    except (StepError, DatabaseError):
        return False


def unfence(ctx: Context) -> None:
    fence_mod.lift(ctx.source_url(), ctx.sessions, previous_limit=int(ctx.data.get("source_connection_limit", -1)),
                   timeout=ctx.settings.connect_timeout)
    ctx.sessions = None


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
            # the reload reaches the startup process asynchronously; pausing replay takes effect at
            # once, so a segment restored meanwhile is not replayed past the coming fork point
            pg.psql("SELECT pg_wal_replay_pause();\nALTER SYSTEM SET restore_command = '';\n"
                    "SELECT pg_reload_conf();")
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
    ctx.pg(name).psql(f"ALTER SYSTEM SET restore_command = {literal(cmd)};\nSELECT pg_reload_conf();\n"
                      "SELECT pg_wal_replay_resume();")


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
    final = ctx.data.final_lsn
    if final is None or ctx.data.final_next_xid is None:
        return False
    try:
        return (replayed(ctx, ctx.data["candidate"]) or 0) >= replay_target(lsn_to_int(final))
    except RunbookError:
        return False


def flush(ctx: Context) -> dict[str, Any]:
    if ctx.settings.flush_mode not in ("fill", "archive_timeout"):
        raise PreflightError(f"unknown flush_mode {ctx.settings.flush_mode!r} (fill or archive_timeout)")
    updates: dict[str, Any] = {}
    conn = ctx.held().control
    if ctx.data.final_lsn is None:
        # nothing that could commit later may be running when the final LSN is taken
        fence_mod.wait_quiet(conn, timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
        final = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        ctx.checkpoint(final_lsn=final)   # journaled at once: a resumed run waits for this same LSN
    final_lsn = lsn_to_int(ctx.data["final_lsn"])
    if ctx.data.final_next_xid is None:
        fill_segment(conn, final_lsn, ctx.settings.flush_mode)
        # from here on no transaction may start on the source: the promotion proves it (the snapshot's
        # xmax stays, and nothing is in progress); something already running now breaks the fence
        xid = str(fence_mod.prove_quiet(conn, {next_xid(conn)}, what="the source"))
        ctx.checkpoint(final_next_xid=xid)
    t0 = time.monotonic()
    deadline = t0 + ctx.settings.catchup_timeout
    while True:
        candidate = ctx.data["candidate"]
        try:
            lsn = replayed(ctx, candidate)
            record_lag(ctx.journal, candidate, None if lsn is None else replay_target(final_lsn) - lsn)   # review
            if lsn is not None and lsn >= replay_target(final_lsn):
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


def fill_segment(conn, final_lsn: int, flush_mode: str) -> None:
    """Fill the rest of the WAL segment holding ``final_lsn`` (``pg_logical_emit_message``, callable by an
    ordinary role): the segment is complete, so the source archives it now, not at archive_timeout."""
    seg = conn.execute("SELECT setting::bigint * CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 "
                       "WHEN 'MB' THEN 1048576 ELSE 1 END FROM pg_settings WHERE name = 'wal_segment_size'"
                       ).fetchone()[0]
    pos = lsn_to_int(conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0])
    target = replay_target(final_lsn)
    if target % seg == 0:
        return   # everything before the final LSN ends with a complete segment (a switch): archived already
    if flush_mode == "fill" and pos // seg == target // seg:
        fill = seg - pos % seg + 64
        with conn.transaction():
            conn.execute("SELECT pg_logical_emit_message(true, 'tern-flush', repeat('x', %s))", (fill,))


def settle(ctx: Context, rounds: int = 3) -> str:
    """After the seal no client can start anything; prove the source quiet and the candidate caught up.

    What the source still wrote since the flush (autovacuum's analyze on a busy database, the
    platform's superuser) is not lost but copied: flush again, wait for the candidate, prove again -
    a few tenths of a second instead of a fallback. Still writing after ``rounds`` flushes: NotPromoted."""
    name = ctx.data["candidate"]
    conn = ctx.held().control
    extra = 0
    for _ in range(rounds + 1):
        fence_mod.terminate_others(ctx.held(), timeout=ctx.settings.stop_app_timeout,
                                   interval=ctx.settings.poll_interval)
        fence_mod.wait_quiet(conn, timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
        accepted = {int(ctx.data["final_next_xid"])}
        if ctx.data.seal_next_xid:
            accepted.add(int(ctx.data["seal_next_xid"]))
        moved = False
        try:
            xmax = fence_mod.prove_quiet(conn, accepted, what="the source")
        except NotPromoted:
            if extra >= rounds:
                raise NotPromoted(f"the source kept writing after the seal ({extra} more flushes): "
                                  "not promoting") from None
            # the source wrote since the flush: make that the new final point and copy it too
            moved, extra = True, extra + 1
            final = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
            fill_segment(conn, lsn_to_int(final), ctx.settings.flush_mode)
            xid = str(fence_mod.prove_quiet(conn, {next_xid(conn)}, what="the source"))
            ctx.checkpoint(final_lsn=final, final_next_xid=xid, seal_next_xid=None)
        want = replay_target(lsn_to_int(ctx.data["final_lsn"]))
        try:
            wait_until(lambda: (replayed(ctx, name) or 0) >= want, timeout=ctx.settings.catchup_timeout,
                       interval=ctx.settings.poll_interval, what=f"{name} to replay {ctx.data['final_lsn']}")
        except RunbookError as exc:
            raise NotPromoted(f"{name} did not replay the final LSN after the seal: {exc}") from None
        if not moved:
            copied = f" (it wrote after the flush: {extra} more flushes, copied too)" if extra else ""
            return (f"no transaction on the source since {ctx.data['final_lsn']} (xmax {xmax}, none running)"
                    f"{copied}; {name} replayed it")
    raise NotPromoted("the source kept writing after the seal: not promoting")


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
    ctx.checkpoint(candidate=best, others=others, candidate_failed={failed: why})
    snap = snapshot(ctx)
    ctx.checkpoint(snapshot={**(ctx.data.snapshot or {}), **snap["snapshot"]})
    return {"candidate": best, "others": others}


# -- 7. verify ---------------------------------------------------------------------------
def sample(ctx: Context) -> dict[str, Any]:
    """Choose the gate's sample now and read its rows once on the source and the candidate: inside
    the window the gate then reads memory. Cold, a few thousand random rows per table cost seconds
    on a large database (measured: 3-5 s of a 5 GB sandbox's window), and more on EBS. The keys stay
    in memory; a resumed run samples inside the window instead (slower, as safe)."""
    name = ctx.data["candidate"]
    plan = choose_sample(ctx.source_url(), ctx.replica_url(name), sample_percent=ctx.settings.sample_percent,
                         sample_rows=ctx.settings.gate_sample_rows, sample_timeout=ctx.settings.gate_sample_timeout,
                         timeout=ctx.settings.connect_timeout)
    ctx.sample_plan = plan
    return {"detail": f"{plan.rows:,} rows of {len(plan.keys)} tables chosen and read on the source and "
                      f"{name} in {plan.seconds:.2f}s"}


def verify(ctx: Context) -> dict[str, Any]:
    # A physical copy shows each sequence up to 32 values ahead (PostgreSQL WAL-logs sequences
    # ahead of use, SEQ_LOG_VALS): a target at or ahead of the source is right; behind is a loss.
    # Inside the window only what costs O(catalog + sample): identity, schema, sequences, a bounded
    # sample; the full comparison runs after the switch, against a replica stopped at the final LSN.
    name = ctx.data["candidate"]
    identity = check_identity(ctx, name)
    result = gate(ctx.source_url(), ctx.replica_url(name), sample_percent=ctx.settings.sample_percent,
                  sample_rows=ctx.settings.gate_sample_rows, sample_timeout=ctx.settings.gate_sample_timeout,
                  sequences="at_least",
                  timeout=ctx.settings.connect_timeout, source_connections=ctx.held().verification()[:1],
                  sample_plan=ctx.sample_plan)
    summary = result.summary()
    summary["identity"] = identity
    summary["sample_read_before_the_window"] = ctx.sample_plan is not None
    ctx.checkpoint(verification=summary)
    if not result.ok:
        raise VerificationError("frozen source and candidate differ: " + "; ".join(result.differences()[:10]))
    skipped = f"; unlogged, not compared: {', '.join(result.skipped)}" if result.skipped else ""
    return {"verification": summary, "detail": f"{identity}; {summary['tables']} tables, "
                                               f"{summary['sampled_rows']:,} rows sampled, sequences at or ahead, "
                                               f"schema equal{skipped}"}


def check_identity(ctx: Context, name: str) -> str:
    """The candidate is a copy of this source (system identifier), on its timeline, at the final LSN."""
    pg = ctx.pg(name)
    row = pg.query_one("SELECT system_identifier::text AS id, pg_is_in_recovery() AS r, "
                       "pg_last_wal_replay_lsn()::text AS lsn FROM pg_control_system()")
    want = ctx.data.source_system_identifier
    if want and row["id"] != want:
        raise VerificationError(f"{name} is not a copy of the source: system identifier {row['id']}, source {want}")
    if not row["r"]:
        raise VerificationError(f"{name} is no longer a standby")
    if (lsn_to_int(row["lsn"]) or 0) < replay_target(lsn_to_int(ctx.data["final_lsn"])):
        raise VerificationError(f"{name} replayed only to {row['lsn']}, before the final LSN {ctx.data['final_lsn']}")
    return (f"system identifier {row['id']} matches; replayed {row['lsn']}, everything before the final LSN "
            f"{ctx.data['final_lsn']}")


def prove_nothing_after_final(ctx: Context) -> str:
    """Immediately before the promotion: every other session still gone, no transaction started on
    the source since the flush (or since tern's own seal) and none running, and the candidate replayed
    the final LSN. Otherwise the promotion would lose what the source took: NotPromoted, fall back."""
    name = ctx.data["candidate"]
    accepted = {int(ctx.data["final_next_xid"])}
    if ctx.data.seal_next_xid:
        accepted.add(int(ctx.data["seal_next_xid"]))
    try:
        sessions = ctx.held()
        fence_mod.terminate_others(sessions, timeout=ctx.settings.stop_app_timeout,
                                   interval=ctx.settings.poll_interval)
        xmax = fence_mod.prove_quiet(sessions.control, accepted, what="the source")
    except NotPromoted:
        raise
    except (RunbookError, psycopg.Error) as exc:
        raise NotPromoted(f"cannot prove that nothing was written after the final LSN: {exc}") from None
    lsn = replayed(ctx, name)
    if (lsn or 0) < replay_target(lsn_to_int(ctx.data["final_lsn"])):
        raise NotPromoted(f"{name} has replayed only {lsn} < final LSN {ctx.data['final_lsn']}: not promoting")
    return f"no transaction since the flush (xmax {xmax}, none running); {name} replayed the final LSN"


# -- 8. promote (point of no return) -------------------------------------------------
def promote(ctx: Context) -> dict[str, Any]:
    name = ctx.data["candidate"]
    pg = ctx.pg(name)
    proof = "already promoted"
    if pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        seal_source(ctx)        # first: from here on no client can start anything on the source
        proof = settle(ctx)     # then: quiet, and everything it wrote replayed by the candidate
        pg.psql(f"SELECT pg_promote(true, {int(ctx.settings.promote_timeout)})", timeout=ctx.settings.promote_timeout + 10)
    deadline = time.monotonic() + ctx.settings.promote_timeout
    while pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"{name} did not leave recovery within {ctx.settings.promote_timeout:.0f}s")
        time.sleep(ctx.settings.poll_interval)
    # no CHECKPOINT here: PostgreSQL requests one itself after a promotion, in the background; a
    # synchronous one held the window for as long as the dirty buffers took to write (0.3 s at 5 GB)
    # the fence reached the replica through WAL: lift it on the new leader only
    url = ctx.source_url()
    db = url_endpoint(url)[2]
    role = url_user(url)
    previous = int(ctx.data.get("source_connection_limit", -1))
    pg.psql("SET default_transaction_read_only = off;\n"
            + "".join(st.as_string(None) + ";\n" for st in fence_mod.lift_statements(db, role, previous)))
    # the moment the new leader took writes (reports, windows): journaled at once, and a resumed promote keeps
    # the first one (only a crash between the lift and this line loses it: the resumed run's moment is then used)
    promoted_at = ctx.data.promoted_at
    if promoted_at is None:
        promoted_at = time.time()
        ctx.checkpoint(promoted_at=promoted_at)
    timeline = pg.query_one(f"SELECT {TIMELINE_SQL} AS timeline_id")["timeline_id"]
    return {"new_leader": name, "leader_timeline": timeline, "promoted_at": promoted_at, "final_proof": proof,
            "detail": f"{name} leads on timeline {timeline} ({proof})"}


def seal_source(ctx: Context) -> None:
    """The old source admits no new session ever again (connection limit 0; tern's open sessions stay,
    for the verification after the switch): stale dynos and pooled clients cannot write to it. The
    seal's own transaction id is journaled at once, so the proof after it (and a resumed run) accepts it."""
    if ctx.data.sealed:
        return
    try:
        conn = ctx.held().control
        db = conn.execute("SELECT current_database()").fetchone()[0]
        after = fence_mod.seal(conn, db, int(ctx.data["final_next_xid"]))
    except RunbookError as exc:
        raise NotPromoted(f"cannot seal the source before the promotion: {exc}") from None
    except psycopg.Error as exc:
        raise NotPromoted(f"cannot seal the source before the promotion: {str(exc).strip()}") from None
    seal_xid = str(after) if after else None     # None: something else wrote since the flush (settle copies it)
    ctx.checkpoint(sealed=True, seal_next_xid=seal_xid)


def verify_promoted(ctx: Context) -> None:
    name = ctx.data["candidate"]
    pg = ctx.pg(name)
    row = pg.query_one(f"SELECT pg_is_in_recovery() AS r, CASE WHEN pg_is_in_recovery() THEN 0 "
                       f"ELSE {TIMELINE_SQL} END AS tl")
    if row["r"]:
        raise StepError(f"{name} is still in recovery")
    if row["tl"] <= ctx.data["source_timeline"]:
        raise StepError(f"{name} is on timeline {row['tl']}, not past the source's {ctx.data['source_timeline']}")
    with connect(ctx.tern_replica_url(name), purpose="promote-check", timeout=ctx.settings.connect_timeout) as conn:
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


def switch_pooler(ctx: Context) -> dict[str, Any]:
    return pooler_switch.switch_to(ctx, ctx.replica_url(ctx.data["candidate"]))


def pooler_switched(ctx: Context) -> bool:
    return pooler_switch.switched_to(ctx, ctx.replica_url(ctx.data["candidate"]))


def smoke_test(ctx: Context) -> dict[str, Any]:
    host, port = leader_endpoint(ctx)
    if ctx.data.app_endpoint:   # pooler mode: the app writes through the pooler, which names the leader now
        host, _, p = ctx.data.app_endpoint.rpartition(":")
        port = int(p)
    since = ctx.data.switched_at or 0.0
    what = ctx.app.smoke_test(host, port, since=since, timeout=ctx.settings.smoke_timeout)
    return {"smoke_test": what, "detail": what}


def plan(mode: str = "url") -> list[Step]:
    """The steps; ``mode`` pooler moves the app through PgBouncer (:mod:`.pooler_switch`), url by DATABASE_URL."""
    pooled = mode == "pooler"
    if pooled:
        into_pooler = [pooler_switch.auth_step(),
                       Step("pooler_in", "the app's DATABASE_URL -> the pooler, pointing at the source (one restart, "
                                         "outside the window)", pooler_switch.pooler_in,
                            check=pooler_switch.pooler_in_done, revert=pooler_switch.pooler_out,
                            revert_hint="the app's DATABASE_URL names the pooler (pointing at the source): set it back "
                                        "to the source's URL if you do not want it there")]
        freeze = pooler_switch.pause_step()
        move = Step("switch", "the pooler -> the new leader, RESUME (no config-var change, no restart)",
                    switch_pooler, check=pooler_switched)
    else:
        into_pooler = []
        freeze = maintenance_step()
        move = Step("switch", "switch DATABASE_URL to the new leader", switch, check=switched)
    return [
        Step("preflight", "preflight: replicas, candidate, collation", preflight),
        Step("snapshot", "snapshot of the candidate", snapshot, check=snapshot_done),
        *into_pooler,
        Step("stop_workers", "stop background workers", stop_workers, check=workers_stopped, revert=restore_workers,
             revert_hint="the background workers are still scaled to 0: scale them back to the formation in the "
                         "report"),
        Step("sample", "choose the gate's sample and read it on both sides (outside the window)", sample),
        freeze,
        Step("fence", "fence the source (no new session, every other one gone) and prove it", fence,
             check=fence_holds, verify=prove_fenced, revert=unfence, recheck=prove_fenced,
             revert_hint="the source is still fenced: as the database's owner, from another database, run "
                         "ALTER DATABASE <db> CONNECTION LIMIT -1 (or its old limit) and ALTER DATABASE <db> / "
                         "ALTER ROLE <role> RESET default_transaction_read_only"),
        Step("detach_others", "detach the other replicas from the archive", detach_others, check=others_detached,
             revert=reattach_others),
        Step("flush", "flush the last WAL segment and wait for the candidate", flush, check=flush_done,
             recheck=lambda ctx: prove_nothing_after_final(ctx)),
        Step("verify", "verify frozen source against the candidate", verify),
        # no check: promote's act is idempotent and must always record the new leader's context
        Step("promote", "promote the candidate", promote, verify=verify_promoted, point_of_no_return=True),
        move,
        Step("start_app", "start the web, then the workers", start_app, check=app_started),
        Step("smoke_test", "smoke test through the app", smoke_test),
        # after the app is back: following the new leader concerns only the other replicas
        # outside the window: every row of the frozen source against a replica held at the final LSN
        Step("verify_full", "verify every row against a replica held at the final LSN", witness.verify_full),
        Step("repoint", "repoint the other replicas to the new leader", repoint),
    ]


STEP_NAMES = [s.name for s in plan()]
POOLER_STEP_NAMES = [s.name for s in plan("pooler")]
