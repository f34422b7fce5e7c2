"""Rollback of hop 2 (``invoke rollback-aurora``): the app from Aurora back to the EC2 leader.

failover-aurora started replication Aurora -> EC2 (subscription ``tern_rollback`` on the leader) before
the app's first write reached Aurora, so the leader holds every write Aurora took. The plan, in order:

1. ``preflight``: the last failover-aurora completed, the app on Aurora, the reverse subscription on
   the leader enabled and streaming, its lag from Aurora's *current* LSN under ``max_lag_bytes``, no
   prepared transaction on Aurora. Otherwise it refuses, nothing changed.
2. ``hold_leader``: the leader, sealed by failover-aurora (no session admitted), admits tern's own:
   ``CONNECTION LIMIT n`` as its superuser, n sessions of the app's role held, the fence proved.
3. ``stop_workers``, 4. ``maintenance_on``: as in both failovers (:mod:`.app_steps`).
5. ``fence``: Aurora, for the app's role (:func:`.fence.apply_to_role`): its master is no superuser
   and the replication's walsender must stay, so the app's role admits no session anywhere, defaults
   to read-only, its sessions are terminated; a fresh session of it must be refused.
6. ``catch_up``: a sentinel row written on Aurora after the fence; Aurora's final LSN and next
   transaction id recorded; wait until the leader has the sentinel and Aurora's slot confirmed the LSN.
7. ``sequences``: every sequence on the leader set past Aurora's (failover-aurora's code, reversed).
8. ``verify``: the bounded in-window gate, Aurora (frozen) against the leader.
9. ``switch_back`` - the **point of no return**: nothing written on Aurora since the sentinel (one
   more sentinel if something took a transaction id meanwhile), the reverse subscription disabled,
   **replication into Aurora resumed** from the leader's current LSN (its slot advanced past what the
   leader applied from Aurora: Aurora has it), the leader's fence lifted.
10. ``switch``: the app's database URL to the leader (``TERN_EC2_DATABASE_URL`` removed),
11. ``start_app``, 12. ``smoke_test`` through the app on the leader,
13. ``retire_reverse``: the reverse subscription dropped, its slot and publication on Aurora too (an
    unused slot would hold Aurora's WAL).

Any failure before ``switch_back`` falls back on its own: Aurora unfenced, the app back in service on
Aurora, the leader sealed again; the reverse replication keeps running.

After a rollback Aurora follows the leader again (replication resumed) and stays fenced for the app's
role (a stale process cannot write there); ``invoke failover-aurora`` can run again later: it readmits
the app's role at its switch. Where the leader's slot was lost meanwhile, replication is not resumed
and the report says so: rebuild Aurora and run ``invoke replicate-aurora`` before another failover.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..adapters.aurora import aurora_api_for
from ..errors import NotPromoted, PreflightError, RunbookError, StepError, VerificationError
from ..journal import Journal
from ..pg import lsn_to_int, url_endpoint, url_user
from ..polling import wait_until
from ..postgres import literal
from ..replication import REVERSE, SUBSCRIPTION, TERN_SCHEMA, native
from ..replication.leader import EC2_URL_VAR, aurora_app_url, aurora_master_url, leader, leader_url
from ..steps import Step
from ..verify import gate
from .state import RunState
from . import aurora as forward
from . import pooler_switch
from .. import pooler as pooler_mod
from . import fence as fence_mod
from .app_steps import (app_started, maintenance_step, restore_workers, start_app, stop_workers,
                        workers_stopped)
from .context import Context
from .fence import SourceSessions, next_xid

KIND = "rollback-aurora"
LEADER_SESSIONS = 2     # tern's sessions on the leader through the window: control + the gate's


@dataclass
class RollbackContext(Context):
    """The run's context: ``held()`` are tern's sessions on Aurora (its master), ``leader_held()`` on the leader."""

    leader_sessions: SourceSessions | None = None

    def leader_url(self) -> str:
        if pooled(self):   # the app reaches Aurora through the pooler: the leader is the one failover-aurora left
            from ..restore import replica_url

            r = self.replica(self.data.leader or RunState.from_journal(last_failover(self.settings.state_dir)).leader)
            return replica_url(self.app.config_var(self.outputs.source.database_url_var), r)
        return leader_url(self.app, self.outputs)

    def leader_held(self) -> SourceSessions:
        if self.leader_sessions is None:
            self.leader_sessions = SourceSessions(self.leader_url(), count=LEADER_SESSIONS,
                                                  timeout=self.settings.connect_timeout)
        try:
            return self.leader_sessions.open()
        except RunbookError as exc:
            if fence_mod.TOO_MANY not in str(exc):
                raise
        # a resumed run: tern's sessions died with its process and others took their places: end them
        _leader_pg(self).psql(f"SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = "
                              f"{literal(_leader_db(self))} AND backend_type = 'client backend' AND usesysid IN "
                              "(SELECT oid FROM pg_roles WHERE NOT rolsuper)")
        return self.leader_sessions.open()

    def close(self) -> None:
        super().close()
        if self.leader_sessions is not None:
            self.leader_sessions.close()


# the leader and Aurora's master, as failover-aurora reaches them
_leader_pg, _leader_db, _master = forward._leader_pg, forward._db, forward._master


def _app_role(ctx: Context) -> str:
    return ctx.data["app_role"]


# -- 1. preflight -------------------------------------------------------------------------------
def last_failover(state_dir: Path) -> Journal:
    """The failover-aurora this rollback undoes: finished and completed, else PreflightError."""
    current = Journal.current(state_dir, forward.KIND)
    if current is not None:
        raise PreflightError(f"failover-aurora run {current.run_id} is unfinished: run `invoke failover-aurora` "
                             "to finish it (or to fall back) before rolling back")
    run_id = Journal.latest(state_dir, forward.KIND)
    if run_id is None:
        raise PreflightError("failover-aurora has not run on this stack: the app never moved to Aurora, "
                             "nothing to roll back")
    journal = Journal.load(state_dir, run_id)
    outcome = journal.outcome()
    if not outcome or outcome[0] != "completed":
        raise PreflightError(f"the last failover-aurora ({run_id}) ended {outcome[0] if outcome else 'unfinished'}, "
                             "not completed: the app never moved to Aurora, nothing to roll back")
    return journal


def pooled(ctx: Context) -> bool:
    """The app writes through the pooler (failover-aurora switched it there without a config-var change)."""
    return ctx.outputs.pooler is not None and pooler_mod.points_at_pooler(
        ctx.outputs.pooler, ctx.app.config_var(ctx.outputs.source.database_url_var))


def app_on_aurora(ctx: Context) -> bool:
    a = ctx.outputs.aurora
    if pooled(ctx):
        target = pooler_mod.current_target(ctx.outputs.pooler)
        return target is not None and (target.host, target.port) == (a.writer_endpoint, a.port)
    url = ctx.app.config_var(ctx.outputs.source.database_url_var)
    return bool(url) and url_endpoint(url)[:2] == (a.writer_endpoint, a.port)


def reverse_subscription(ctx: Context, name: str) -> dict[str, bool]:
    """The reverse subscription on the leader: ``exists``, ``enabled``, ``running`` (its apply worker)."""
    rows = ctx.pg(name).query(
        "SELECT s.subenabled AS enabled, EXISTS (SELECT 1 FROM pg_stat_subscription st WHERE st.subid = s.oid "
        f"AND st.relid IS NULL AND st.pid IS NOT NULL) AS running FROM pg_subscription s WHERE s.subname = "
        f"{literal(REVERSE)}", database=ctx.replica(name).database)
    return {"exists": bool(rows), "enabled": bool(rows and rows[0]["enabled"]),
            "running": bool(rows and rows[0]["running"])}


def reverse_slot(ctx: Context) -> dict[str, Any]:
    """The reverse replication's slot on Aurora: ``slot``, ``active``, ``wal_status``, ``lag_bytes`` from
    Aurora's *current* LSN (never from what was sent)."""
    with _master(ctx) as master:
        now, confirmed, active, wal_status = master.execute(
            "SELECT pg_current_wal_lsn()::text, s.confirmed_flush_lsn::text, s.active, s.wal_status "
            "FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = %s", (REVERSE,)).fetchone()
    return {"slot": active is not None, "active": bool(active), "wal_status": wal_status,
            "lag_bytes": None if confirmed is None else max(0, lsn_to_int(now) - lsn_to_int(confirmed))}


def wait_streaming(ctx: Context, name: str) -> dict[str, Any]:
    """The reverse replication runs (bounded: an apply worker restarting is not an outage), else PreflightError."""
    seen: dict[str, Any] = {}

    def streaming() -> bool:
        seen.update(reverse_subscription(ctx, name), **reverse_slot(ctx))
        return seen["enabled"] and seen["running"] and seen["active"] and seen["wal_status"] != "lost"

    try:
        wait_until(streaming, timeout=min(30.0, ctx.settings.catchup_timeout), interval=0.5,
                   what=f"the reverse replication Aurora -> {name}")
    except RunbookError:
        if not seen.get("exists"):
            why = (f"there is no reverse subscription {REVERSE} on {name}: Aurora's writes cannot reach it, "
                   "rolling back would lose them")
        elif not seen.get("enabled"):
            why = (f"the reverse subscription {REVERSE} on {name} is disabled: ALTER SUBSCRIPTION {REVERSE} "
                   "ENABLE there (as superuser), wait until it caught up, then run again")
        elif not seen.get("slot") or seen.get("wal_status") == "lost":
            why = (f"the reverse replication slot {REVERSE} on Aurora is missing or lost: Aurora's writes since "
                   "cannot reach the leader; rolling back would lose them")
        else:
            why = (f"the reverse subscription {REVERSE} on {name} is not streaming (its apply worker or Aurora's "
                   "walsender is not running): see the leader's log")
        raise PreflightError(why) from None
    return seen


def preflight(ctx: Context) -> dict[str, Any]:
    failover = last_failover(ctx.settings.state_dir)
    if not app_on_aurora(ctx):
        raise PreflightError("the app's database URL does not point at Aurora: nothing to roll back")
    if pooled(ctx):   # no config var kept: failover-aurora's journal names the leader
        r = ctx.replica(RunState.from_journal(failover).leader)
    elif not ctx.app.config_var(EC2_URL_VAR):
        raise PreflightError(f"the app has no {EC2_URL_VAR} (the EC2 leader's URL failover-aurora keeps): "
                             "cannot tell where to roll back to")
    else:
        r = leader(ctx.app, ctx.outputs)
    seen = wait_streaming(ctx, r.name)
    if seen["lag_bytes"] is not None and seen["lag_bytes"] > ctx.settings.max_lag_bytes:
        raise PreflightError(f"{r.name} is {seen['lag_bytes']:,} bytes behind Aurora (threshold "
                             f"{ctx.settings.max_lag_bytes:,}): wait until the reverse replication catches up")
    role = url_user(ctx.app.config_var(EC2_URL_VAR) or ctx.app.config_var(ctx.outputs.source.database_url_var))
    if pooled(ctx):
        pooler_switch.check(ctx)
    with _master(ctx) as master:
        prepared = fence_mod.prepared_transactions(master)
        if prepared:
            raise PreflightError(f"prepared transactions on Aurora: {', '.join(prepared[:5])}")
        limit = fence_mod.role_connection_limit(master, role)
    a = ctx.outputs.aurora
    before = RunState.from_journal(failover).source_connection_limit   # the leader's, before failover-aurora
    return {"leader": r.name, "app_role": role, "failover_run": failover.run_id,
            "source_endpoint": f"{a.writer_endpoint}:{a.port}", "target_endpoint": f"{r.host}:{r.port}",
            "leader_connection_limit": -1 if before is None else int(before),
            "aurora_role_connection_limit": -1 if limit in (None, 0) else limit,
            "formation": ctx.app.formation(),
            "detail": f"undoes {failover.run_id}; back to {r.name}; reverse replication streaming, "
                      f"{seen['lag_bytes'] or 0:,} bytes behind Aurora"}


# -- 2. tern's sessions on the sealed leader ---------------------------------------------------------
def hold_leader(ctx: Context) -> dict[str, Any]:
    db = _leader_db(ctx)
    _leader_pg(ctx).psql(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT {}").format(
        sql.Identifier(db), sql.Literal(LEADER_SESSIONS)).as_string(None) + ";", database=db)
    sessions = ctx.leader_held()
    fence_mod.terminate_others(sessions, timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
    fence_mod.prove(sessions, app_url=ctx.leader_url())
    return {"detail": f"{ctx.data['leader']}: {LEADER_SESSIONS} sessions of tern held, no other admitted"}


def prove_leader_held(ctx: Context) -> None:
    fence_mod.prove(ctx.leader_held(), app_url=ctx.leader_url())


def reseal_leader(ctx: Context) -> None:
    """Back to failover-aurora's seal: the leader admits no session (the reverse replication's apply stays)."""
    if ctx.leader_sessions is not None:
        ctx.leader_sessions.close()
        ctx.leader_sessions = None
    db = _leader_db(ctx)
    _leader_pg(ctx).psql(sql.SQL("ALTER DATABASE {} CONNECTION LIMIT 0").format(sql.Identifier(db))
                         .as_string(None) + ";", database=db)


# -- 5. fence Aurora for the app's role ----------------------------------------------------------------
def fence(ctx: Context) -> dict[str, Any]:
    done = fence_mod.apply_to_role(ctx.held(), role=_app_role(ctx), app_url=aurora_app_url(ctx.app, ctx.outputs),
                                   timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
    return {"fenced_at": time.time(), "fence": done,
            "detail": f"Aurora: role {done['role']} admits no new session, {done['terminated']} sessions terminated"}


def prove_fenced(ctx: Context) -> None:
    fence_mod.prove(ctx.held(), app_url=aurora_app_url(ctx.app, ctx.outputs))


def unfence(ctx: Context) -> None:
    with _master(ctx) as master:
        fence_mod.lift_role(master, _app_role(ctx), previous_limit=int(ctx.data["aurora_role_connection_limit"]))


# -- 6. catch up: the sentinel ---------------------------------------------------------------------------
def write_sentinel(ctx: Context, sentinel_id: str) -> None:
    """After the fence: wait until nothing runs on Aurora, write the sentinel, record the final point."""
    conn = ctx.held().control
    fence_mod.wait_quiet(conn, timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
    conn.execute(sql.SQL("INSERT INTO {}.sentinel (run_id) VALUES (%s) ON CONFLICT DO NOTHING").format(
        sql.Identifier(TERN_SCHEMA)), (sentinel_id,))
    final = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
    xid = str(fence_mod.prove_quiet(conn, {next_xid(conn)}, what="Aurora"))
    ctx.checkpoint(sentinel_id=sentinel_id, final_lsn=final, final_next_xid=xid)


def applied_final(ctx: Context) -> str | None:
    """The leader has the sentinel and Aurora's slot confirmed the final LSN."""
    if not ctx.leader_held().control.execute(sql.SQL("SELECT 1 FROM {}.sentinel WHERE run_id = %s").format(
            sql.Identifier(TERN_SCHEMA)), (ctx.data["sentinel_id"],)).fetchone():
        return None
    row = ctx.held().control.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                                     "WHERE slot_name = %s", (REVERSE,)).fetchone()
    if not row or row[0] is None or lsn_to_int(row[0]) < lsn_to_int(ctx.data["final_lsn"]):
        return None
    return f"confirmed {row[0]}"


def wait_applied(ctx: Context) -> str:
    return wait_until(lambda: applied_final(ctx), timeout=ctx.settings.catchup_timeout,
                      interval=max(ctx.settings.poll_interval, 0.1),
                      what=f"{ctx.data['leader']} to apply Aurora's sentinel and final LSN",
                      last=lambda: f"{reverse_slot(ctx)['lag_bytes']} bytes behind")


def catch_up(ctx: Context) -> dict[str, Any]:
    if ctx.data.final_next_xid is None:
        write_sentinel(ctx, ctx.journal.run_id)
    t0 = time.monotonic()
    seen = wait_applied(ctx)
    seconds = round(time.monotonic() - t0, 3)
    return {"catchup_seconds": seconds, "detail": f"sentinel seen on {ctx.data['leader']}, Aurora's final LSN "
                                                  f"{ctx.data['final_lsn']} confirmed in {seconds:.2f}s ({seen})"}


# -- 7. sequences, 8. verify ---------------------------------------------------------------------------------
def sequences(ctx: Context) -> dict[str, Any]:
    done = forward.sync_sequences(ctx.held().control, ctx.leader_held().control)
    return {"sequences_synced": len(done), "detail": f"{len(done)} sequences set on {ctx.data['leader']} to "
                                                     f"Aurora's value + {forward.SEQUENCE_MARGIN} steps"}


def verify(ctx: Context) -> dict[str, Any]:
    result = gate(aurora_master_url(ctx.outputs), ctx.leader_url(), sample_percent=ctx.settings.sample_percent,
                  sample_rows=ctx.settings.gate_sample_rows, sample_timeout=ctx.settings.gate_sample_timeout,
                  sequences="at_least", timeout=ctx.settings.connect_timeout,
                  source_connections=ctx.held().verification()[:1],
                  target_connections=ctx.leader_held().verification()[:1])
    # the leader may hold extensions Aurora does not offer (replicate-aurora left them out): not a difference
    result.schema = [line for line in result.schema
                     if not (line.startswith("extension ") and line.endswith("exists only on the target"))]
    summary = result.summary()
    ctx.checkpoint(verification=summary)
    if not result.ok:
        raise VerificationError(f"frozen Aurora and {ctx.data['leader']} differ: "
                                + "; ".join(result.differences()[:10]))
    return {"verification": summary, "detail": f"{summary['tables']} tables, {summary['sampled_rows']:,} rows "
                                               "sampled, sequences at or ahead, schema equal"}


# -- 9. the point of no return -------------------------------------------------------------------------------
def prove_quiet_since_sentinel(ctx: Context) -> str:
    try:
        sessions = ctx.held()
        fence_mod.terminate_others(sessions, timeout=ctx.settings.stop_app_timeout,
                                   interval=ctx.settings.poll_interval)
        xmax = fence_mod.prove_quiet(sessions.control, {int(ctx.data["final_next_xid"])}, what="Aurora")
    except NotPromoted:
        raise
    except (RunbookError, psycopg.Error) as exc:
        raise NotPromoted(f"cannot prove that nothing was written on Aurora after the sentinel: {exc}") from None
    if applied_final(ctx) is None:
        raise NotPromoted(f"{ctx.data['leader']} has not applied Aurora's final LSN: not switching back")
    return f"no transaction on Aurora since the sentinel (xmax {xmax}, none running); the leader applied it"


def prove_nothing_after_final(ctx: Context) -> str:
    """Aurora took no transaction id since the sentinel and the leader applied it. Once per run, a
    transaction since (an autovacuum's analyze, the platform's superuser) gets a second sentinel: what
    it wrote is carried by the reverse replication like the rest, then proved the same way."""
    try:
        return prove_quiet_since_sentinel(ctx)
    except NotPromoted:
        if (ctx.data.sentinel_id or "").endswith("/settle"):
            raise
    try:
        write_sentinel(ctx, ctx.journal.run_id + "/settle")
        wait_applied(ctx)
    except (RunbookError, psycopg.Error) as exc:
        raise NotPromoted(f"Aurora was written after the sentinel and could not be settled: {exc}") from None
    return prove_quiet_since_sentinel(ctx) + " (settled with a second sentinel)"


def stop_reverse(ctx: Context) -> None:
    pg, db = _leader_pg(ctx), _leader_db(ctx)
    pg.psql(native.BYPASS_GUARD + f"ALTER SUBSCRIPTION {REVERSE} DISABLE;", database=db)
    wait_until(lambda: not reverse_subscription(ctx, ctx.data["leader"])["running"],
               timeout=ctx.settings.stop_app_timeout, interval=0.2,
               what=f"the reverse subscription's apply worker on {ctx.data['leader']} to stop")


def advance_forward(ctx: Context) -> str | None:
    """The leader's slot for Aurora moved to the leader's current LSN, past the changes it applied from
    Aurora (Aurora has them), before the app writes to the leader. None when done (or already resumed);
    else why replication into Aurora cannot resume."""
    pg, db = _leader_pg(ctx), _leader_db(ctx)
    with _master(ctx) as master:
        enabled = master.execute("SELECT subenabled FROM pg_subscription WHERE subname = %s",
                                 (SUBSCRIPTION,)).fetchone()
    if enabled is None:
        return "replication into Aurora NOT resumed (its subscription is gone): run replicate-aurora anew"
    if enabled[0]:
        return None
    slot = pg.query(f"SELECT confirmed_flush_lsn::text AS confirmed, wal_status FROM pg_replication_slots "
                    f"WHERE slot_name = {literal(SUBSCRIPTION)}", database=db)
    if not slot or slot[0]["wal_status"] == "lost":
        return (f"replication into Aurora NOT resumed: the leader's slot {SUBSCRIPTION} is lost; rebuild Aurora and "
                "run replicate-aurora before another failover-aurora")
    target = pg.query_one("SELECT pg_current_wal_insert_lsn()::text AS lsn", database=db)["lsn"]
    # the apply committed asynchronously: a slot only moves over what is flushed
    wait_until(lambda: lsn_to_int(pg.query_one("SELECT pg_current_wal_flush_lsn()::text AS lsn",
                                               database=db)["lsn"]) >= lsn_to_int(target),
               timeout=ctx.settings.stop_app_timeout, interval=0.2, what=f"{ctx.data['leader']} to flush {target}")
    if lsn_to_int(slot[0]["confirmed"]) < lsn_to_int(target):
        pg.query(f"SELECT pg_replication_slot_advance({literal(SUBSCRIPTION)}, {literal(target)}::pg_lsn)",
                 database=db, timeout=ctx.settings.catchup_timeout)
    ctx.checkpoint(forward_from=target)
    return None


def lift_leader(ctx: Context) -> None:
    """The leader admits the app again: failover-aurora's fence and seal lifted (connection limit as before)."""
    fence_mod.lift(ctx.leader_url(), ctx.leader_sessions, previous_limit=int(ctx.data["leader_connection_limit"]),
                   timeout=ctx.settings.connect_timeout)
    ctx.leader_sessions = None


def switch_back(ctx: Context) -> dict[str, Any]:
    proof = ctx.data.final_proof or ""
    if not ctx.data.reverse_stopped:
        proof = prove_nothing_after_final(ctx)
        stop_reverse(ctx)
        ctx.checkpoint(reverse_stopped=True, final_proof=proof)
    not_resumed = advance_forward(ctx)
    lift_leader(ctx)     # also admits the forward walsender (tern's replication role)
    if not_resumed is None:
        aurora_api_for(ctx.outputs.aurora).subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} ENABLE",
                                                                  ctx.outputs.aurora.database)
    forward_note = not_resumed or f"replication into Aurora resumed from {ctx.data.forward_from or 'where it was'}"
    return {"switched_over_at": time.time(), "new_leader": ctx.data["leader"], "forward": forward_note,
            "detail": f"{proof}; reverse replication stopped; {forward_note}; {ctx.data['leader']} admits the app"}


# -- 10-13. switch, start, smoke, retire the reverse replication ------------------------------------------------
def switched_back(ctx: Context) -> bool:
    url = ctx.app.config_var(ctx.outputs.source.database_url_var)
    r = ctx.replica(ctx.data["leader"])
    return bool(url) and url_endpoint(url)[:2] == (r.host, r.port)


def switch(ctx: Context) -> dict[str, Any]:
    var = ctx.outputs.source.database_url_var
    url = ctx.leader_url()
    r = ctx.replica(ctx.data["leader"])
    if url_endpoint(url)[:2] != (r.host, r.port):
        raise StepError(f"{EC2_URL_VAR} is gone and {var} does not point at {r.name}: set {var} to the app's URL "
                        f"at {r.host}:{r.port} by hand, then run again")
    ctx.app.set_config_vars({var: url, EC2_URL_VAR: None})
    return {"switched_at": time.time(), "detail": f"{var} -> {r.host}:{r.port} ({r.name}); {EC2_URL_VAR} removed"}


def smoke_test(ctx: Context) -> dict[str, Any]:
    r = ctx.replica(ctx.data["leader"])
    what = ctx.app.smoke_test(r.host, r.port, since=ctx.data.switched_at or 0.0,
                              timeout=ctx.settings.smoke_timeout)
    return {"smoke_test": what, "detail": what}


def retire_reverse(ctx: Context) -> dict[str, Any]:
    pg, db = _leader_pg(ctx), _leader_db(ctx)
    if pg.query(f"SELECT 1 FROM pg_subscription WHERE subname = {literal(REVERSE)}", database=db):
        pg.psql(native.BYPASS_GUARD + f"ALTER SUBSCRIPTION {REVERSE} DISABLE;\n"
                f"ALTER SUBSCRIPTION {REVERSE} SET (slot_name = NONE);\nDROP SUBSCRIPTION {REVERSE};", database=db)
    with _master(ctx) as master:
        wait_until(lambda: not master.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active",
                                              (REVERSE,)).fetchone(),
                   timeout=ctx.settings.stop_app_timeout, interval=0.2, what=f"Aurora's slot {REVERSE} to be released")
        master.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                       (REVERSE,))
        master.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(REVERSE)))
    return {"detail": f"reverse replication retired: subscription {REVERSE} dropped on {ctx.data['leader']}, "
                      "its slot and publication on Aurora"}


def switch_pooler(ctx: Context) -> dict[str, Any]:
    return pooler_switch.switch_to(ctx, ctx.leader_url())


def pooler_switched_back(ctx: Context) -> bool:
    return pooler_switch.switched_to(ctx, ctx.leader_url())


def smoke_test_pooled(ctx: Context) -> dict[str, Any]:
    return pooler_switch.smoke_test(ctx, "the EC2 leader")


def plan(mode: str = "url") -> list[Step]:
    """The steps; ``mode`` pooler holds the app's queries in PgBouncer and repoints it (:mod:`.pooler_switch`)."""
    if mode == "pooler":
        freeze = pooler_switch.pause_step()
        move = [Step("switch", "the pooler -> the EC2 leader, RESUME (no config-var change, no restart)",
                     switch_pooler, check=pooler_switched_back),
                Step("start_app", "start the workers", start_app, check=app_started),
                Step("smoke_test", "smoke test through the app and the pooler on the EC2 leader", smoke_test_pooled)]
    else:
        freeze = maintenance_step()
        move = [Step("switch", "switch the app's database URL back to the EC2 leader", switch, check=switched_back),
                Step("start_app", "start the web, then the workers", start_app, check=app_started),
                Step("smoke_test", "smoke test through the app on the EC2 leader", smoke_test)]
    return [
        Step("preflight", "preflight: the app on Aurora, reverse replication streaming", preflight),
        Step("hold_leader", "the sealed EC2 leader admits tern's sessions only", hold_leader,
             verify=prove_leader_held, revert=reseal_leader, recheck=prove_leader_held,
             revert_hint="the EC2 leader admits tern's sessions: ALTER DATABASE <db> CONNECTION LIMIT 0 as superuser"),
        Step("stop_workers", "stop background workers", stop_workers, check=workers_stopped, revert=restore_workers,
             revert_hint="the background workers are still scaled to 0: scale them back"),
        freeze,
        Step("fence", "fence Aurora for the app's role and prove it", fence, verify=prove_fenced, revert=unfence,
             recheck=prove_fenced, revert_hint="the app's role on Aurora is still fenced: ALTER ROLE <app> "
                                               "CONNECTION LIMIT -1 and RESET default_transaction_read_only"),
        Step("catch_up", "sentinel on Aurora after the fence; wait until the leader applied it", catch_up,
             recheck=lambda ctx: prove_nothing_after_final(ctx)),
        Step("sequences", "set every sequence on the leader past Aurora's", sequences),
        Step("verify", "verify frozen Aurora against the leader (bounded sample)", verify),
        Step("switch_back", "stop the reverse replication, resume Aurora's, open the leader", switch_back,
             point_of_no_return=True),
        *move,
        Step("retire_reverse", "drop the reverse replication (subscription, slot, publication)", retire_reverse),
    ]


STEP_NAMES = [s.name for s in plan()]
POOLER_STEP_NAMES = [s.name for s in plan("pooler")]
