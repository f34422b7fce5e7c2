"""Repoint: after a promotion, the other replicas follow the new leader (shared by the failover plans).

For each other replica: a slot and the replication role on the leader, a passfile on the
replica's host, ``primary_conninfo`` pointed at the leader. Then a bounded wait
(``repoint_timeout``, sized for SSM's latency) until each streams on the leader's timeline.

A replica is never destroyed on a timer. It is rebuilt from the leader (``pg_basebackup``)
only when it *provably* cannot follow (:func:`judge`):

* it is not on the leader's timeline and has replayed (or received) WAL past the fork point,
  the switch point at which the leader's timeline began (the last line of the leader's
  timeline history file): any other timeline ends, in the leader's history, at or before it;
* or its log, since it was pointed at the leader, carries PostgreSQL's own verdict
  (:data:`LOG_PROOFS`: a timeline forked before its recovery point, a start point not in the
  leader's history, WAL the leader no longer has, ...);
* or its data directory is empty (a rebuild that died half way).

A replica that merely has not streamed yet gets the whole deadline, and is then reported
"not following yet" with its data kept. At the end, tern's physical slots (``tern_<replica>``)
that no following replica uses are dropped - a slot held for a replica that is gone fills the
leader's disk - and ``max_slot_wal_keep_size`` on the leader bounds what such a slot can hold
meanwhile. Any replica left not following (or empty) makes the step fail: it comes after the
point of no return, so the run stops with a message of what to do, and running the same
command again retries the repoint only (the app already runs on the new leader).
"""

from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..errors import DatabaseError, RunbookError, StepError
from ..pg import lsn_to_int, scram_verifier
from ..polling import polling_loop, wait_until
from ..postgres import PgHost, literal
from ..status import TIMELINE_SQL
from .context import Context

REPLICATION_ROLE = "tern_replicator"
SLOT_PREFIX = "tern_"
MIN_POLL_INTERVAL = 0.2   # each observation is a psql (over SSM: a command); no point polling faster

# PostgreSQL's own proof, in the replica's log, that it cannot follow the leader
LOG_PROOFS = (
    re.compile(r"new timeline \d+ forked off current database system timeline \d+ before current recovery "
               r"point [0-9A-F]+/[0-9A-F]+"),
    re.compile(r"new timeline \d+ is not a child of database system timeline \d+"),
    re.compile(r"requested starting point [0-9A-F]+/[0-9A-F]+ on timeline \d+ is not in this server's history"),
    re.compile(r"requested starting point [0-9A-F]+/[0-9A-F]+ is ahead of the WAL flush position"),
    re.compile(r"requested WAL segment [0-9A-F]+ has already been removed"),
)


def slot_name(replica: str) -> str:
    return SLOT_PREFIX + replica.replace("-", "_")


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def history_file(timeline: int) -> str:
    return f"{timeline:08X}.history"


def parse_history(text: str) -> list[tuple[int, int]]:
    """A timeline history file as ``[(timeline, switch point), ...]``, oldest first."""
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        entries.append((int(fields[0]), lsn_to_int(fields[1])))
    return entries


# -- deciding ---------------------------------------------------------------------------------
class Verdict(str, enum.Enum):
    FOLLOWING = "following"
    WAIT = "wait"                  # it can follow (or nothing proves it cannot): give it the deadline
    CANNOT_FOLLOW = "cannot follow"
    NOT_A_STANDBY = "not a standby"   # promoted, or never one: not tern's to destroy


@dataclass(frozen=True)
class Observation:
    """What a replica says of itself (see :data:`OBSERVE_SQL`), plus what its log said lately."""

    in_recovery: bool = True
    replay_lsn: int | None = None
    receive_lsn: int | None = None
    timeline: int = 0              # a lower bound of its replay timeline (last restartpoint, min recovery point)
    receiver_status: str | None = None
    received_tli: int | None = None
    has_leader_history: bool = False   # it fetched the leader's history file: it may have switched already
    log_proof: str | None = None


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str


def judge(obs: Observation, leader_tli: int, fork: int | None) -> Judgement:
    """Whether a replica follows the leader (on timeline ``leader_tli``, begun at LSN ``fork``),
    can still follow it, or provably cannot. Deciding only: nothing is changed."""
    if not obs.in_recovery:
        return Judgement(Verdict.NOT_A_STANDBY, "it is not a standby (promoted?): left alone")
    if obs.receiver_status == "streaming" and (obs.received_tli or 0) >= leader_tli:
        return Judgement(Verdict.FOLLOWING, f"streaming on timeline {obs.received_tli}")
    if obs.log_proof:
        return Judgement(Verdict.CANNOT_FOLLOW, f"its log says: {obs.log_proof}")
    if obs.timeline >= leader_tli:
        return Judgement(Verdict.WAIT, f"on timeline {obs.timeline}, not streaming yet")
    if obs.has_leader_history or fork is None:
        return Judgement(Verdict.WAIT, "not streaming yet")
    # pg_last_wal_receive_lsn() is only WAL received while a receiver runs on the old timeline; with
    # none running it is where a (failed) attempt would start - a segment boundary, not proof
    received = obs.receive_lsn if obs.receiver_status is not None and (obs.received_tli or 0) < leader_tli else None
    position = max(p for p in (obs.replay_lsn, received, 0) if p is not None)
    if position > fork:
        return Judgement(Verdict.CANNOT_FOLLOW,
                         f"was at {lsn_text(position)} past the fork point {lsn_text(fork)} of timeline {leader_tli}")
    return Judgement(Verdict.WAIT, f"at {lsn_text(position)}, at or before the fork point {lsn_text(fork)}")


def slots_to_drop(slots: Iterable[dict[str, Any]], following: Iterable[str]) -> list[str]:
    """tern's physical slots on the leader that no following replica uses: inactive, named
    ``tern_*`` and not the slot of a replica that follows. Other slots are not tern's to drop."""
    keep = {slot_name(n) for n in following}
    return sorted(s["slot_name"] for s in slots
                  if s["slot_name"].startswith(SLOT_PREFIX) and s.get("slot_type") == "physical"
                  and not s.get("active") and s["slot_name"] not in keep)


def log_proof(text: str) -> str | None:
    for pattern in LOG_PROOFS:
        found = pattern.search(text)
        if found:
            return found.group(0)
    return None


# -- observing ---------------------------------------------------------------------------------
OBSERVE_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       greatest((SELECT timeline_id FROM pg_control_checkpoint()),
                (SELECT min_recovery_end_timeline FROM pg_control_recovery())) AS timeline,
       (SELECT status FROM pg_stat_wal_receiver) AS receiver_status,
       (SELECT received_tli FROM pg_stat_wal_receiver) AS received_tli,
       EXISTS (SELECT 1 FROM pg_ls_waldir() WHERE name = {history}) AS has_leader_history
"""


def observe(pg: PgHost, leader_tli: int, log: "LogWatch | None" = None) -> Observation:
    row = pg.query_one(OBSERVE_SQL.format(history=literal(history_file(leader_tli))))
    return Observation(in_recovery=row["in_recovery"], replay_lsn=lsn_to_int(row["replay_lsn"]),
                       receive_lsn=lsn_to_int(row["receive_lsn"]), timeline=row["timeline"] or 0,
                       receiver_status=row["receiver_status"], received_tli=row["received_tli"],
                       has_leader_history=row["has_leader_history"], log_proof=log.proof() if log else None)


@dataclass
class LogWatch:
    """The replica's server log from a given offset on: only what it said since it was pointed at the leader."""

    pg: PgHost
    path: str
    offset: int = 0

    @classmethod
    def start(cls, pg: PgHost) -> "LogWatch":
        path = pg.log_file or pg.read_marker().get("log_file") or pg.data_dir.rstrip("/") + ".log"
        _, size = pg.host.read_file_from(path, 0, limit=0)
        return cls(pg, path, size)

    def proof(self) -> str | None:
        text, _ = self.pg.host.read_file_from(self.path, self.offset)
        return log_proof(text)


# -- acting ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Clock:
    """How repoint waits (:mod:`runbook.polling`'s clock and sleep): injectable, so tests cost nothing."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Pending:
    """A replica pointed at the leader, not streaming yet."""

    name: str
    pg: PgHost
    log: LogWatch | None = None
    deadline: float | None = None   # set when it is first watched
    rebuilt: str | None = None      # why it was rebuilt, if it was
    last: str = ""


@dataclass
class Result:
    following: bool
    text: str


class RebuildFailed(StepError):
    """The replica's data directory was removed and no copy of the leader took its place."""


def repoint(ctx: Context, *, clock: Clock = Clock()) -> dict[str, Any]:
    """The step's act: every other replica follows the leader, or the step fails saying which does not."""
    leader_name = ctx.data["candidate"]
    leader = ctx.replica(leader_name)
    lpg = ctx.pg(leader_name)
    timeout = ctx.settings.repoint_timeout
    prepare_leader(ctx, lpg)
    leader_tli = lpg.query_one(f"SELECT {TIMELINE_SQL} AS tl")["tl"]
    fork = fork_point(lpg, leader_tli)

    results: dict[str, Result] = {}
    pending: dict[str, Pending] = {}
    for name in ctx.data["others"]:
        try:
            ensure_slot(lpg, slot_name(name))
            write_passfile(ctx, ctx.pg(name), passfile(ctx, name), leader)
            pending[name] = point_at_leader(ctx, name, leader, lpg, leader_tli, fork, clock)
        except RebuildFailed as exc:
            results[name] = Result(False, str(exc))
        except RunbookError as exc:
            results[name] = Result(False, f"NOT following: {exc}")

    interval = max(ctx.settings.poll_interval, MIN_POLL_INTERVAL)
    # each replica has its own deadline (from when it is pointed, or rebuilt); this only bounds the whole
    backstop = (timeout + ctx.settings.restore_timeout) * (1 + len(pending))
    for _ in polling_loop(backstop, interval, clock=clock.now, sleep=clock.sleep):
        if not pending:
            break
        for name, p in list(pending.items()):
            if p.deadline is None:
                p.deadline = clock.now() + timeout
            try:
                j = judge(observe(p.pg, leader_tli, p.log), leader_tli, fork)
            except RunbookError as exc:
                # a replica that cannot follow may die of it (PANIC at the timeline switch) before it is
                # first observed - over SSM, seconds after it was pointed: its log still says why
                proof = down_proof(p)
                j = (Judgement(Verdict.CANNOT_FOLLOW, f"its log says: {proof} (and it does not answer: {exc})")
                     if proof else Judgement(Verdict.WAIT, f"cannot observe it: {exc}"))
            p.last = j.reason
            done = f"rebuilt: {p.rebuilt}; " if p.rebuilt else ""
            if j.verdict is Verdict.FOLLOWING:
                results[name] = Result(True, f"{done}{j.reason} from {leader_name} (slot {slot_name(name)})")
            elif j.verdict is Verdict.NOT_A_STANDBY:
                results[name] = Result(False, f"NOT following: {j.reason}")
            elif j.verdict is Verdict.CANNOT_FOLLOW and p.rebuilt:
                results[name] = Result(False, f"NOT following even after a rebuild: {j.reason}")
            elif j.verdict is Verdict.CANNOT_FOLLOW:
                try:
                    pending[name] = rebuild(ctx, name, leader, lpg, j.reason, clock)
                except RunbookError as exc:
                    results[name] = Result(False, str(exc) if isinstance(exc, RebuildFailed)
                                           else f"NOT following: {j.reason}; not rebuilt: {exc}")
                    del pending[name]
                continue
            elif clock.now() >= p.deadline:
                results[name] = Result(False, f"{done}NOT following yet after {timeout:.0f}s ({p.last}); "
                                              "not rebuilt: nothing proves it cannot follow")
            if name in results:
                del pending[name]
    for name, p in pending.items():
        results[name] = Result(False, f"NOT following yet ({p.last}); not rebuilt: nothing proves it cannot follow")

    dropped = drop_unused_slots(lpg, [n for n, r in results.items() if r.following])
    report = {n: r.text for n, r in results.items()}
    failures = {n: r.text for n, r in results.items() if not r.following}
    detail = "; ".join(f"{n}: {r}" for n, r in report.items()) or "no other replica"
    if dropped:
        detail += f"; dropped unused slots {', '.join(dropped)}"
    if failures:
        ctx.checkpoint(repoint=report, repoint_failures=failures)
        raise StepError("repoint: " + "; ".join(f"{n}: {r}" for n, r in failures.items())
                        + (f" (unused slots dropped: {', '.join(dropped)})" if dropped else "")
                        + f". The app runs on {leader_name}; the replicas above do not follow it (an EMPTY one "
                        "holds no data). Check each one's server log and its network path to the leader, then run "
                        "the same command again to retry the repoint", step="repoint")
    return {"repoint": report, "repoint_failures": {}, "detail": detail}


def down_proof(p: Pending) -> str | None:
    """What the log of a replica that does not answer says of its following (None: nothing, or unreadable)."""
    if p.log is None:
        return None
    try:
        return p.log.proof()
    except RunbookError:
        return None


def prepare_leader(ctx: Context, lpg: PgHost) -> None:
    """The replication role (only its SCRAM verifier travels: never the password) and the bound on
    what a slot may hold, on the leader."""
    from ..secrets import resolve

    password = resolve(ctx.outputs.credentials.replication_password)
    exists = lpg.query(f"SELECT 1 FROM pg_roles WHERE rolname = {literal(REPLICATION_ROLE)}")
    verb = "ALTER" if exists else "CREATE"
    lpg.psql(f"{verb} ROLE {REPLICATION_ROLE} LOGIN REPLICATION PASSWORD {literal(scram_verifier(password))};\n"
             f"ALTER SYSTEM SET max_slot_wal_keep_size = {literal(ctx.settings.max_slot_wal_keep_size)};\n"
             "SELECT pg_reload_conf();")


def fork_point(lpg: PgHost, leader_tli: int) -> int | None:
    """Where the leader's timeline began: the last switch point in its timeline history file."""
    if leader_tli <= 1:
        return None
    row = lpg.query_one(f"SELECT pg_read_file({literal('pg_wal/' + history_file(leader_tli))}) AS h")
    entries = parse_history(row["h"] or "")
    return entries[-1][1] if entries else None


def ensure_slot(lpg: PgHost, slot: str) -> None:
    rows = lpg.query(f"SELECT wal_status FROM pg_replication_slots WHERE slot_name = {literal(slot)}")
    if rows and rows[0]["wal_status"] == "lost":
        lpg.psql(f"SELECT pg_drop_replication_slot({literal(slot)})")
        rows = []
    if not rows:
        lpg.psql(f"SELECT pg_create_physical_replication_slot({literal(slot)}, true)")


def passfile(ctx: Context, name: str) -> str:
    return ctx.replica(name).data_dir.rstrip("/") + ".pgpass"


def write_passfile(ctx: Context, pg: PgHost, path: str, leader) -> None:
    """A libpq passfile on the replica's host; the host adapter decides how the secret gets there."""
    pg.host.write_file_from_secret(path, f"{leader.host}:{leader.port}:*:{REPLICATION_ROLE}:",
                                   ctx.outputs.credentials.replication_password)


def conninfo(ctx: Context, name: str, leader) -> str:
    # replicas take TCP only over TLS (restore); their certificates are self-signed: encrypted, not verified
    return (f"host={leader.host} port={leader.port} user={REPLICATION_ROLE} passfile={passfile(ctx, name)} "
            f"sslmode=require application_name={name}")


def ensure_up(ctx: Context, name: str, pg: PgHost) -> None:
    """Start the replica if it is down, and wait until it answers (a replica killed moments ago may
    still look alive while its processes die: keep trying until the deadline)."""
    def up() -> bool:
        try:
            if not pg.is_running():
                pg.start(timeout=ctx.settings.promote_timeout)
            pg.query_one("SELECT 1 AS ok")
            return True
        except RunbookError:
            return False

    wait_until(up, timeout=ctx.settings.promote_timeout, interval=1.0, what=f"{name} to accept connections")


def point_at_leader(ctx: Context, name: str, leader, lpg: PgHost, leader_tli: int, fork: int | None,
                    clock: Clock) -> Pending:
    """Judge the replica where it stands (before it is pointed anywhere): rebuild it if it provably
    cannot follow, else point it at the leader."""
    pg = ctx.pg(name)
    if not pg.has_data():
        return rebuild(ctx, name, leader, lpg, "its data directory is empty", clock)
    ensure_up(ctx, name, pg)
    j = judge(observe(pg, leader_tli), leader_tli, fork)
    if j.verdict is Verdict.NOT_A_STANDBY:
        raise StepError(j.reason)
    if j.verdict is Verdict.CANNOT_FOLLOW:
        return rebuild(ctx, name, leader, lpg, j.reason, clock)
    log = LogWatch.start(pg)
    pg.psql(f"ALTER SYSTEM SET primary_conninfo = {literal(conninfo(ctx, name, leader))};\n"
            f"ALTER SYSTEM SET primary_slot_name = {literal(slot_name(name))};\n"
            "SELECT pg_reload_conf();\n"
            "SELECT pg_wal_replay_resume();")   # detach_others paused its replay before the flush
    return Pending(name, pg, log)


def rebuild(ctx: Context, name: str, leader, lpg: PgHost, why: str, clock: Clock) -> Pending:
    """A fresh copy of the leader (``pg_basebackup`` through the replica's own slot), started as its
    standby. Only for a replica that provably cannot follow (``why``)."""
    from ..restore import HBA, _conf_lines, client_ca_path, standby_settings

    r = ctx.replica(name)
    pg = ctx.pg(name)
    slot = slot_name(name)
    ctx.say(f"{name} cannot follow {leader.name} ({why}): rebuilding it from {leader.name}")
    marker = pg.read_marker()
    pg.stop(mode="immediate", timeout=60)
    pg.host.run(["rm", "-rf", r.data_dir], timeout=600)
    try:
        ensure_slot(lpg, slot)
        wait_slot_released(lpg, slot, ctx.settings.repoint_timeout, clock)
        pg.host.run(["env", f"PGPASSFILE={passfile(ctx, name)}", "PGSSLMODE=require", f"{r.bin_dir}/pg_basebackup",
                     "-h", leader.host, "-p", str(leader.port), "-U", REPLICATION_ROLE, "-D", r.data_dir,
                     "-X", "stream", "-S", slot, "-c", "fast", "--no-password"], timeout=ctx.settings.restore_timeout)
    except RunbookError as exc:
        raise RebuildFailed(f"EMPTY: {why}; its copy of {leader.name} failed: {exc}") from None
    ca = client_ca_path(r)   # restore put tern's client certificate beside the server's (outside the data dir)
    conf = standby_settings(r, "", ca if pg.host.exists(ca) else "")
    conf.update(primary_conninfo=conninfo(ctx, name, leader), primary_slot_name=slot)
    pg.host.write_file(f"{r.data_dir}/postgresql.auto.conf", _conf_lines(conf))
    pg.host.write_file(f"{r.data_dir}/pg_hba.conf", HBA)
    pg.host.write_file(f"{r.data_dir}/standby.signal", "")
    if marker:
        pg.write_marker({**marker, "rebuilt_from": leader.name, "rebuilt_at": time.time()})
    log = LogWatch.start(pg)
    pg.start(timeout=ctx.settings.restore_timeout)
    return Pending(name, pg, log, rebuilt=why)


def wait_slot_released(lpg: PgHost, slot: str, timeout: float, clock: Clock) -> None:
    """The walsender of a replica just stopped lets go of its slot within moments; pg_basebackup needs it free."""
    wait_until(lambda: not lpg.query(f"SELECT 1 FROM pg_replication_slots WHERE slot_name = {literal(slot)} "
                                     "AND active"),
               timeout=timeout, interval=MIN_POLL_INTERVAL, what=f"slot {slot} to be released on the leader",
               clock=clock.now, sleep=clock.sleep)


def drop_unused_slots(lpg: PgHost, following: Iterable[str]) -> list[str]:
    slots = lpg.query("SELECT slot_name, slot_type, active FROM pg_replication_slots")
    dropped = []
    for slot in slots_to_drop(slots, following):
        try:
            lpg.psql(f"SELECT pg_drop_replication_slot({literal(slot)})")
            dropped.append(slot)
        except DatabaseError:
            continue   # it became active meanwhile: in use, then
    return dropped
