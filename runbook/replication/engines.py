"""Hop 2's replication engine: one interface, two engines (STYLE: adapters behind small interfaces).

* :class:`NativeEngine` - a publication on the EC2 leader, a subscription on Aurora (:mod:`.native`). The
  default, and the one the sandbox rehearses.
* :class:`DmsEngine` - the Pulumi-declared AWS DMS task (full load + CDC, full LOB mode, validation), driven
  through :class:`runbook.adapters.dms.DmsTask`.

``invoke replicate-aurora`` (:mod:`.setup`), ``invoke status`` and ``invoke failover-aurora``
(:mod:`runbook.failover.aurora`) only ever talk to an :class:`Engine`. Which one is recorded once, in the
``replicate-aurora`` journal's context (``engine``; :func:`recorded`), and read from there by the other two
(:func:`for_run`, :func:`for_status`) - a failover never guesses.

**What proves, at failover-aurora's catch-up, that Aurora applied everything up to the final LSN**
(:meth:`Engine.applied_final`). Both engines: the run's *sentinel row*, written on the leader after the fence
and proved to be the leader's last transaction (its next transaction id never moved after it), is on Aurora.

* native: also the subscription's slot on the leader confirmed (``confirmed_flush_lsn``) the final LSN: the
  apply worker reports what it flushed, in commit order. A slot gone or lost fails at once.
* DMS: DMS reports no LSN tern can compare (it runs its own logical slot on the leader, created at the task's
  first start with a generated name unless ``SlotName`` is set; it moves that slot's ``restart_lsn`` /
  ``confirmed_flush_lsn`` when it chooses, so neither is a proof of what reached Aurora). The proof is the
  sentinel alone, which is enough because DMS's *transactional apply* (``BatchApplyEnabled`` false - the
  register refuses a task without it) applies source transactions one by one in commit order: the sentinel on
  Aurora means every transaction committed before it is there too. Checked alongside, each failing at once
  instead of waiting out the timeout: the task is not ``failed`` / ``failed-move`` / stopped on a fatal
  reason, and DMS's slot on the leader (found when the full load finished, :meth:`DmsEngine.find_slot`) is
  neither gone nor lost. CloudWatch's ``CDCLatencyTarget`` is reported (status, preflight), never a proof.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import psycopg
from psycopg import sql

from ..contract import Outputs, Replica
from ..errors import ConfigError, NotPromoted, PreflightError, RunbookError, StepError, VerificationError
from ..measure import record_lag
from ..pg import lsn_to_int
from ..polling import wait_until
from ..postgres import PgHost, literal
from ..redact import redact
from . import ENGINES, REVERSE, SUBSCRIPTION, TERN_SCHEMA, native
from .leader import aurora_master_url

SETUP_KIND = "replicate-aurora"

# ``invoke status``'s ``replication`` keys (documented in runbook/status.py and the README); ``task``,
# ``validation`` and ``cdc_latency`` are the DMS engine's (null for native), ``slot`` the leader's slot
STATUS_KEYS = ("state", "engine", "leader", "subscription", "enabled", "tables", "tables_ready", "tables_total",
               "leader_lsn", "confirmed_lsn", "applied_lsn", "lag_bytes", "lag_seconds", "slot_active", "wal_status",
               "safe_wal_size", "sample_seconds", "write_bytes_per_second", "apply_bytes_per_second", "headroom",
               "caught_up", "slot", "task", "validation", "cdc_latency", "note", "error")


def blank_status(engine: str) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(STATUS_KEYS)
    out.update(state="not set up", engine=engine, tables={})
    return out


def master(ctx):
    return native.master_connection(aurora_master_url(ctx.outputs), ctx.settings.connect_timeout)


def sentinel_on_aurora(ctx) -> bool | None:
    """This run's sentinel row is on Aurora (True / False); None while Aurora cannot be reached - a restart or a
    failover of its writer is waited through by the caller (why in ``ctx.data['_aurora_unreachable']``)."""
    try:
        with master(ctx) as m:
            row = m.execute(sql.SQL("SELECT 1 FROM {}.sentinel WHERE run_id = %s").format(
                sql.Identifier(TERN_SCHEMA)), (ctx.journal.run_id,)).fetchone()
    except (psycopg.OperationalError, RunbookError) as exc:
        ctx.data["_aurora_unreachable"] = str(exc).strip().splitlines()[0] if str(exc) else type(exc).__name__
        return None
    ctx.data.pop("_aurora_unreachable", None)
    return row is not None


class Engine(ABC):
    """What replicate-aurora, status and failover-aurora need of a replication engine. Every method that takes
    ``ctx`` (a :class:`runbook.failover.context.Context`) reads the EC2 leader's name from ``ctx.data['leader']``."""

    name: ClassVar[str]
    #: failover-aurora's full verification holds an EC2 standby where Aurora's apply stopped (native); DMS's own
    #: row-level validation stands in for it
    needs_witness: ClassVar[bool]
    #: replicate-aurora creates a publication on the leader for it (DMS decodes the WAL through a slot of its own)
    publishes: ClassVar[bool]

    def __init__(self, outputs: Outputs) -> None:
        self.outputs = outputs

    # -- replicate-aurora ------------------------------------------------------------------------------------
    def risks(self, ctx, leader: PgHost, database: str, findings: list) -> list:
        """The risk register, this engine's findings added to the shared ones (:func:`.risks.register`)."""
        return findings

    @abstractmethod
    def start(self, ctx) -> dict[str, Any]:
        """Start replicating from the leader into Aurora. Idempotent: the first time it starts from scratch (an
        initial copy); again, it continues where it stopped (never a second initial copy); running, it is a
        no-op. Returns the step's result (``detail`` and what to journal)."""

    @abstractmethod
    def wait_synchronised(self, ctx, timeout: float) -> dict[str, Any]:
        """Wait (bounded by ``timeout``) until every table is copied and changes stream; fail fast on a failure."""

    # -- invoke status -------------------------------------------------------------------------------------
    @abstractmethod
    def status(self, leader: Replica, *, timeout: float, sample_seconds: float,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
        """The ``replication`` keys of ``invoke status`` (:data:`STATUS_KEYS`): per-table state, lag, validation.
        Never raises: what it cannot see, it says (``state`` ``unreachable``, ``error``)."""

    # -- failover-aurora -----------------------------------------------------------------------------------
    @abstractmethod
    def check_ready(self, ctx, leader: Replica) -> dict[str, Any]:
        """failover-aurora's preflight: every table synchronised, changes streaming, keeping up with the leader.
        :class:`PreflightError` (one line, why) otherwise; nothing changed. Returns ``engine``, ``tables``,
        ``lag_bytes``, ``why`` (and ``apply_headroom`` when measured)."""

    @abstractmethod
    def verify_full(self, ctx) -> dict[str, Any]:
        """Every row checked before the freeze (the app running); :class:`VerificationError` naming the tables."""

    @abstractmethod
    def release(self, ctx) -> None:
        """Undo what :meth:`verify_full` holds (also after a killed run); a no-op when nothing is held."""

    @abstractmethod
    def applied_final(self, ctx) -> str | None:
        """The proof that Aurora applied everything up to ``ctx.data['final_lsn']`` (see the module docstring):
        a description when proved, None while not yet; :class:`StepError` when it can never be (waiting cannot
        help: fall back at once)."""

    @abstractmethod
    def forward_running(self, ctx) -> bool:
        """Replication into Aurora still runs (switch_over has not stopped it yet)."""

    @abstractmethod
    def stop_forward(self, ctx) -> str:
        """switch_over: stop replication into Aurora before anything writes to Aurora (the reverse replication
        would otherwise be carried back). Bounded; idempotent."""

    @abstractmethod
    def slot_name(self, ctx=None) -> str | None:
        """The logical slot on the leader replication into Aurora uses (None: not known)."""

    def lag_text(self, ctx) -> str:
        """One line on how far behind Aurora is (for a catch-up that timed out)."""
        return ""


# -- native ---------------------------------------------------------------------------------------------------
class NativeEngine(Engine):
    name = "native"
    needs_witness = True
    publishes = True

    def risks(self, ctx, leader: PgHost, database: str, findings: list) -> list:
        from .risks import Finding

        rec = recorded(ctx.settings.state_dir, exclude=ctx.journal.run_id) or {}
        if rec.get("engine") == "dms" and self.outputs.dms is not None:
            try:
                st = DmsEngine(self.outputs).task().status()
                if st.status in ("running", "starting", "stopping", "modifying"):
                    findings.append(Finding("DMS task running", "block", [self.outputs.dms.replication_task_arn],
                                            "refused: the DMS task replicates into Aurora already; two engines would "
                                            "apply every change twice (stop it, or keep --engine dms)"))
            except RunbookError as exc:
                findings.append(Finding("DMS task unknown", "warn", [redact(exc)],
                                        "replicate-aurora ran with --engine dms before; check that its task is stopped"))
        return findings

    def start(self, ctx) -> dict[str, Any]:
        from ..adapters.aurora import aurora_api_for
        from ..secrets import resolve

        r = ctx.replica(ctx.data["leader"])
        password = resolve(ctx.outputs.credentials.replication_password)
        info = native.conninfo(r.host, r.port, r.database, password)
        api = aurora_api_for(ctx.outputs.aurora)
        with master(ctx) as m:
            what = native.subscribe(api, m, ctx.outputs.aurora.database, info)
        return {"detail": what}

    def wait_synchronised(self, ctx, timeout: float) -> dict[str, Any]:
        t0 = time.monotonic()
        with master(ctx) as m:
            last: dict[str, str] = {}

            def ready() -> bool:
                last.clear()
                last.update(native.table_states(m))
                if ctx.progress:
                    copying = sorted(t for t, s in last.items() if s != "r")
                    ctx.say(f"initial copy: {len(last) - len(copying)} of {len(last)} tables ready"
                            + (f" (copying {', '.join(copying[:3])})" if copying else ""))
                return bool(last) and all(s == "r" for s in last.values())

            wait_until(ready, timeout=timeout, interval=0.2, what="every table's initial copy",
                       last=lambda: ", ".join(f"{t}: {s}" for t, s in last.items() if s != "r"))
        seconds = round(time.monotonic() - t0, 1)
        return {"initial_sync_seconds": seconds, "detail": f"{len(last)} tables copied and streaming in {seconds}s"}

    def status(self, leader: Replica, *, timeout: float, sample_seconds: float,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
        """Per-table sync state (``pg_subscription_rel.srsubstate`` on Aurora); lag from the leader's *current*
        LSN to what Aurora confirmed (the slot's ``confirmed_flush_lsn``), in bytes and in seconds
        (:func:`.headroom.lag_seconds`); the leader's write rate and Aurora's apply rate over a sample of
        ``sample_seconds`` (taken only while the subscription is enabled), and their ratio."""
        from ..status import replica_host
        from . import headroom as headroom_mod

        out = blank_status(self.name)
        out.update(subscription=SUBSCRIPTION, leader=leader.name, slot=SUBSCRIPTION)
        r = leader
        try:
            with native.master_connection(aurora_master_url(self.outputs), timeout) as m:
                enabled = native.subscription_enabled(m)
                if enabled is None:
                    out["note"] = "no subscription on Aurora: run `invoke replicate-aurora`"
                    return out
                out["tables"] = native.table_states(m)
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
            out.update(sample_seconds=figures["sample_seconds"],
                       write_bytes_per_second=figures["write_bytes_per_second"],
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

    def check_ready(self, ctx, leader: Replica) -> dict[str, Any]:
        from . import headroom as headroom_mod

        r = leader
        pg = ctx.pg(r.name)
        with master(ctx) as m:
            if not native.subscription_exists(m):
                raise PreflightError("replication into Aurora is not set up: run `invoke replicate-aurora` first")
            states = native.table_states(m)
        waiting = sorted(t for t, s in states.items() if s != "r")
        if not states or waiting:
            named = ", ".join(f"{t} ({native.STATES.get(states[t], states[t])})" for t in waiting[:5])
            more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
            raise PreflightError(f"not every table is synchronised into Aurora ({named or 'no table at all'}{more}): "
                                 "wait for replicate-aurora's initial copy")
        seen: dict[str, Any] = {}

        def streaming() -> bool:   # an apply worker restarting (it retries every few seconds) is not an outage
            seen.update(native.lag(pg))
            return bool(seen["slot"] and seen["active"])

        try:
            wait_until(streaming, timeout=min(30.0, ctx.settings.catchup_timeout), interval=0.5,
                       what=f"the replication slot {SUBSCRIPTION} on {r.name} to be in use")
        except RunbookError:
            with master(ctx) as m:
                errors = m.execute("SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats "
                                   "WHERE subname = %s", (SUBSCRIPTION,)).fetchone()
            raise PreflightError(f"the replication slot {SUBSCRIPTION} on {r.name} is "
                                 f"{'missing' if not seen.get('slot') else 'not in use'}: replication is not running "
                                 f"(Aurora's apply errors so far: {errors[0] if errors else '?'}; see its log)") from None
        # the apply headroom over a short sample, by the rule of runbook/replication/headroom.py: under
        # max_lag_bytes at the end; caught up at both ends is enough (a quiet app); else apply bytes/s at
        # least min_apply_headroom x the leader's WAL bytes/s
        first, second = native.sample(pg, ctx.settings.apply_sample_seconds)
        measured = headroom_mod.measure(headroom_mod.Look.of(first), headroom_mod.Look.of(second))
        enough, why = headroom_mod.judge(measured, min_headroom=ctx.settings.min_apply_headroom,
                                         max_lag_bytes=ctx.settings.max_lag_bytes)
        if not enough:
            raise PreflightError(f"Aurora's apply does not keep up with {r.name}: {why}")
        return {"engine": self.name, "tables": len(states), "lag_bytes": second["lag_bytes"],
                "apply_headroom": measured.to_json(), "why": why}

    def verify_full(self, ctx) -> dict[str, Any]:
        from ..failover import consistent_point

        return consistent_point.verify_full(ctx)

    def release(self, ctx) -> None:
        from ..failover import consistent_point

        consistent_point.release(ctx)

    def applied_final(self, ctx) -> str | None:
        lag = native.lag(ctx.pg(ctx.data["leader"]))
        record_lag(ctx.journal, "aurora", lag.get("lag_bytes"))   # for the after-action review
        if not lag["slot"] or lag["wal_status"] == "lost":
            # no slot, no way for Aurora to receive what the leader wrote: waiting cannot help
            raise StepError(f"the replication slot {SUBSCRIPTION} on the EC2 leader is "
                            f"{'gone' if not lag['slot'] else 'lost (its WAL was removed)'}: Aurora cannot catch up. "
                            "Falling back; rebuild Aurora's copy with `invoke replicate-aurora` before trying again")
        if not sentinel_on_aurora(ctx):
            return None
        if lag["confirmed_lsn"] is None or lsn_to_int(lag["confirmed_lsn"]) < lsn_to_int(ctx.data["final_lsn"]):
            return None
        return f"confirmed {lag['confirmed_lsn']}"

    def forward_running(self, ctx) -> bool:
        with master(ctx) as m:
            return bool(native.subscription_enabled(m))

    def stop_forward(self, ctx) -> str:
        from ..adapters.aurora import aurora_api_for

        aurora_api_for(ctx.outputs.aurora).subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} DISABLE",
                                                                  ctx.outputs.aurora.database)
        return f"subscription {SUBSCRIPTION} disabled"

    def slot_name(self, ctx=None) -> str | None:
        return SUBSCRIPTION

    def lag_text(self, ctx) -> str:
        return f"lag {native.lag(ctx.pg(ctx.data['leader'])).get('lag_bytes')} bytes"


# -- DMS ------------------------------------------------------------------------------------------------------
TABLE_COMPLETED = "Table completed"
#: ValidationState values under which a table's rows are compared (or waiting to be)
VALIDATING = frozenset({"Validated", "Pending records", "Pending validation", "Pending revalidation",
                        "Preparing table"})


def slot_look(pg: PgHost, slot: str) -> dict[str, Any]:
    """One look at a logical slot on the leader: the leader's *current* LSN against the slot's
    ``confirmed_flush_lsn`` (what its consumer acknowledged), and what the slot may still hold."""
    r = pg.query_one(
        "SELECT pg_current_wal_lsn()::text AS now, s.slot_name IS NOT NULL AS slot, s.confirmed_flush_lsn::text "
        "AS confirmed, coalesce(s.active, false) AS active, s.wal_status, s.safe_wal_size FROM (SELECT 1) one "
        f"LEFT JOIN pg_replication_slots s ON s.slot_name = {literal(slot)}")
    behind = None if r["confirmed"] is None else max(0, lsn_to_int(r["now"]) - lsn_to_int(r["confirmed"]))
    return {"slot": bool(r["slot"]), "leader_lsn": r["now"], "confirmed_lsn": r["confirmed"], "lag_bytes": behind,
            "active": bool(r["active"]), "wal_status": r["wal_status"], "safe_wal_size": r["safe_wal_size"]}


class DmsEngine(Engine):
    name = "dms"
    needs_witness = False
    publishes = False
    #: how often the catch-up loop asks DMS and the leader about the task and its slot (the sentinel is read on
    #: every poll); DescribeReplicationTasks is throttled
    CHECK_SECONDS = 2.0

    def __init__(self, outputs: Outputs, *, task=None, slot: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(outputs)
        self._task = task
        self.slot = slot
        self.clock = clock
        self._checked_at: float | None = None

    def task(self):
        """The stack's DMS task (:class:`runbook.adapters.dms.DmsTask`, from ``outputs.dms``)."""
        if self._task is None:
            from ..adapters.dms import DmsTask

            self._task = DmsTask.from_outputs(self.outputs)
        return self._task

    # -- replicate-aurora ------------------------------------------------------------------------------------
    def risks(self, ctx, leader: PgHost, database: str, findings: list) -> list:
        from . import risks as risks_mod
        from .schema import has_tables

        task = self.task()
        definition = task.definition()
        source = task.endpoint(definition.get("source_endpoint_arn") or self.outputs.dms.source_endpoint_arn)
        target = task.endpoint(definition.get("target_endpoint_arn") or self.outputs.dms.target_endpoint_arn)
        st = task.status()
        with master(ctx) as m:
            native_sub = native.subscription_exists(m)
            rows = st.never_started and has_tables(m) and aurora_has_rows(m)
        facts = risks_mod.dms_facts(leader, database, sample_timeout=ctx.settings.gate_sample_timeout)
        for f in findings:
            if f.risk.startswith("tables without a primary key"):
                f.action = (("REPLICA IDENTITY FULL is set on them so DMS can carry their UPDATE/DELETE; DMS cannot "
                             "validate them (no key): only tern's gate and counts cover them")
                            if f.severity != "block" else
                            "refused: DMS drops their UPDATE/DELETE silently and cannot validate them; add a primary "
                            "key, or run again with --replica-identity-full")
        return findings + risks_mod.dms_findings(
            facts, definition, source, target, task_status=st,
            replica_identity_full=bool(ctx.data.get("replica_identity_full")), aurora_has_rows=bool(rows),
            native_subscription=native_sub)

    def start(self, ctx) -> dict[str, Any]:
        """The source endpoint follows the leader (never the first instance), then the task starts:
        ``start-replication`` only the first time, ``resume-processing`` after (:meth:`DmsTask.start`)."""
        r = ctx.replica(ctx.data["leader"])
        task = self.task()
        st = task.status()
        host, port = task.source_address()
        at_leader = (host, port) == (r.host, r.port)
        if st.status in ("running", "starting"):
            if not at_leader:
                raise PreflightError(f"the DMS task runs against {host}:{port}, not the EC2 leader {r.name} "
                                     f"({r.host}:{r.port}): its slot and position are on that node; stop it and set "
                                     "up replication again")
            return {"dms_start": "already running", "detail": f"DMS task already running from {r.name}"}
        if not st.never_started and not at_leader:
            raise PreflightError(f"the DMS task ran against {host}:{port} before, not the EC2 leader {r.name}: its "
                                 f"slot and position are on that node, so resuming it from {r.name} would miss or "
                                 "repeat changes; empty Aurora's tables and reload the task (reload-target), or "
                                 "recreate it")
        if st.failure or st.status == "failed-move":
            raise PreflightError(f"the DMS task is in a failed state ({st.failure or st.status}): fix the cause (its "
                                 "CloudWatch log), resume or reload it with DMS, then run replicate-aurora again")
        moved = task.follow_leader(r.host, r.port, timeout=ctx.settings.restore_timeout)
        chosen = task.start(settle_timeout=ctx.settings.restore_timeout)
        how = {"start-replication": "started (start-replication: its first run, a full load then changes)",
               "resume-processing": "resumed (resume-processing: from where it stopped)",
               None: "already running"}.get(chosen, str(chosen))
        where = (f"source endpoint {'moved to' if moved['changed'] else 'already at'} {r.name} "
                 f"({r.host}:{r.port}, through its {moved['via']})")
        return {"dms_start": chosen or "already running", "dms_source": f"{r.host}:{r.port}",
                "detail": f"{where}; DMS task {how}"}

    def wait_synchronised(self, ctx, timeout: float) -> dict[str, Any]:
        """Full load complete, every table of the leader in the task and ``Table completed``, CDC running; DMS's
        slot on the leader found and recorded (the catch-up checks it)."""
        t0 = time.monotonic()
        task = self.task()
        task.wait_full_load(timeout=timeout, progress=ctx.say if ctx.progress else None)
        states = task.table_states()
        missing = [t for t in leader_tables(ctx.pg(ctx.data["leader"]), ctx.replica(ctx.data["leader"]).database)
                   if t[0] not in states and (t[1] is None or t[1] not in states)]
        if missing:
            names = [t[0] for t in missing]
            raise RunbookError(f"DMS does not replicate {len(names)} tables of the leader: {', '.join(names[:10])}"
                               + (f" and {len(names) - 10} more" if len(names) > 10 else "")
                               + ": add them to the task's table mappings")
        bad = {t: s for t, s in states.items() if s != TABLE_COMPLETED}
        if bad:
            raise RunbookError("DMS's full load did not complete every table: "
                               + ", ".join(f"{t} ({s})" for t, s in sorted(bad.items())[:10]))
        slot = self.find_slot(ctx.pg(ctx.data["leader"]), exclude=ctx.data.get("slots_before") or [])
        self.slot = slot
        seconds = round(time.monotonic() - t0, 1)
        return {"initial_sync_seconds": seconds, "dms_slot": slot,
                "detail": f"{len(states)} tables loaded by DMS, changes streaming (slot on the leader: "
                          f"{slot or 'not identified'}) in {seconds}s"}

    def find_slot(self, pg: PgHost, *, exclude: list[str] | tuple[str, ...] = ()) -> str | None:
        """DMS's logical slot on the leader: a logical slot of the app's database that is not tern's and did not
        exist before the task first ran (``exclude``); if several, the one DMS's role streams from now."""
        found = pg.query(
            "SELECT s.slot_name AS name, a.usename AS role FROM pg_replication_slots s "
            "LEFT JOIN pg_stat_activity a ON a.pid = s.active_pid WHERE s.slot_type = 'logical' "
            f"AND s.slot_name NOT IN ({literal(SUBSCRIPTION)}, {literal(REVERSE)}) ORDER BY 1")
        if len(found) > 1:
            found = [r for r in found if r["name"] not in set(exclude)] or found
        if len(found) > 1:
            found = [r for r in found if r["role"] == native.REPLICATION_ROLE] or found
        return found[0]["name"] if len(found) == 1 else None

    def check_validation(self, ctx) -> dict[str, Any]:
        """replicate-aurora's last check before the guard: DMS's validation counts, not only its states."""
        result = self.task().validation(check=True)   # failed / suspended records, failed states: refused
        off = sorted(n for n, v in result.items() if v.state == "Not enabled")
        if off:
            raise VerificationError(f"DMS does not validate {len(off)} tables ({', '.join(off[:10])}): enable "
                                    "validation in the task settings (ValidationSettings.EnableValidation)")
        return {"validation": summarize(result),
                "detail": "DMS validation: " + describe_validation(result)}

    # -- invoke status -------------------------------------------------------------------------------------
    def status(self, leader: Replica, *, timeout: float, sample_seconds: float,
               sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
        from ..status import replica_host

        out = blank_status(self.name)
        out.update(leader=leader.name, slot=self.slot)
        try:
            task = self.task()
            st = task.status()
        except RunbookError as exc:
            out.update(state="unreachable", error=f"dms: {redact(exc)}")
            return out
        out["task"] = {"arn": task.task_arn, "status": st.status, "stop_reason": st.stop_reason,
                       "full_load_percent": st.full_load_percent, "tables_loaded": st.tables_loaded,
                       "tables_loading": st.tables_loading, "tables_queued": st.tables_queued,
                       "tables_errored": st.tables_errored, "failure": st.failure}
        out["enabled"] = st.status in ("running", "starting")
        if st.never_started:
            out["note"] = "the DMS task has never run: run `invoke replicate-aurora --engine dms`"
            return out
        errors: list[str] = []
        try:
            validation = task.validation(check=False)
            out["tables"] = task.table_states()
            out["validation"] = {"summary": summarize(validation),
                                 "tables": {n: {"state": v.state, "failed": v.failed_records,
                                                "suspended": v.suspended_records, "pending": v.pending_records}
                                            for n, v in validation.items()}}
        except RunbookError as exc:
            errors.append(f"dms: {redact(exc)}")
        states = out["tables"]
        out.update(tables_total=len(states), tables_ready=sum(1 for v in states.values() if v == TABLE_COMPLETED))
        try:
            latency = task.cdc_latency()
            out["cdc_latency"] = latency
            out["lag_seconds"] = latency.get("CDCLatencyTarget")
        except RunbookError as exc:
            errors.append(f"cloudwatch: {redact(exc)}")
        look: dict[str, Any] | None = None
        try:
            pg = replica_host(leader)
            slot = self.slot or self.find_slot(pg)
            out["slot"] = slot
            if slot:
                look = slot_look(pg, slot)
                out.update(leader_lsn=look["leader_lsn"], confirmed_lsn=look["confirmed_lsn"],
                           lag_bytes=look["lag_bytes"], slot_active=look["active"], wal_status=look["wal_status"],
                           safe_wal_size=look["safe_wal_size"])
        except RunbookError as exc:
            errors.append(f"{leader.name}: {redact(exc)}")
        if errors:
            out["error"] = "; ".join(errors)
        if st.failure:
            out.update(state="failed", note=f"the DMS task failed: {st.failure}")
        elif st.status == "stopped":
            out.update(state="disabled", note="the DMS task is stopped (failover-aurora stops it at its switch-over)")
        elif st.status == "running" and not st.full_load_done:
            out["state"] = "initial copy"
        elif st.status == "running" and look is not None and not look["slot"]:
            out.update(state="slot missing", note=f"DMS's slot {out['slot']} is gone from {leader.name}")
        elif st.status == "running" and look is not None and look["wal_status"] == "lost":
            out.update(state="slot lost", note=f"DMS's slot {out['slot']} on {leader.name} lost WAL it needs")
        elif st.status == "running":
            out["state"] = "streaming"
        else:
            out.update(state="not streaming", note=f"the DMS task is {st.status}")
        return out

    # -- failover-aurora -----------------------------------------------------------------------------------
    def check_ready(self, ctx, leader: Replica) -> dict[str, Any]:
        from . import risks as risks_mod

        task = self.task()
        st = task.status()
        if st.failure:
            raise PreflightError(f"the DMS task failed: {st.failure}")
        if st.never_started:
            raise PreflightError("replication into Aurora is not set up: run `invoke replicate-aurora --engine dms` "
                                 "first")
        if st.status != "running":
            raise PreflightError(f"the DMS task is {st.status}, not running: replication into Aurora is stopped")
        if not st.full_load_done:
            raise PreflightError(f"DMS's full load is not complete ({st.full_load_percent or 0}%, "
                                 f"{st.tables_loading or 0} tables loading, {st.tables_queued or 0} queued): wait "
                                 "for replicate-aurora")
        blocking = [f for f in risks_mod.dms_task_findings(task.definition()) if f.severity == "block"]
        if blocking:
            raise PreflightError("; ".join(f"{f.risk}: {f.action}" for f in blocking))
        states = task.table_states()
        waiting = sorted(t for t, s in states.items() if s != TABLE_COMPLETED)
        if not states or waiting:
            named = ", ".join(f"{t} ({states[t]})" for t in waiting[:5])
            raise PreflightError(f"not every table is loaded into Aurora by DMS ({named or 'no table at all'})")
        try:
            task.validation(check=True)
        except VerificationError as exc:
            raise PreflightError(str(exc).replace("\n", " ")) from None
        pg = ctx.pg(leader.name)
        slot = self.slot or self.find_slot(pg)
        lag_bytes = None
        if slot:
            look = slot_look(pg, slot)
            if not look["slot"] or look["wal_status"] == "lost":
                raise PreflightError(f"DMS's replication slot {slot} on {leader.name} is "
                                     f"{'missing' if not look['slot'] else 'lost'}: DMS cannot carry the last changes")
            lag_bytes = look["lag_bytes"]
            if lag_bytes is not None and lag_bytes > ctx.settings.max_lag_bytes:
                raise PreflightError(f"DMS's slot {slot} on {leader.name} is {lag_bytes:,} bytes behind the leader's "
                                     f"current LSN (threshold {ctx.settings.max_lag_bytes:,})")
        latency = task.cdc_latency()
        target = latency.get("CDCLatencyTarget")
        bound = ctx.settings.catchup_timeout / 2
        if target is None:
            raise PreflightError("CloudWatch has no CDCLatencyTarget datapoint for the DMS task in the last 5 minutes: "
                                 "cannot tell how far behind Aurora is")
        if target >= bound:
            raise PreflightError(f"DMS is {target:.0f} s behind the leader (CDCLatencyTarget), more than half of "
                                 f"tern.catchup_timeout ({ctx.settings.catchup_timeout:g} s): the catch-up could not "
                                 "finish in time; wait until it is lower")
        why = f"CDC latency {target:.1f} s (source {latency.get('CDCLatencySource')})"
        return {"engine": self.name, "tables": len(states), "lag_bytes": lag_bytes, "why": why,
                "cdc_latency": latency, "dms_slot": slot}

    def verify_full(self, ctx) -> dict[str, Any]:
        """DMS's row-level validation stands in for the held-standby comparison: every table validated or under
        validation, and not one failed or suspended record. Refused otherwise, naming the tables."""
        if ctx.settings.full_verification == "skip":
            note = ("skipped (tern.full_verification = skip): DMS's validation counts were read at the preflight; "
                    "compare Aurora with the leader by `invoke verify --mode full` while both are frozen")
            return {"verification_full": {"ok": None, "note": note}, "detail": note}
        t0 = time.monotonic()
        result = self.task().validation(check=False)
        problems = {n: v.problem for n, v in result.items() if v.problem}
        unchecked = {n: v.state for n, v in result.items() if not v.problem and v.state not in VALIDATING}
        differences = ([f"{n}: {why}" for n, why in sorted(problems.items())]
                       + [f"{n}: not validated by DMS ({s})" for n, s in sorted(unchecked.items())])
        summary = {"ok": not differences and bool(result), "engine": self.name, "witness": "DMS's validation",
                   "tables": len(result), "rows": None,
                   **summarize(result), "differences": differences, "seconds": round(time.monotonic() - t0, 3)}
        if not result:
            differences.append("DMS reports no table statistics")
        if differences:
            ctx.checkpoint(verification_full=summary)   # the report shows what DMS found
            raise VerificationError("DMS's validation does not vouch for every row: " + "; ".join(differences[:10])
                                    + ". Nothing was frozen: the app still runs on the EC2 leader; repair Aurora "
                                      "(DMS's validation failures table names the rows), then run failover-aurora again")
        return {"verification_full": summary, "detail": f"DMS validation: {describe_validation(result)}"}

    def release(self, ctx) -> None:
        return None   # the DMS task keeps running through verify_full: nothing is held

    def _check_task_and_slot(self, ctx) -> None:
        now = self.clock()
        if self._checked_at is not None and now - self._checked_at < self.CHECK_SECONDS:
            return
        self._checked_at = now
        st = self.task().status()
        if st.failure:
            raise StepError(f"the DMS task failed ({st.failure}): Aurora cannot catch up. Falling back; resume or "
                            "reload the task before trying again")
        if self.slot:
            look = slot_look(ctx.pg(ctx.data["leader"]), self.slot)
            if not look["slot"] or look["wal_status"] == "lost":
                raise StepError(f"DMS's replication slot {self.slot} on the EC2 leader is "
                                f"{'gone' if not look['slot'] else 'lost (its WAL was removed)'}: Aurora cannot "
                                "catch up. Falling back; rebuild Aurora's copy before trying again")

    def applied_final(self, ctx) -> str | None:
        self._check_task_and_slot(ctx)
        if not sentinel_on_aurora(ctx):
            return None
        return (f"sentinel {ctx.journal.run_id} on Aurora: DMS applies in commit order, so every transaction before "
                "it too")

    def forward_running(self, ctx) -> bool:
        st = self.task().status()
        if st.failure:
            raise NotPromoted(f"the DMS task failed ({st.failure}): cannot prove Aurora applied everything; "
                              "not switching")
        return not (st.status == "stopped" and not st.fatal_stop)

    def stop_forward(self, ctx) -> str:
        self.task().stop(timeout=ctx.settings.catchup_timeout)
        return "DMS task stopped"

    def slot_name(self, ctx=None) -> str | None:
        return self.slot

    def lag_text(self, ctx) -> str:
        try:
            st = self.task().status()
            latency = self.task().cdc_latency()
        except RunbookError as exc:
            return f"DMS: {redact(exc)}"
        return f"DMS task {st.status}; CDCLatencyTarget {latency.get('CDCLatencyTarget')} s"


# -- helpers ----------------------------------------------------------------------------------------------------
def summarize(result: dict) -> dict[str, int]:
    """Totals of DMS's per-table validation: tables validated, records failed, suspended and pending."""
    return {"validated": sum(1 for v in result.values() if v.state == "Validated"),
            "failed_records": sum(v.failed_records for v in result.values()),
            "suspended_records": sum(v.suspended_records for v in result.values()),
            "pending_records": sum(v.pending_records for v in result.values())}


def describe_validation(result: dict) -> str:
    s = summarize(result)
    no_key = sorted(n for n, v in result.items() if v.state == "No primary key")
    return (f"{s['validated']} of {len(result)} tables validated, {s['pending_records']:,} records pending, "
            f"0 failed, 0 suspended" + (f"; not validated (no primary key): {', '.join(no_key[:5])}" if no_key else ""))


def aurora_has_rows(m: psycopg.Connection) -> bool:
    """Any user table on Aurora holds a row (tern's own schema aside)."""
    tables = m.execute("SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n "
                       "ON n.oid = c.relnamespace WHERE c.relkind = 'r' AND n.nspname NOT IN "
                       "('pg_catalog', 'information_schema', %s) AND n.nspname NOT LIKE 'pg_toast%%'",
                       (TERN_SCHEMA,)).fetchall()
    for (t,) in tables:
        if m.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.SQL(t))).fetchone()[0]:
            return True
    return False


def leader_tables(pg: PgHost, database: str) -> list[tuple[str, str | None]]:
    """(table, its partition root or None) for every table on the leader that holds rows to replicate."""
    rows = pg.query(
        "SELECT n.nspname || '.' || c.relname AS t, rn.nspname || '.' || rc.relname AS root FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_class rc ON rc.oid = pg_partition_root(c.oid) "
        "AND rc.oid <> c.oid LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace "
        "WHERE c.relkind = 'r' AND c.relpersistence = 'p' AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
        "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%' ORDER BY 1", database=database)
    return [(r["t"], r["root"]) for r in rows]


def recorded(state_dir, *, exclude: str | None = None) -> dict[str, Any] | None:
    """What replicate-aurora set up on this stack: the context of its latest run that got past its preflight (a
    refused run changed nothing) - ``engine`` (``native`` when an older run did not say), ``dms_slot``, ``leader``
    - with ``run_id``; None when it never ran."""
    from ..journal import Journal

    runs = Path(state_dir) / "runs"
    if not runs.is_dir():
        return None

    def mtime(p: Path) -> float:
        j = p / "journal.jsonl"
        return j.stat().st_mtime if j.exists() else 0.0

    for p in sorted((p for p in runs.iterdir() if p.is_dir() and p.name.startswith(SETUP_KIND + "-")),
                    key=mtime, reverse=True):
        if p.name == exclude:
            continue
        journal = Journal.load(state_dir, p.name)
        outcome = journal.outcome()
        if outcome and outcome[0] == "refused":
            continue
        if not any(e["step"] not in ("run", "preflight") for e in journal.events):
            continue   # nothing acted
        context = journal.context()
        return {**context, "engine": context.get("engine") or "native", "run_id": journal.run_id}
    return None


def engine_named(name: str, outputs: Outputs, *, slot: str | None = None) -> Engine:
    if name == "native":
        return NativeEngine(outputs)
    if name == "dms":
        if outputs.dms is None:
            raise ConfigError(f"engine dms needs the stack's DMS task (outputs.dms); stack {outputs.stack} has none")
        return DmsEngine(outputs, slot=slot)
    raise ConfigError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")


def for_run(ctx) -> Engine:
    """The engine of a run (replicate-aurora's own, or the one replicate-aurora recorded for failover-aurora);
    one object per run."""
    engine = getattr(ctx, "_replication_engine", None)
    if engine is None:
        rec = {} if ctx.data.get("engine") and ctx.journal.kind == SETUP_KIND else (
            recorded(ctx.settings.state_dir) or {})
        name = ctx.data.get("engine") or rec.get("engine") or "native"
        engine = engine_named(name, ctx.outputs, slot=ctx.data.get("dms_slot") or rec.get("dms_slot"))
        ctx._replication_engine = engine
    return engine


def for_status(outputs: Outputs, state_dir=None) -> Engine:
    """The engine ``invoke status`` reports on: the one replicate-aurora recorded (native when none)."""
    rec = (recorded(state_dir) if state_dir is not None else None) or {}
    name = rec.get("engine") or "native"
    if name == "dms" and outputs.dms is None:
        name = "native"
    return engine_named(name, outputs, slot=rec.get("dms_slot"))
