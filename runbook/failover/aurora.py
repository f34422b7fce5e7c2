"""Failover 2: EC2 -> Aurora (``invoke failover-aurora``), after ``invoke replicate-aurora``.

The plan, in order:

1. ``preflight``: the EC2 leader, every table synchronised (``r``), lag under ``max_lag_bytes`` measured
   from the leader's *current* LSN, apply headroom over ``apply_sample_seconds`` (the rule:
   :mod:`runbook.replication.headroom`), an EC2 standby of the leader for the full verification.
   A refusal changes nothing (exit 2).
2. ``snapshot``: Aurora's (cluster snapshot) and the leader's, before any downtime.
2b. ``verify_full``: every row of Aurora against an EC2 standby held at the commit where Aurora's apply
   was stopped (:mod:`.consistent_point`), with the app still running; replication resumes after it.
   A difference refuses the failover before anything is frozen.
3. ``stop_workers``, 4. ``maintenance_on``: as in hop 1 (:mod:`.app_steps`).
5. ``fence``: the EC2 leader, with the same fence as hop 1 (:mod:`.fence`; tern's replication
   role is exempt: its walsender feeds Aurora).
6. ``catch_up``: a sentinel row written on the leader after the fence; the final LSN and the next
   transaction id recorded; wait until Aurora has the sentinel and confirmed the final LSN.
7. ``sequences``: every sequence (owned or not, identity included) set on Aurora past the frozen
   leader's value (logical replication never carries them).
8. ``verify``: the in-window gate, O(catalog + sample) as in hop 1.
9. ``switch_over`` - the **point of no return**: the proof that nothing was written after the
   final LSN, the leader sealed, forward replication stopped, and **reverse replication Aurora ->
   EC2 started before any write reaches Aurora** (so ``rollback-aurora`` loses nothing).
10. ``switch``: the app's database URL to Aurora (the EC2 URL kept in ``TERN_EC2_DATABASE_URL``),
11. ``start_app``, 12. ``smoke_test``.

Any failure before ``switch_over`` falls back on its own: the leader unfenced, the app restarted
on it; replication into Aurora keeps running.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
from psycopg import sql

from ..adapters.aurora import aurora_api_for
from ..adapters.snapshots import snapshots_for
from ..errors import NotPromoted, PreflightError, RunbookError, VerificationError
from ..pg import url_endpoint, url_user
from ..polling import wait_until
from ..postgres import literal
from ..replication import REVERSE, TERN_SCHEMA, engines, native
from ..replication.leader import EC2_URL_VAR, aurora_app_url, aurora_master_url, leader
from ..secrets import resolve
from ..steps import Step
from ..verify import choose_sample, gate
from . import consistent_point, pooler_switch
from . import fence as fence_mod
from .app_steps import (app_started, maintenance_step, restore_workers, start_app, stop_workers,
                        workers_stopped)
from .context import Context
from .fence import next_xid

KIND = "failover-aurora"
SEQUENCE_MARGIN = 1000      # values of headroom past the frozen leader's, per sequence


def _leader_pg(ctx: Context):
    return ctx.pg(ctx.data["leader"])


def _db(ctx: Context) -> str:
    return ctx.replica(ctx.data["leader"]).database


def _master(ctx: Context):
    return native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout)


# -- 1. preflight -------------------------------------------------------------------------
def preflight(ctx: Context) -> dict[str, Any]:
    r = leader(ctx.app, ctx.outputs)
    engine = engines.for_run(ctx)   # the one replicate-aurora set up (its journal says which)
    with _master(ctx) as master:
        # the rollback path must be possible before the point of no return, not discovered after it
        can_publish = master.execute("SELECT current_setting('wal_level') = 'logical', rolreplication OR "
                                     "pg_has_role(current_user, 'rds_replication', 'MEMBER') FROM pg_roles "
                                     "WHERE rolname = current_user").fetchone() if _has_role(master, "rds_replication") \
            else master.execute("SELECT current_setting('wal_level') = 'logical', rolreplication FROM pg_roles "
                                "WHERE rolname = current_user").fetchone()
    if not all(can_publish):
        raise PreflightError("Aurora cannot replicate back to EC2 (the rollback path): it needs "
                             "rds.logical_replication = 1 (wal_level logical) and its master in rds_replication")
    # set up, every table synchronised, streaming, keeping up (native: the apply headroom of
    # runbook/replication/headroom.py; DMS: its task, validation counts, slot and CDC latency)
    ready = engine.check_ready(ctx, r)
    witness = engine.needs_witness and ctx.settings.full_verification == "witness"
    standby = consistent_point.pick_standby(ctx, r.name) if witness else None
    if witness and standby is None:
        raise PreflightError(f"no EC2 standby streams from {r.name}: the full verification holds one where Aurora "
                             "stopped; restore one (or set tern.full_verification = skip to go without it)")
    with ctx.source("preflight") as conn:
        prepared = fence_mod.prepared_transactions(conn)
        if prepared:
            raise PreflightError(f"prepared transactions on {r.name}: {', '.join(prepared[:5])}")
        limit = conn.execute("SELECT datconnlimit FROM pg_database WHERE datname = current_database()").fetchone()[0]
    a = ctx.outputs.aurora
    return {"leader": r.name, "candidate": "aurora", "source_endpoint": f"{r.host}:{r.port}",
            "target_endpoint": f"{a.writer_endpoint}:{a.port}", "source_connection_limit": limit,
            "formation": ctx.app.formation(), "others": [],
            "apply_headroom": ready.get("apply_headroom"), "standby": standby, "engine": engine.name,
            "detail": (pooler_switch.check(ctx) + "; " if pooler_switch.mode(ctx) == "pooler" else "")
                      + f"leader {r.name}; {ready['tables']} tables streaming"
                      + ("" if ready["lag_bytes"] is None else f"; lag {ready['lag_bytes']:,} bytes")
                      + f"; {ready['why']}"}


def _has_role(conn, name: str) -> bool:
    return bool(conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone())


# -- 2. snapshots ---------------------------------------------------------------------------
def snapshot(ctx: Context) -> dict[str, Any]:
    label = ctx.journal.run_id
    api = aurora_api_for(ctx.outputs.aurora)
    aurora_snap = api.snapshot(label, timeout=ctx.settings.restore_timeout)
    name = ctx.data["leader"]
    leader_snap = snapshots_for(ctx.replica(name), ctx.pg(name)).create(label, timeout=ctx.settings.restore_timeout)
    return {"snapshot": {"aurora": aurora_snap, name: leader_snap}, "detail": f"aurora: {aurora_snap}; {name}: "
                                                                             f"{leader_snap}"}


# -- 5. fence (hop 1's, on the leader) --------------------------------------------------------
def fence(ctx: Context) -> dict[str, Any]:
    done = fence_mod.apply(ctx.held(), app_url=ctx.source_url(), timeout=ctx.settings.stop_app_timeout,
                           interval=ctx.settings.poll_interval)
    return {"fenced_at": time.time(), "fence": done,
            "detail": f"{ctx.data['leader']}: new sessions refused, {done['terminated']} sessions terminated"}


def prove_fenced(ctx: Context) -> None:
    fence_mod.prove(ctx.held(), app_url=ctx.source_url())


def unfence(ctx: Context) -> None:
    fence_mod.lift(ctx.source_url(), ctx.sessions, previous_limit=int(ctx.data.get("source_connection_limit", -1)),
                   timeout=ctx.settings.connect_timeout)
    ctx.sessions = None


# -- 6. catch up: the sentinel ------------------------------------------------------------------
def catch_up(ctx: Context) -> dict[str, Any]:
    conn = ctx.held().control
    if ctx.data.final_next_xid is None:
        fence_mod.wait_quiet(conn, timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
        conn.execute(sql.SQL("INSERT INTO {}.sentinel (run_id) VALUES (%s) ON CONFLICT DO NOTHING").format(
            sql.Identifier(TERN_SCHEMA)), (ctx.journal.run_id,))
        final = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        xid = str(fence_mod.prove_quiet(conn, {next_xid(conn)}, what=ctx.data["leader"]))
        ctx.checkpoint(final_lsn=final, final_next_xid=xid)
    t0 = time.monotonic()
    seen = wait_until(lambda: applied_final(ctx), timeout=ctx.settings.catchup_timeout,
                      interval=ctx.settings.poll_interval, what="Aurora to apply the sentinel and the final LSN",
                      last=lambda: engines.for_run(ctx).lag_text(ctx)
                      + (f"; Aurora unreachable: {ctx.data['_aurora_unreachable']}"
                         if ctx.data.get("_aurora_unreachable") else ""))
    seconds = round(time.monotonic() - t0, 3)
    return {"catchup_seconds": seconds, "detail": f"sentinel seen on Aurora, final LSN {ctx.data['final_lsn']} "
                                                  f"confirmed in {seconds:.2f}s ({seen})"}


def applied_final(ctx: Context) -> str | None:
    """The sentinel is on Aurora and the engine proved the rest (native: the slot confirmed the final LSN;
    DMS: its task and slot are sound, and it applies in commit order - :mod:`runbook.replication.engines`).

    Aurora unreachable for a while (a restart, a failover of its writer: tens of seconds on AWS) is
    waited through until the catch-up deadline; a slot gone on the leader cannot heal: it fails at once."""
    return engines.for_run(ctx).applied_final(ctx)


# -- 7. sequences --------------------------------------------------------------------------------
def sync_sequences(frozen, target) -> list[str]:
    """Every sequence of ``frozen`` (a session on the side that stopped writing) set on ``target`` to its
    value + SEQUENCE_MARGIN steps, unless already at or past it; the names of those set. Also used by
    rollback-aurora, the other way round."""
    rows = frozen.execute("SELECT schemaname, sequencename, last_value, increment_by FROM pg_sequences "
                          "WHERE schemaname <> %s ORDER BY 1, 2", (TERN_SCHEMA,)).fetchall()
    done = []
    for schema_name, name, last, step in rows:
        ident = sql.Identifier(schema_name, name)
        if last is None:
            continue   # never used on the frozen side: nothing to carry
        current = target.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(ident)).fetchone()
        want = int(last) + SEQUENCE_MARGIN * int(step)
        if current is not None and current[1] and (int(current[0]) - want) * int(step) >= 0:
            continue   # already at or past (a resumed run)
        target.execute("SELECT setval(format('%%I.%%I', %s::text, %s::text)::regclass, %s, true)",
                       (schema_name, name, want))
        done.append(f"{schema_name}.{name}")
    return done


def sequences(ctx: Context) -> dict[str, Any]:
    with _master(ctx) as master:
        done = sync_sequences(ctx.held().control, master)
    return {"sequences_synced": len(done),
            "detail": f"{len(done)} sequences set on Aurora to the leader's value + {SEQUENCE_MARGIN} steps"}


# -- 8. verify -----------------------------------------------------------------------------------
def sample(ctx: Context) -> dict[str, Any]:
    """The gate's sample, chosen now and read once on the leader and Aurora (as hop 1's: the window
    then reads memory; the keys stay in memory, a resumed run samples inside the window)."""
    plan = choose_sample(ctx.source_url(), aurora_master_url(ctx.outputs), sample_percent=ctx.settings.sample_percent,
                         sample_rows=ctx.settings.gate_sample_rows, sample_timeout=ctx.settings.gate_sample_timeout,
                         timeout=ctx.settings.connect_timeout)
    ctx.sample_plan = plan
    return {"detail": f"{plan.rows:,} rows of {len(plan.keys)} tables chosen and read on the leader and Aurora "
                      f"in {plan.seconds:.2f}s"}


def verify(ctx: Context) -> dict[str, Any]:
    result = gate(ctx.source_url(), aurora_master_url(ctx.outputs), sample_percent=ctx.settings.sample_percent,
                  sample_rows=ctx.settings.gate_sample_rows, sample_timeout=ctx.settings.gate_sample_timeout,
                  sequences="at_least", timeout=ctx.settings.connect_timeout,
                  source_connections=ctx.held().verification()[:1], ignore_extensions=True,
                  sample_plan=ctx.sample_plan)
    summary = result.summary()
    ctx.checkpoint(verification=summary)
    if not result.ok:
        raise VerificationError("the frozen leader and Aurora differ: " + "; ".join(result.differences()[:10]))
    return {"verification": summary, "detail": f"{summary['tables']} tables, {summary['sampled_rows']:,} rows "
                                               "sampled, sequences at or ahead, schema equal"}


# -- 9. the point of no return ---------------------------------------------------------------------
def prove_nothing_after_final(ctx: Context, rounds: int = 3) -> str:
    """Nothing committed on the leader since the sentinel and Aurora applied everything up to it.

    What the fenced leader still wrote since (autovacuum's analyze on a busy database, the platform's
    superuser: no client session is left) is not lost but carried: a new sentinel after it, Aurora applies
    it, prove again - as hop 1's settle does. Still writing after ``rounds``: NotPromoted (fall back)."""
    extra = 0
    while True:
        accepted = {int(ctx.data["final_next_xid"])}
        if ctx.data.seal_next_xid:
            accepted.add(int(ctx.data["seal_next_xid"]))
        try:
            sessions = ctx.held()
            fence_mod.terminate_others(sessions, timeout=ctx.settings.stop_app_timeout,
                                       interval=ctx.settings.poll_interval)
            xmax = fence_mod.prove_quiet(sessions.control, accepted, what=ctx.data["leader"])
            break
        except NotPromoted:
            if extra >= rounds or ctx.data.sealed:
                raise
            extra += 1
            try:
                conn = ctx.held().control
                fence_mod.wait_quiet(conn, timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
                conn.execute(sql.SQL("UPDATE {}.sentinel SET written_at = clock_timestamp() WHERE run_id = %s").format(
                    sql.Identifier(TERN_SCHEMA)), (ctx.journal.run_id,))
                final = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
                xid = str(fence_mod.prove_quiet(conn, {next_xid(conn)}, what=ctx.data["leader"]))
                ctx.checkpoint(final_lsn=final, final_next_xid=xid)
                wait_until(lambda: applied_final(ctx), timeout=ctx.settings.catchup_timeout,
                           interval=ctx.settings.poll_interval, what="Aurora to apply the new sentinel")
            except (RunbookError, psycopg.Error) as exc:
                raise NotPromoted(f"the leader wrote after the sentinel and the new one did not settle: {exc}") from None
        except (RunbookError, psycopg.Error) as exc:
            raise NotPromoted(f"cannot prove that nothing was written after the final LSN: {exc}") from None
    if applied_final(ctx) is None:
        raise NotPromoted("Aurora has not confirmed the final LSN: not switching")
    copied = f" (the leader wrote after the sentinel: {extra} more sentinels, carried too)" if extra else ""
    return (f"no transaction since the sentinel (xmax {xmax}, none running); Aurora confirmed the final LSN"
            + copied)


def switch_over(ctx: Context) -> dict[str, Any]:
    engine = engines.for_run(ctx)
    leader_pg, db = _leader_pg(ctx), _db(ctx)
    proof = "already switched over"
    if engine.forward_running(ctx):
        first = prove_nothing_after_final(ctx)
        if not ctx.data.sealed:
            try:   # the leader never admits a session again (tern's own stay open)
                after = fence_mod.seal(ctx.held().control, db, int(ctx.data["final_next_xid"]))
            except (RunbookError, psycopg.Error) as exc:
                raise NotPromoted(f"cannot seal the leader: {exc}") from None
            seal_xid = str(after) if after else None   # None: something wrote since the sentinel: not vouched
            ctx.checkpoint(sealed=True, seal_next_xid=seal_xid)
        proof = prove_nothing_after_final(ctx)   # again, after the seal
        if "carried too" in first:
            proof += first[first.index(" (the leader wrote"):]
        # the seal keeps every client out; the reverse replication's apply must write here
        ctx.held().control.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
            sql.Identifier(db)))
        engine.stop_forward(ctx)   # before the reverse replication: it must not be carried back into Aurora
    reverse = start_reverse(ctx, leader_pg, db)
    return {"switched_over_at": time.time(), "new_leader": "aurora", "final_proof": proof, "reverse": reverse,
            "detail": f"{proof}; leader sealed; forward replication stopped; {reverse}"}


def start_reverse(ctx: Context, leader_pg, db: str) -> str:
    """Aurora -> EC2, created before the app writes to Aurora: a publication of every table on Aurora,
    a subscription on the leader (no initial copy: both sides are equal now)."""
    with _master(ctx) as master:
        role = url_user(ctx.source_url())
        if not master.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (REVERSE,)).fetchone():
            tables = [r[0] for r in master.execute(
                "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND c.relname NOT LIKE 'awsdms\\_%' ORDER BY 1").fetchall()]   # DMS's control tables: Aurora's own
            with master.transaction():
                master.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                master.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)")
                               .format(sql.Identifier(REVERSE), sql.SQL(", ").join(sql.SQL(t) for t in tables)))
    if not leader_pg.query(f"SELECT 1 FROM pg_subscription WHERE subname = {literal(REVERSE)}", database=db):
        a = ctx.outputs.aurora
        tls = aurora_api_for(a).sslmode   # TLS to Aurora on AWS (rds.force_ssl)
        info = native.conninfo(a.writer_endpoint, a.port, a.database, resolve(a.master_password),
                               user=a.master_user, sslmode=tls)
        leader_pg.psql(native.BYPASS_GUARD + "SET default_transaction_read_only = off;\n"
                       + f"CREATE SUBSCRIPTION {REVERSE} CONNECTION {literal(info)} "
                       f"PUBLICATION {REVERSE} WITH (copy_data = false);", database=db)
    return f"reverse replication Aurora -> {ctx.data['leader']} started ({REVERSE})"


# -- 10-12. switch, start, smoke ------------------------------------------------------------
def switched(ctx: Context) -> bool:
    url = ctx.app.config_var(ctx.outputs.source.database_url_var)
    a = ctx.outputs.aurora
    return bool(url) and url_endpoint(url)[:2] == (a.writer_endpoint, a.port)


def switch(ctx: Context) -> dict[str, Any]:
    var = ctx.outputs.source.database_url_var
    with _master(ctx) as master:   # a rollback-aurora left the app's role fenced on Aurora: admit it again
        fence_mod.readmit_role(master, url_user(ctx.source_url()))
    ctx.app.set_config_vars({var: aurora_app_url(ctx.app, ctx.outputs), EC2_URL_VAR: ctx.source_url()})
    a = ctx.outputs.aurora
    return {"switched_at": time.time(), "detail": f"{var} -> {a.writer_endpoint}:{a.port} "
                                                  f"(the EC2 leader's URL kept in {EC2_URL_VAR})"}


def smoke_test(ctx: Context) -> dict[str, Any]:
    a = ctx.outputs.aurora
    what = ctx.app.smoke_test(a.writer_endpoint, a.port, since=ctx.data.switched_at or 0.0,
                              timeout=ctx.settings.smoke_timeout)
    return {"smoke_test": what, "detail": what}


def switch_pooler(ctx: Context) -> dict[str, Any]:
    with _master(ctx) as master:   # a rollback-aurora left the app's role fenced on Aurora: admit it again
        fence_mod.readmit_role(master, url_user(ctx.source_url()))
    return pooler_switch.switch_to(ctx, aurora_app_url(ctx.app, ctx.outputs))


def pooler_switched(ctx: Context) -> bool:
    return pooler_switch.switched_to(ctx, aurora_app_url(ctx.app, ctx.outputs))


def smoke_test_pooled(ctx: Context) -> dict[str, Any]:
    return pooler_switch.smoke_test(ctx, "Aurora")


def plan(mode: str = "url") -> list[Step]:
    """The steps; ``mode`` pooler holds the app's queries in PgBouncer and repoints it (:mod:`.pooler_switch`)."""
    if mode == "pooler":
        freeze = pooler_switch.pause_step()
        move = [Step("switch", "the pooler -> Aurora, RESUME (no config-var change, no restart)", switch_pooler,
                     check=pooler_switched),
                Step("start_app", "start the workers", start_app, check=app_started),
                Step("smoke_test", "smoke test through the app and the pooler on Aurora", smoke_test_pooled)]
    else:
        freeze = maintenance_step()
        move = [Step("switch", "switch the app's database URL to Aurora", switch, check=switched),
                Step("start_app", "start the web, then the workers", start_app, check=app_started),
                Step("smoke_test", "smoke test through the app on Aurora", smoke_test)]
    return [
        Step("preflight", "preflight: replication streaming and keeping up", preflight),
        Step("snapshot", "snapshots of Aurora and the EC2 leader", snapshot),
        Step("verify_full", "verify every row: Aurora against an EC2 standby held where it stopped (app running)",
             lambda ctx: engines.for_run(ctx).verify_full(ctx), revert=lambda ctx: engines.for_run(ctx).release(ctx),
             revert_hint="Aurora's subscription may still be disabled (ALTER SUBSCRIPTION tern_aurora ENABLE) and "
                         "the EC2 standby held (ALTER SYSTEM RESET recovery_target_lsn, then restart it)"),
        Step("stop_workers", "stop background workers", stop_workers, check=workers_stopped, revert=restore_workers,
             revert_hint="the background workers are still scaled to 0: scale them back"),
        Step("sample", "choose the gate's sample and read it on both sides (outside the window)", sample),
        freeze,
        Step("fence", "fence the EC2 leader and prove it", fence, verify=prove_fenced, revert=unfence,
             recheck=prove_fenced, revert_hint="the EC2 leader is still fenced: ALTER DATABASE <db> CONNECTION "
                                               "LIMIT -1 and RESET default_transaction_read_only as superuser"),
        Step("catch_up", "sentinel after the fence; wait until Aurora applied it", catch_up,
             recheck=lambda ctx: prove_nothing_after_final(ctx)),
        Step("sequences", "set every sequence on Aurora past the leader's", sequences),
        Step("verify", "verify the frozen leader against Aurora (bounded sample)", verify),
        Step("switch_over", "stop forward replication, start Aurora -> EC2", switch_over, point_of_no_return=True),
        *move,
    ]


STEP_NAMES = [s.name for s in plan()]
POOLER_STEP_NAMES = [s.name for s in plan("pooler")]
