"""Hop 2's full verification: every row of Aurora against EC2 at one consistent point, before the freeze.

A logical copy can differ from its source where a physical one cannot: a trigger or rule firing on the
subscriber, a row written on Aurora by hand, an apply error skipped, a type whose text form differs, a
table left out of the publication. So every row is compared, outside the window (the app keeps running) -
and both sides must be read at the same point of the leader's history while the app goes on writing. That
point is a commit boundary where Aurora stops:

1. an EC2 standby of the leader (after failover 1 the other replicas stream from it) pauses its replay;
2. a marker row is committed on the leader after that pause (tern's sentinel table) and tern waits until
   Aurora has it: Aurora's stop point is then past the standby's position, even when the app writes
   nothing (a standby that replayed past the stop point could not be held there);
3. the subscription is disabled on Aurora: its apply worker exits between transactions, and the
   subscription's replication origin's ``remote_lsn`` - the end LSN of the last transaction it applied - is
   the point L;
4. the standby restarts with ``recovery_target_lsn = L``, ``recovery_target_inclusive = off``: it stops
   before the first record at or after L, i.e. exactly after that commit (:mod:`.hold`);
5. the verification engine compares every row of Aurora with the standby (sequences aside: logical
   replication never carries them; the failover sets them at the switch);
6. always - also on an error, and on the next attempt or the fallback after a killed run (the journal
   says what is held) - the subscription is enabled again and the standby released: its recovery target
   reset and restarted, it streams from the leader again on the same timeline (nothing to rebuild). Every
   wait is bounded.

The leader keeps WAL for Aurora's slot and the standby's while they are held: at the app's write rate,
the verification's duration must fit in ``max_slot_wal_keep_size`` (the slot's ``safe_wal_size`` is in
the report; a lost slot fails the step).

A difference refuses the failover before anything is frozen (the app never stopped), naming the tables.
"""

from __future__ import annotations

import time
from typing import Any

from psycopg import sql

from ..adapters.aurora import aurora_api_for
from ..errors import PreflightError, RunbookError, VerificationError
from ..pg import lsn_to_int
from ..polling import wait_until
from ..redact import redact
from ..replication import SUBSCRIPTION, TERN_SCHEMA, native
from ..replication.leader import aurora_master_url
from ..verify import verify as run_verify
from . import hold
from .context import Context

VERIFY_JOBS = 2


def pick_standby(ctx: Context, leader_name: str) -> str | None:
    """The first other EC2 replica that is a running standby streaming from the leader."""
    leader = ctx.replica(leader_name)
    for r in ctx.outputs.replicas:
        if r.name == leader_name:
            continue
        pg = ctx.pg(r.name)
        try:
            if not (pg.has_data() and pg.is_running()):
                continue
            row = pg.query_one("SELECT pg_is_in_recovery() AS standby, (SELECT sender_host || ':' || sender_port "
                               "FROM pg_stat_wal_receiver WHERE status = 'streaming') AS upstream")
        except RunbookError:
            continue
        if row["standby"] and row["upstream"] == f"{leader.host}:{leader.port}":
            return r.name
    return None


def _master(ctx: Context):
    return native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout)


def _journal_hold(ctx: Context, value: dict[str, Any] | None) -> None:
    ctx.checkpoint(consistent_point_hold=value)


def verify_full(ctx: Context) -> dict[str, Any]:
    leader_name = ctx.data["leader"]
    if ctx.settings.full_verification == "skip":
        why = "" if pick_standby(ctx, leader_name) else f"; no EC2 standby streams from {leader_name}"
        note = (f"skipped (tern.full_verification = skip{why}): compare Aurora with the EC2 leader by "
                "`invoke verify --mode full` while both are frozen")
        return {"verification_full": {"ok": None, "note": note}, "detail": note}
    release(ctx)   # what a killed attempt left held
    name = pick_standby(ctx, leader_name)
    if name is None:
        raise PreflightError(f"no EC2 standby streams from {leader_name}: nothing to hold where Aurora stops for the "
                             "full verification (set tern.full_verification = skip to go without it)")
    _journal_hold(ctx, {"standby": name})
    t0 = time.monotonic()
    point: dict[str, Any] = {}
    failure: BaseException | None = None
    released: dict[str, Any] | None = None
    try:
        point = stop_at_one_point(ctx, name)
        t1 = time.monotonic()
        result = run_verify(hold.read_url(ctx, name), aurora_master_url(ctx.outputs), mode="full",
                            sequences="skip", timeout=ctx.settings.connect_timeout, jobs=VERIFY_JOBS,
                            skip_unlogged=True, ignore_extensions=True)
        point["verify_seconds"] = round(time.monotonic() - t1, 3)
    except BaseException as exc:   # noqa: BLE001 - released below in every case, then raised again
        failure = exc
        raise
    finally:
        try:
            released = release(ctx)
        except RunbookError as exc:
            if failure is None:
                raise
            ctx.say(f"release after a failed full verification failed too: {redact(exc)}")
    stopped_at = point.pop("stopped_at")
    enabled_at = (released or {}).get("enabled_at") or time.monotonic()
    point["aurora_paused_seconds"] = round(enabled_at - stopped_at, 3)
    summary = result.summary()
    summary.update(standby=name, seconds=round(time.monotonic() - t0, 3), **point,
                   released=(released or {}).get("done"))
    if not result.ok:
        ctx.checkpoint(verification_full=summary)
        tables = sorted({t.table for t in result.tables if not t.ok})
        what = ", ".join(tables) or "schema"
        raise VerificationError(
            f"Aurora differs from {name} held at {point['lsn']} (the last transaction Aurora applied) in {what}: "
            + "; ".join(result.differences()[:10])
            + f". Nothing was frozen: the app still runs on {leader_name}; repair Aurora (or set up replication "
              "again), then run failover-aurora again")
    return {"verification_full": summary,
            "detail": f"every row of {summary['tables']} tables ({summary['rows']:,} rows) equal between Aurora and "
                      f"{name} held at {point['lsn']} ({summary['seconds']:.1f}s, of which {point['verify_seconds']:.1f}s "
                      f"comparing; Aurora paused {point['aurora_paused_seconds']:.1f}s)"}


def stop_at_one_point(ctx: Context, name: str) -> dict[str, Any]:
    """Steps 1-4: Aurora stopped at a commit boundary L, the standby held exactly there."""
    s = ctx.settings
    spg = ctx.pg(name)
    api = aurora_api_for(ctx.outputs.aurora)
    database = ctx.outputs.aurora.database
    paused_at = hold.pause(spg)                                  # 1. the standby stops replaying
    key = f"verify_full:{ctx.journal.run_id}"
    with ctx.source("verify-full") as conn:                      # 2. a marker committed after the pause
        written = conn.execute(sql.SQL("INSERT INTO {}.sentinel (run_id) VALUES (%s) ON CONFLICT (run_id) DO UPDATE "
                                       "SET written_at = clock_timestamp() RETURNING written_at").format(
            sql.Identifier(TERN_SCHEMA)), (key,)).fetchone()[0]
    with _master(ctx) as master:
        def marker_applied() -> bool:
            return bool(master.execute(sql.SQL("SELECT 1 FROM {}.sentinel WHERE run_id = %s AND written_at >= %s")
                                       .format(sql.Identifier(TERN_SCHEMA)), (key, written)).fetchone())

        wait_until(marker_applied, timeout=s.catchup_timeout, interval=max(s.poll_interval, 0.1),
                   what="Aurora to apply the full verification's marker")
        _journal_hold(ctx, {"standby": name, "subscription_disabled": True})
        api.subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} DISABLE", database)   # 3. Aurora stops
        stopped_at = time.monotonic()
        wait_until(lambda: not native.apply_worker_running(master), timeout=s.catchup_timeout,
                   interval=max(s.poll_interval, 0.1), what="Aurora's apply worker to stop")
    point = native.applied_commit_lsn(api, database)
    if point is None:
        raise RunbookError(f"Aurora reports no applied transaction for {SUBSCRIPTION} (its replication origin)")
    if lsn_to_int(point) <= lsn_to_int(paused_at):
        raise RunbookError(f"Aurora stopped at {point}, not past {name}'s paused replay at {paused_at}: not holding it")
    held_at = hold.hold(spg, point, stop_timeout=s.promote_timeout, start_timeout=s.restore_timeout,   # 4.
                        reach_timeout=s.catchup_timeout, interval=s.poll_interval, what=name)
    if lsn_to_int(held_at) > lsn_to_int(point):
        raise RunbookError(f"{name} replayed to {held_at}, past Aurora's point {point}: not one point")
    return {"lsn": point, "standby_lsn": held_at, "standby_paused_at": paused_at, "stopped_at": stopped_at}


def release(ctx: Context) -> dict[str, Any] | None:
    """Step 6, and the step's revert: the subscription enabled and the standby streaming again, if the
    journal says they may be held. Idempotent; every wait bounded. Returns what it did (``done``) and
    when the subscription was enabled again (``enabled_at``, monotonic); None when nothing was held."""
    held_now = ctx.data.consistent_point_hold
    if not held_now:
        return None
    s = ctx.settings
    done, problems, enabled_at = [], [], None
    if held_now.get("subscription_disabled"):
        try:
            api = aurora_api_for(ctx.outputs.aurora)
            api.subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} ENABLE", ctx.outputs.aurora.database)
            enabled_at = time.monotonic()
            leader_pg = ctx.pg(ctx.data["leader"])

            def streaming() -> bool:
                look = native.lag(leader_pg)
                if look["wal_status"] == "lost":
                    raise RunbookError(f"the replication slot {SUBSCRIPTION} was lost while Aurora was paused "
                                       "(it outgrew max_slot_wal_keep_size): set up replication again")
                return bool(look["slot"] and look["active"])

            wait_until(streaming, timeout=s.catchup_timeout, interval=0.2,
                       what=f"Aurora's subscription {SUBSCRIPTION} to stream again")
            done.append("subscription enabled")
        except RunbookError as exc:
            problems.append(f"the subscription {SUBSCRIPTION} on Aurora: {redact(exc)}")
    name = held_now.get("standby")
    if name:
        try:
            pg = ctx.pg(name)
            hold.release(pg, stop_timeout=s.promote_timeout, start_timeout=s.restore_timeout)
            leader = ctx.replica(ctx.data["leader"])

            def following() -> bool:
                row = pg.query_one("SELECT pg_is_wal_replay_paused() AS paused, (SELECT sender_host || ':' || "
                                   "sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming') AS upstream")
                return not row["paused"] and row["upstream"] == f"{leader.host}:{leader.port}"

            wait_until(following, timeout=s.repoint_timeout, interval=0.2,
                       what=f"{name} to stream from {ctx.data['leader']} again")
            done.append(f"{name} streaming again")
        except RunbookError as exc:
            problems.append(f"the standby {name}: {redact(exc)}")
    if problems:
        raise RunbookError("could not release what the full verification held: " + "; ".join(problems)
                           + " (run failover-aurora again, or ALTER SUBSCRIPTION ... ENABLE on Aurora and reset "
                             "recovery_target_* on the standby and restart it)")
    _journal_hold(ctx, None)
    return {"done": "; ".join(done), "enabled_at": enabled_at}
