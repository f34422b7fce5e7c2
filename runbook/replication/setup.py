"""``invoke replicate-aurora``: set up and start replication from the EC2 leader into Aurora.

Journaled steps (running it again resumes, or finds everything in place):

1. ``preflight``: the risk register (:mod:`.risks`); a ``block`` finding refuses, nothing changed.
2. ``prepare_leader``: tern's schema and sentinel table, the replication role, the publication.
3. ``aurora_role``: the app's role on Aurora (same password verifier), owner of its database.
4. ``schema``: tables, sequences, types, functions, views and primary keys, as the app's role.
5. ``subscribe``: the subscription on Aurora (initial copy of every table, then changes).
6. ``initial_sync``: every table ready (streaming changes), bounded by ``restore_timeout``.
7. ``schema_after``: secondary indexes, foreign keys, triggers (after the copy: faster).
8. ``ddl_guard``: DDL on the leader is refused from now on (an event trigger), since neither
   engine replicates DDL.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ..adapters import app_for
from ..adapters.aurora import aurora_api_for
from ..contract import Outputs
from ..errors import ConfigError, PreflightError, RunbookError, StepError
from ..failover.context import Context
from ..journal import Journal, RunLock
from ..polling import wait_until
from ..secrets import resolve
from ..settings import Settings
from ..steps import Runner, Step
from . import ENGINES, native, risks, schema
from .leader import aurora_master_url, leader, leader_url

KIND = "replicate-aurora"


def _leader(ctx: Context):
    return ctx.pg(ctx.data["leader"])


def _db(ctx: Context) -> str:
    return ctx.replica(ctx.data["leader"]).database


def preflight(ctx: Context) -> dict[str, Any]:
    r = leader(ctx.app, ctx.outputs)
    pg = ctx.pg(r.name)
    if pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        raise PreflightError(f"{r.name} is still a standby: run failover-ec2 first")
    api = aurora_api_for(ctx.outputs.aurora)
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        has_data = schema.has_tables(master)
    findings = risks.register(pg, r.database, allowed_extensions=api.allowed_extensions(),
                              replica_identity_full=bool(ctx.data.get("replica_identity_full")),
                              target_has_data=has_data, max_lag_bytes=ctx.settings.max_lag_bytes)
    blocks = risks.blocking(findings)
    register = [f.to_json() for f in findings]
    if blocks:
        raise PreflightError("refused: " + "; ".join(f"{f.risk}: {', '.join(f.objects[:5])} - {f.action}"
                                                     for f in blocks), register=register)
    if ctx.data.get("replica_identity_full"):
        for f in findings:
            if f.risk.startswith("tables without a primary key"):
                pg.psql(native.BYPASS_GUARD + "".join(f"ALTER TABLE {_qualified(t)} REPLICA IDENTITY FULL;\n"
                                                      for t in f.objects), database=r.database)
    return {"leader": r.name, "risk_register": register,
            "detail": f"leader {r.name}; {len(findings)} findings, none blocking"}


def _qualified(name: str) -> str:
    schema_name, _, table = name.partition(".")
    return f'"{schema_name}"."{table}"'


def prepare_leader(ctx: Context) -> dict[str, Any]:
    password = resolve(ctx.outputs.credentials.replication_password)
    what = native.prepare_leader(_leader(ctx), _db(ctx), schema.app_role(ctx.source_url()), password)
    return {"detail": what}


def aurora_role(ctx: Context) -> dict[str, Any]:
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        what = schema.copy_role(_leader(ctx), _db(ctx), master, schema.app_role(ctx.source_url()),
                                ctx.outputs.aurora.master_user)
    return {"detail": what}


def copy_schema(ctx: Context) -> dict[str, Any]:
    api = aurora_api_for(ctx.outputs.aurora)
    pre, extensions, skipped = schema.without_extensions(schema.dump(_leader(ctx), _db(ctx), "pre-data"),
                                                         api.allowed_extensions())
    keys, _ = schema.split_post_data(schema.dump(_leader(ctx), _db(ctx), "post-data"))
    role = schema.app_role(ctx.source_url())
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        if schema.has_tables(master):
            return {"detail": "Aurora already has the tables: schema copy skipped"}
        for name, in_schema in extensions:
            api.create_extension(name, ctx.outputs.aurora.database, schema=in_schema)
        schema.restore(master, pre, role, "schema (tables, types, functions, views)")
        schema.restore(master, keys, role, "primary keys")
    note = f"; extensions not offered by Aurora, not created: {', '.join(skipped)}" if skipped else ""
    return {"skipped_extensions": skipped, "detail": "tables, sequences, types, functions, views, primary keys" + note}


def subscribe(ctx: Context) -> dict[str, Any]:
    r = ctx.replica(ctx.data["leader"])
    password = resolve(ctx.outputs.credentials.replication_password)
    info = native.conninfo(r.host, r.port, r.database, password)
    api = aurora_api_for(ctx.outputs.aurora)
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        what = native.subscribe(api, master, ctx.outputs.aurora.database, info)
    return {"detail": what}


def initial_sync(ctx: Context) -> dict[str, Any]:
    t0 = time.monotonic()
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        last: dict[str, str] = {}

        def ready() -> bool:
            last.clear()
            last.update(native.table_states(master))
            if ctx.progress:
                copying = sorted(t for t, s in last.items() if s != "r")
                ctx.say(f"initial copy: {len(last) - len(copying)} of {len(last)} tables ready"
                        + (f" (copying {', '.join(copying[:3])})" if copying else ""))
            return bool(last) and all(s == "r" for s in last.values())

        wait_until(ready, timeout=ctx.settings.restore_timeout, interval=1.0, what="every table's initial copy",
                   last=lambda: ", ".join(f"{t}: {s}" for t, s in last.items() if s != "r"))
    seconds = round(time.monotonic() - t0, 1)
    return {"initial_sync_seconds": seconds, "detail": f"{len(last)} tables copied and streaming in {seconds}s"}


def schema_after(ctx: Context) -> dict[str, Any]:
    _, rest = schema.split_post_data(schema.dump(_leader(ctx), _db(ctx), "post-data"))
    role = schema.app_role(ctx.source_url())
    done = skipped = 0
    with native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout) as master:
        for kind, body in schema.entries(rest):
            for attempt in range(5):
                try:
                    schema.restore(master, schema.preamble(rest) + body, role, kind.lower())
                    done += 1
                except Exception as exc:  # noqa: BLE001 - already there (a resumed run) is fine
                    if "already exists" in str(exc):
                        skipped += 1
                    elif "deadlock detected" in str(exc) and attempt < 4:
                        time.sleep(0.5 * (attempt + 1))   # the apply worker held the table: try again
                        continue
                    else:
                        raise
                break
    return {"detail": f"{done} indexes, foreign keys and triggers created" + (f", {skipped} already there"
                                                                             if skipped else "")}


def ddl_guard(ctx: Context) -> dict[str, Any]:
    native.install_guard(_leader(ctx), _db(ctx))
    return {"detail": "DDL on the leader is refused while replication runs (event trigger tern_ddl_guard)"}


def guard_installed(ctx: Context) -> bool:
    return bool(_leader(ctx).query("SELECT 1 FROM pg_event_trigger WHERE evtname = 'tern_ddl_guard' "
                                   "AND evtenabled <> 'D'", database=_db(ctx)))


def plan() -> list[Step]:
    return [
        Step("preflight", "preflight: the risk register", preflight),
        Step("prepare_leader", "leader: replication role, tern's sentinel, publication", prepare_leader),
        Step("aurora_role", "Aurora: the app's role and its database", aurora_role),
        Step("schema", "Aurora: the schema (before the copy)", copy_schema),
        Step("subscribe", "Aurora: the subscription", subscribe),
        Step("initial_sync", "initial copy of every table", initial_sync),
        Step("schema_after", "Aurora: indexes, foreign keys, triggers (after the copy)", schema_after),
        Step("ddl_guard", "leader: refuse DDL while replication runs", ddl_guard, check=guard_installed),
    ]


def replicate_aurora(outputs: Outputs, settings: Settings, *, engine: str = "native", dry_run: bool = False,
                     replica_identity_full: bool = False,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")
    if engine == "dms":
        if outputs.dms is None:
            raise ConfigError("engine dms needs the stack's DMS task (outputs.dms); the sandbox runs native")
        raise ConfigError("engine dms: start the Pulumi-declared DMS task with the DMS adapter "
                          "(runbook/adapters/dms.py); tern's sandbox rehearses the native engine")
    app = app_for(outputs.app)
    state_dir = Path(settings.state_dir)
    source = leader_url(app, outputs)
    if dry_run:
        journal = Journal.current(state_dir, KIND) or Journal(Path("/dev/null"), "dry-run", KIND)
        ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress,
                      source_override=source)
        ctx.data["replica_identity_full"] = replica_identity_full
        runner = Runner(journal, plan(), confirm=lambda q: True, falls_back=False)
        rows = [{"step": s.name, "title": s.title, "state": st} for s, st in runner.plan(ctx)]
        try:
            register = preflight(ctx)["risk_register"]
            error = None
        except (PreflightError, ConfigError) as exc:
            register, error = exc.context.get("register", []), str(exc)
        return {"dry_run": True, "plan": rows, "risk_register": register, "refused": error}
    with RunLock(state_dir, KIND):
        journal = Journal.current(state_dir, KIND)
        if journal is None:
            journal = Journal.create(state_dir, KIND, engine=engine, replica_identity_full=replica_identity_full)
        elif progress:
            progress(f"resuming run {journal.run_id}")
        ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress,
                      source_override=source)
        ctx.data["replica_identity_full"] = replica_identity_full
        runner = Runner(journal, plan(), confirm=lambda q: True, falls_back=False, progress=progress or (lambda m: None))
        try:
            runner.run(ctx)
        except StepError as exc:
            exc.context["run_id"] = journal.run_id
            cause = exc.__cause__
            exc.context["risk_register"] = journal.context().get("risk_register") or (
                cause.context.get("register") if isinstance(cause, PreflightError) else None)
            if exc.context.get("step") == "preflight":
                journal.finish("refused", str(exc))   # nothing changed: the next run starts afresh
            raise
        finally:
            ctx.close()
    data = journal.context()
    return {"run_id": journal.run_id, "kind": KIND, "outcome": "completed", "leader": data.get("leader"),
            "risk_register": data.get("risk_register"), "initial_sync_seconds": data.get("initial_sync_seconds"),
            "steps": [{"name": s.name, "outcome": s.outcome, "detail": s.detail} for s in journal.steps()]}


# ``invoke status``'s ``replication`` keys (documented in runbook/status.py and the README)
STATUS_KEYS = ("state", "engine", "leader", "subscription", "enabled", "tables", "tables_ready", "tables_total",
               "leader_lsn", "confirmed_lsn", "applied_lsn", "lag_bytes", "lag_seconds", "slot_active", "wal_status",
               "safe_wal_size", "sample_seconds", "write_bytes_per_second", "apply_bytes_per_second", "headroom",
               "caught_up", "note", "error")


def replication_status(outputs: Outputs, *, timeout: float, sample_seconds: float,
                       sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """For ``invoke status``: replication into Aurora as it is now. Never raises: what it cannot see, it says.

    Per-table sync state (``pg_subscription_rel.srsubstate`` on Aurora); lag from the leader's *current*
    LSN to what Aurora confirmed (the slot's ``confirmed_flush_lsn``), in bytes and in seconds
    (:func:`.headroom.lag_seconds`); the leader's write rate and Aurora's apply rate over a sample of
    ``sample_seconds`` (taken only while the subscription is enabled), and their ratio."""
    from ..redact import redact
    from ..status import replica_host
    from . import SUBSCRIPTION
    from . import headroom as headroom_mod

    out: dict[str, Any] = dict.fromkeys(STATUS_KEYS)
    out.update(state="not set up", engine="native", subscription=SUBSCRIPTION, tables={})
    try:
        r = leader(app_for(outputs.app), outputs)
    except RunbookError as exc:
        out["note"] = f"no EC2 leader to replicate from yet: {redact(exc)}"
        return out
    out["leader"] = r.name
    try:
        with native.master_connection(aurora_master_url(outputs), timeout) as master:
            enabled = native.subscription_enabled(master)
            if enabled is None:
                out["note"] = "no subscription on Aurora: run `invoke replicate-aurora`"
                return out
            out["tables"] = native.table_states(master)
    except RunbookError as exc:
        out.update(state="unreachable", error=f"aurora: {redact(exc)}")
        return out
    states = out["tables"]
    out.update(enabled=enabled, tables_total=len(states), tables_ready=sum(1 for v in states.values() if v == "r"))
    try:
        pg = replica_host(r)
        first, last = native.sample(pg, sample_seconds, sleep) if enabled else (None, native.lag(pg))
    except RunbookError as exc:
        out.update(state="unreachable", error=f"{r.name}: {redact(exc)}")
        return out
    out.update(leader_lsn=last["leader_lsn"], confirmed_lsn=last["confirmed_lsn"], applied_lsn=last["applied_lsn"],
               lag_bytes=last["lag_bytes"], slot_active=last["active"], wal_status=last["wal_status"],
               safe_wal_size=last["safe_wal_size"])
    if first is not None and last["slot"]:
        a, b = headroom_mod.Look.of(first), headroom_mod.Look.of(last)
        measured = headroom_mod.measure(a, b)
        figures = measured.to_json()
        out.update(sample_seconds=figures["sample_seconds"], write_bytes_per_second=figures["write_bytes_per_second"],
                   apply_bytes_per_second=figures["apply_bytes_per_second"], headroom=figures["headroom"],
                   caught_up=figures["caught_up"], lag_seconds=headroom_mod.lag_seconds(a, b, last["replay_lag"]))
    elif last["lag_bytes"] == 0:
        out["lag_seconds"] = 0.0
    if not last["slot"]:
        out["state"] = "slot missing"
        out["note"] = f"the replication slot {SUBSCRIPTION} is gone from {r.name}: set up replication again"
    elif last["wal_status"] == "lost":
        out["state"] = "slot lost"
        out["note"] = f"the slot {SUBSCRIPTION} on {r.name} lost WAL Aurora needs: set up replication again"
    elif not enabled:
        out["state"] = "disabled"
        out["note"] = "the subscription on Aurora is disabled (failover-aurora disables it at its switch-over)"
    elif out["tables_ready"] < out["tables_total"] or not states:
        out["state"] = "initial copy"
    elif not last["active"]:
        out["state"] = "not streaming"
        out["note"] = f"no apply worker uses the slot {SUBSCRIPTION}: see Aurora's log"
    else:
        out["state"] = "streaming"
    return out
