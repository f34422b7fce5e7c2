"""Failover 2: EC2 -> Aurora (``invoke failover-aurora``), after ``invoke replicate-aurora``.

The plan, in order:

1. ``preflight``: the EC2 leader, every table streaming, lag under ``max_lag_bytes`` measured from
   the leader's *current* LSN, apply keeping up with the writes over a short sample.
2. ``snapshot``: Aurora's (cluster snapshot) and the leader's, before any downtime.
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
from ..pg import lsn_to_int, url_endpoint, url_user
from ..polling import wait_until
from ..postgres import literal
from ..replication import REVERSE, SUBSCRIPTION, TERN_SCHEMA, native
from ..replication.leader import EC2_URL_VAR, aurora_app_url, aurora_master_url, leader
from ..secrets import resolve
from ..steps import Step
from ..verify import gate
from . import fence as fence_mod
from .app_steps import (app_started, maintenance_on, restore_workers, start_app, stop_workers,
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
    pg = ctx.pg(r.name)
    with _master(ctx) as master:
        if not native.subscription_exists(master):
            raise PreflightError("replication into Aurora is not set up: run `invoke replicate-aurora` first")
        states = native.table_states(master)
        # the rollback path must be possible before the point of no return, not discovered after it
        can_publish = master.execute("SELECT current_setting('wal_level') = 'logical', rolreplication OR "
                                     "pg_has_role(current_user, 'rds_replication', 'MEMBER') FROM pg_roles "
                                     "WHERE rolname = current_user").fetchone() if _has_role(master, "rds_replication") \
            else master.execute("SELECT current_setting('wal_level') = 'logical', rolreplication FROM pg_roles "
                                "WHERE rolname = current_user").fetchone()
    if not all(can_publish):
        raise PreflightError("Aurora cannot replicate back to EC2 (the rollback path): it needs "
                             "rds.logical_replication = 1 (wal_level logical) and its master in rds_replication")
    waiting = sorted(t for t, s in states.items() if s != "r")
    if not states or waiting:
        raise PreflightError(f"not every table streams into Aurora yet ({', '.join(waiting[:5]) or 'none'}): "
                             "wait for replicate-aurora's initial copy")
    seen: dict[str, Any] = {}

    def streaming() -> bool:   # an apply worker restarting (it retries every few seconds) is not an outage
        seen.update(native.lag(pg))
        return bool(seen["slot"] and seen["active"])

    try:
        wait_until(streaming, timeout=min(30.0, ctx.settings.catchup_timeout), interval=0.5,
                   what=f"the replication slot {SUBSCRIPTION} on {r.name} to be in use")
    except RunbookError:
        with _master(ctx) as master:
            errors = master.execute("SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats "
                                    "WHERE subname = %s", (SUBSCRIPTION,)).fetchone()
        raise PreflightError(f"the replication slot {SUBSCRIPTION} on {r.name} is "
                             f"{'missing' if not seen.get('slot') else 'not in use'}: replication is not running "
                             f"(Aurora's apply errors so far: {errors[0] if errors else '?'}; see its log)") from None
    first = native.lag(pg)
    time.sleep(2.0)
    second = native.lag(pg)
    written = lsn_to_int(second["leader_lsn"]) - lsn_to_int(first["leader_lsn"])
    applied = lsn_to_int(second["confirmed_lsn"]) - lsn_to_int(first["confirmed_lsn"])
    if second["lag_bytes"] > ctx.settings.max_lag_bytes:
        raise PreflightError(f"Aurora is {second['lag_bytes']:,} bytes behind {r.name} "
                             f"(threshold {ctx.settings.max_lag_bytes:,})")
    if written > 0 and second["lag_bytes"] > max(first["lag_bytes"], 0) + ctx.settings.max_lag_bytes // 4:
        raise PreflightError(f"apply falls behind the writes: lag grew from {first['lag_bytes']:,} to "
                             f"{second['lag_bytes']:,} bytes in 2 s ({applied:,} applied for {written:,} written)")
    with ctx.source("preflight") as conn:
        prepared = fence_mod.prepared_transactions(conn)
        if prepared:
            raise PreflightError(f"prepared transactions on {r.name}: {', '.join(prepared[:5])}")
        limit = conn.execute("SELECT datconnlimit FROM pg_database WHERE datname = current_database()").fetchone()[0]
    headroom = (f"applied {applied:,} of {written:,} bytes written in 2 s" if written else "no writes in 2 s")
    a = ctx.outputs.aurora
    return {"leader": r.name, "candidate": "aurora", "source_endpoint": f"{r.host}:{r.port}",
            "target_endpoint": f"{a.writer_endpoint}:{a.port}", "source_connection_limit": limit,
            "formation": ctx.app.formation(), "others": [],
            "detail": f"leader {r.name}; {len(states)} tables streaming; lag {second['lag_bytes']:,} bytes; {headroom}"}


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
    if ctx.data.get("final_next_xid") is None:
        fence_mod.wait_quiet(conn, timeout=ctx.settings.stop_app_timeout, interval=ctx.settings.poll_interval)
        conn.execute(sql.SQL("INSERT INTO {}.sentinel (run_id) VALUES (%s) ON CONFLICT DO NOTHING").format(
            sql.Identifier(TERN_SCHEMA)), (ctx.journal.run_id,))
        final = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]
        xid = str(fence_mod.prove_quiet(conn, {next_xid(conn)}, what=ctx.data["leader"]))
        ctx.journal.record("catch_up", "progress", context={"final_lsn": final, "final_next_xid": xid})
        ctx.data.update(final_lsn=final, final_next_xid=xid)
    t0 = time.monotonic()
    seen = wait_until(lambda: applied_final(ctx), timeout=ctx.settings.catchup_timeout,
                      interval=ctx.settings.poll_interval, what="Aurora to apply the sentinel and the final LSN",
                      last=lambda: f"lag {native.lag(_leader_pg(ctx)).get('lag_bytes')} bytes")
    seconds = round(time.monotonic() - t0, 3)
    return {"catchup_seconds": seconds, "detail": f"sentinel seen on Aurora, final LSN {ctx.data['final_lsn']} "
                                                  f"confirmed in {seconds:.2f}s ({seen})"}


def applied_final(ctx: Context) -> str | None:
    """The sentinel is on Aurora and Aurora confirmed the final LSN (both engines: the sentinel)."""
    with _master(ctx) as master:
        row = master.execute(sql.SQL("SELECT 1 FROM {}.sentinel WHERE run_id = %s").format(
            sql.Identifier(TERN_SCHEMA)), (ctx.journal.run_id,)).fetchone()
    if row is None:
        return None
    lag = native.lag(_leader_pg(ctx))
    if lag["confirmed_lsn"] is None or lsn_to_int(lag["confirmed_lsn"]) < lsn_to_int(ctx.data["final_lsn"]):
        return None
    return f"confirmed {lag['confirmed_lsn']}"


# -- 7. sequences --------------------------------------------------------------------------------
def sequences(ctx: Context) -> dict[str, Any]:
    conn = ctx.held().control
    rows = conn.execute("SELECT schemaname, sequencename, last_value, increment_by FROM pg_sequences "
                        "WHERE schemaname <> %s ORDER BY 1, 2", (TERN_SCHEMA,)).fetchall()
    done = []
    with _master(ctx) as master:
        for schema_name, name, last, step in rows:
            ident = sql.Identifier(schema_name, name)
            if last is None:
                continue   # never used on the leader: nothing to carry
            current = master.execute(sql.SQL("SELECT last_value, is_called FROM {}").format(ident)).fetchone()
            want = int(last) + SEQUENCE_MARGIN * int(step)
            if current is not None and current[1] and (int(current[0]) - want) * int(step) >= 0:
                continue   # already at or past (a resumed run)
            master.execute("SELECT setval(format('%%I.%%I', %s::text, %s::text)::regclass, %s, true)",
                           (schema_name, name, want))
            done.append(f"{schema_name}.{name}")
    return {"sequences_synced": len(done),
            "detail": f"{len(done)} sequences set on Aurora to the leader's value + {SEQUENCE_MARGIN} steps"}


# -- 8. verify -----------------------------------------------------------------------------------
def verify(ctx: Context) -> dict[str, Any]:
    result = gate(ctx.source_url(), aurora_master_url(ctx.outputs), sample_percent=ctx.settings.sample_percent,
                  sample_rows=ctx.settings.gate_sample_rows, sample_timeout=ctx.settings.gate_sample_timeout,
                  sequences="at_least", timeout=ctx.settings.connect_timeout,
                  source_connections=ctx.held().verification()[:1], ignore_extensions=True)
    summary = result.summary()
    ctx.journal.record("verify", "progress", context={"verification": summary})
    if not result.ok:
        raise VerificationError("the frozen leader and Aurora differ: " + "; ".join(result.differences()[:10]))
    return {"verification": summary, "detail": f"{summary['tables']} tables, {summary['sampled_rows']:,} rows "
                                               "sampled, sequences at or ahead, schema equal"}


# -- 9. the point of no return ---------------------------------------------------------------------
def prove_nothing_after_final(ctx: Context) -> str:
    accepted = {int(ctx.data["final_next_xid"])}
    if ctx.data.get("seal_next_xid"):
        accepted.add(int(ctx.data["seal_next_xid"]))
    try:
        sessions = ctx.held()
        fence_mod.terminate_others(sessions, timeout=ctx.settings.stop_app_timeout,
                                   interval=ctx.settings.poll_interval)
        xmax = fence_mod.prove_quiet(sessions.control, accepted, what=ctx.data["leader"])
    except NotPromoted:
        raise
    except (RunbookError, psycopg.Error) as exc:
        raise NotPromoted(f"cannot prove that nothing was written after the final LSN: {exc}") from None
    if applied_final(ctx) is None:
        raise NotPromoted("Aurora has not confirmed the final LSN: not switching")
    return f"no transaction since the sentinel (xmax {xmax}, none running); Aurora confirmed the final LSN"


def switch_over(ctx: Context) -> dict[str, Any]:
    api = aurora_api_for(ctx.outputs.aurora)
    leader_pg, db = _leader_pg(ctx), _db(ctx)
    proof = "already switched over"
    with _master(ctx) as master:
        forward_enabled = master.execute("SELECT subenabled FROM pg_subscription WHERE subname = %s",
                                         (SUBSCRIPTION,)).fetchone()
    if forward_enabled and forward_enabled[0]:
        prove_nothing_after_final(ctx)
        if not ctx.data.get("sealed"):
            try:   # the leader never admits a session again (tern's own stay open)
                after = fence_mod.seal(ctx.held().control, db, int(ctx.data["final_next_xid"]))
            except (RunbookError, psycopg.Error) as exc:
                raise NotPromoted(f"cannot seal the leader: {exc}") from None
            seal_xid = str(after) if after else None   # None: something wrote since the sentinel: not vouched
            ctx.journal.record("switch_over", "progress", context={"sealed": True, "seal_next_xid": seal_xid})
            ctx.data.update(sealed=True, seal_next_xid=seal_xid)
        proof = prove_nothing_after_final(ctx)   # again, after the seal
        # the seal keeps every client out; the reverse replication's apply must write here
        ctx.held().control.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(
            sql.Identifier(db)))
        api.subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} DISABLE", ctx.outputs.aurora.database)
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
                "AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1").fetchall()]
            with master.transaction():
                master.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                master.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)")
                               .format(sql.Identifier(REVERSE), sql.SQL(", ").join(sql.SQL(t) for t in tables)))
    if not leader_pg.query(f"SELECT 1 FROM pg_subscription WHERE subname = {literal(REVERSE)}", database=db):
        a = ctx.outputs.aurora
        # TLS to Aurora on AWS (rds.force_ssl); the sandbox's stand-in has no certificate
        tls = "prefer" if a.api is not None and a.api.kind == "local" else "require"
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
    ctx.app.set_config_vars({var: aurora_app_url(ctx.app, ctx.outputs), EC2_URL_VAR: ctx.source_url()})
    a = ctx.outputs.aurora
    return {"switched_at": time.time(), "detail": f"{var} -> {a.writer_endpoint}:{a.port} "
                                                  f"(the EC2 leader's URL kept in {EC2_URL_VAR})"}


def smoke_test(ctx: Context) -> dict[str, Any]:
    a = ctx.outputs.aurora
    what = ctx.app.smoke_test(a.writer_endpoint, a.port, since=ctx.data.get("switched_at", 0.0),
                              timeout=ctx.settings.smoke_timeout)
    return {"smoke_test": what, "detail": what}


def plan() -> list[Step]:
    return [
        Step("preflight", "preflight: replication streaming and keeping up", preflight),
        Step("snapshot", "snapshots of Aurora and the EC2 leader", snapshot),
        Step("stop_workers", "stop background workers", stop_workers, check=workers_stopped, revert=restore_workers,
             revert_hint="the background workers are still scaled to 0: scale them back"),
        Step("maintenance_on", "maintenance mode on (web stops writing)", maintenance_on,
             check=lambda ctx: ctx.app.maintenance(), revert=lambda ctx: ctx.app.set_maintenance(False),
             revert_hint="the app is still in maintenance mode: turn it off"),
        Step("fence", "fence the EC2 leader and prove it", fence, verify=prove_fenced, revert=unfence,
             recheck=prove_fenced, revert_hint="the EC2 leader is still fenced: ALTER DATABASE <db> CONNECTION "
                                               "LIMIT -1 and RESET default_transaction_read_only as superuser"),
        Step("catch_up", "sentinel after the fence; wait until Aurora applied it", catch_up,
             recheck=lambda ctx: prove_nothing_after_final(ctx)),
        Step("sequences", "set every sequence on Aurora past the leader's", sequences),
        Step("verify", "verify the frozen leader against Aurora (bounded sample)", verify),
        Step("switch_over", "stop forward replication, start Aurora -> EC2", switch_over, point_of_no_return=True),
        Step("switch", "switch the app's database URL to Aurora", switch, check=switched),
        Step("start_app", "start the web, then the workers", start_app, check=app_started),
        Step("smoke_test", "smoke test through the app on Aurora", smoke_test),
    ]


STEP_NAMES = [s.name for s in plan()]
