"""The drills' scenarios: what goes wrong, when, and what the failover must do about it.

A scenario names the hops it applies to, the *points* of the plan its fault may fire at (``before:<step>``
or ``after:<step>``, the runner's hooks), how far past the point it may fire (``max_delay``: in a thread
when ``threaded``, so the fault lands in the middle of the next step; else the hook sleeps, then fires),
the fault itself (``fire``) and how the sandbox is healed afterwards (``heal``: the node restarted, the
partition healed, the disk freed - what an operator or the platform does before running the failover
again). Every random choice goes through :meth:`runbook.drills.run.Drill.choose`, which records it.

``expect`` says which outcome of the first run is right, from where the fault actually landed (the step
that was running when it fired): ``completed``, ``fell_back`` (before the point of no return, the app back
on its old database), or ``stopped`` (after it, the run waits for an operator: the drill heals the fault and
runs the failover again, which must then complete). Faults that land in a step that does not care (before
the first point that reads what they broke) are still checked for their outcome and the ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..failover import aurora as _aurora
from ..failover import ec2 as _ec2

if TYPE_CHECKING:
    from .run import Drill

COMPLETED, FELL_BACK, STOPPED = "completed", "fell_back", "stopped"

# the plans as the drills' sandbox runs them (the url switch: it has no pooler)
HOP1_STEPS = tuple(_ec2.STEP_NAMES)
HOP2_STEPS = tuple(_aurora.STEP_NAMES)
STEPS = {1: HOP1_STEPS, 2: HOP2_STEPS}
POINT_OF_NO_RETURN = {1: "promote", 2: "switch_over"}


def phase(hop: int, step: str | None) -> str:
    """``before``, ``at`` or ``after`` the point of no return for a step (``after`` when the run had ended:
    a fault that fired after the run changes nothing in it)."""
    steps = STEPS[hop]
    if step is None or step not in steps:
        return "after"
    i, p = steps.index(step), steps.index(POINT_OF_NO_RETURN[hop])
    return "before" if i < p else "at" if i == p else "after"


@dataclass(frozen=True)
class Scenario:
    name: str
    hops: tuple[int, ...]
    description: str
    expected: str                                   # one line for --list
    points: Mapping[int, tuple[str, ...]]
    fire: Callable[["Drill", Any], None]
    expect: Callable[["Drill"], set[str]]
    max_delay: float = 0.0
    threaded: bool = False
    setup: Callable[["Drill"], None] | None = None
    heal: Callable[["Drill"], None] | None = None
    kills_runbook: bool = False                     # the CLI run is SIGKILLed instead of a hook firing
    journal_may_lag: bool = False                   # the journal cannot record the outcome (its disk is full)

    def listing(self) -> dict[str, Any]:
        return {"name": self.name, "hops": list(self.hops), "description": self.description,
                "expected": self.expected,
                "points": {str(h): list(p) for h, p in self.points.items()}, "max_delay": self.max_delay}


# -- helpers ------------------------------------------------------------------------------------
def candidate(d: "Drill", ctx: Any) -> str:
    """The node the failover moves the app to: hop 1's candidate (as the run chose it), hop 2's Aurora."""
    return ctx.data["candidate"] if d.hop == 1 else "aurora"


def other(d: "Drill", ctx: Any) -> str | None:
    """Another replica: hop 1's first other replica, hop 2's EC2 standby of the leader."""
    if d.hop == 1:
        others = [n for n in (ctx.data.get("others") or []) if n != ctx.data["candidate"]]
        return others[0] if others else None
    return ctx.data.get("standby")


def source(d: "Drill", ctx: Any) -> str:
    """The database the app leaves: hop 1's source (Heroku), hop 2's EC2 leader."""
    return "source" if d.hop == 1 else ctx.data["leader"]


def kill(d: "Drill", name: str, ctx: Any = None) -> None:
    """``name`` crashes. Which way is a random choice: ``postgres`` (its postmaster SIGKILLed, the host up:
    tern may start it again) or ``host`` (the instance down: the postmaster killed and every command tern
    sends the host fails until the run ends - tern can only wait, fall back or stop)."""
    how = d.choose("crash", d.rng.choice(["postgres", "host"]) if ctx is not None and name != "aurora"
                   else "postgres")
    d.crashed.append(name)
    d.box.node(name).kill()
    if how == "host":
        from .faults import UnreachableHost

        pg = ctx.pg(name)
        pg.host = UnreachableHost(pg.host)
        d.note(f"{name}'s instance crashed (postgres killed, the host unreachable)")
    else:
        d.note(f"{name}'s PostgreSQL crashed (SIGKILL of its postmaster; the host answers)")


def restart_crashed(d: "Drill") -> None:
    """The crashed nodes back (the instance rebooted, or the operator started PostgreSQL again); a node
    that tern started again itself is left alone."""
    from .faults import wait_gone

    for name in d.crashed:
        pg = d.box.node(name)
        if d.params.get("crash") == "postgres" and pg.is_running():
            try:
                pg.query_one("SELECT 1 AS ok")
                continue            # tern brought it back
            except Exception:  # noqa: BLE001 - still the dead one: wait for it to go
                pass
        wait_gone(pg)
        pg.start(timeout=60)
        d.note(f"{name} restarted")


# -- the faults ---------------------------------------------------------------------------------
def candidate_crash(d: "Drill", ctx: Any) -> None:
    kill(d, candidate(d, ctx), ctx)


def expect_candidate_crash_catchup(d: "Drill") -> set[str]:
    if d.landed is None:
        return {COMPLETED}
    p = phase(d.hop, d.landed)
    if p == "before":
        # hop 1: the catch-up (flush) takes the other replica; a crash in the gate after it falls back.
        # hop 2: there is no other Aurora - the run falls back to the EC2 leader
        if d.hop == 1 and d.landed in ("fence", "detach_others", "flush"):
            # the app moves to the other replica; the repoint then needs the crashed one: it starts a crashed
            # PostgreSQL again, but an instance that does not answer leaves it not following (stopped). A crash
            # late in the flush, once the candidate has replayed the final LSN, is the gate's to see: fall back
            moved = {COMPLETED} if d.params.get("crash") == "postgres" else {STOPPED}
            return moved | {FELL_BACK} if d.landed == "flush" else moved
        return {FELL_BACK}
    return {FELL_BACK, STOPPED} if p == "at" else {STOPPED}


def expect_stopped_after(d: "Drill") -> set[str]:
    """A fault after the point of no return: the run stops for the operator (the drill heals and resumes)."""
    if d.landed is None:
        return {COMPLETED}
    p = phase(d.hop, d.landed)
    return {FELL_BACK} if p == "before" else {FELL_BACK, STOPPED} if p == "at" else {STOPPED}


def other_crash(d: "Drill", ctx: Any) -> None:
    name = other(d, ctx)
    if name is None:
        d.note("no other replica to crash")
        return
    kill(d, name, ctx)


def expect_other_crash(d: "Drill") -> set[str]:
    if d.landed is None:
        return {COMPLETED}
    if d.hop == 1:
        # the full verification holds it as its witness: crashed there, the step fails (stopped). Else the
        # repoint needs it: it starts a crashed PostgreSQL again; a host that does not answer leaves the
        # replica not following, which stops the run (nothing before the repoint needs that replica)
        if d.landed == "verify_full" and d.box.settings.full_verification != "skip":
            return {STOPPED}
        return {COMPLETED} if d.params.get("crash") == "postgres" else {STOPPED}
    # hop 2: the full verification holds the standby (before the freeze); after it (or without it) nothing
    # needs it
    if d.box.settings.full_verification == "skip":
        return {COMPLETED}
    i = HOP2_STEPS.index(d.landed) if d.landed in HOP2_STEPS else len(HOP2_STEPS)
    return {FELL_BACK} if i <= HOP2_STEPS.index("verify_full") else {COMPLETED}


def surge(d: "Drill", ctx: Any) -> None:
    seconds = d.choose("surge_seconds", round(d.rng.uniform(2.0, 5.0), 2))
    d.box.sb.app().set_load(burst_factor=5, burst_seconds=seconds)
    d.note(f"the app writes 5x for {seconds:g} s")
    time.sleep(d.choose("surge_lead", round(d.rng.uniform(0.5, 1.5), 2)))   # it surges before the next step


def slow_archive(d: "Drill", ctx: Any) -> None:
    """The source's archive uploads slowly: every segment reaches the archive ``late`` seconds late."""
    late = d.choose("archive_late_seconds", round(d.rng.uniform(1.0, 5.0), 2))
    pg = d.box.node(source(d, ctx))
    current = pg.query_one("SELECT current_setting('archive_command') AS c")["c"]
    d.saved["archive_command"] = current
    from ..postgres import literal

    pg.psql(f"ALTER SYSTEM SET archive_command = {literal(f'sleep {late:g}; ' + current)};\nSELECT pg_reload_conf();")
    d.note(f"the source's archive_command sleeps {late:g} s before each segment")


def heal_slow_archive(d: "Drill") -> None:
    if "archive_command" not in d.saved:
        return
    pg = d.box.node("source")
    pg.psql("ALTER SYSTEM RESET archive_command;\nSELECT pg_reload_conf();")


def archive_cut(d: "Drill", ctx: Any) -> None:
    """Hop 1: the replicas' only route to the source's WAL is the archive (Heroku streams to nobody):
    they cannot reach it for a while (EC2 <-> S3), the source keeps archiving."""
    seconds = d.choose("partition_seconds", round(d.rng.uniform(2.0, 8.0), 2))
    d.box.archive_reachable(False)
    d.note(f"the replicas cannot reach the WAL archive for {seconds:g} s")
    d.later(seconds, lambda: (d.box.archive_reachable(True), d.note("the archive is reachable again")))


def heal_archive(d: "Drill") -> None:
    d.box.archive_reachable(True)


def proxy_partition(d: "Drill", ctx: Any) -> None:
    """The proxy the setup put on the link drops (packets lost, held) or cuts (reset) for a while."""
    how = d.choose("partition", d.rng.choice(["drop", "cut"]))
    seconds = d.choose("partition_seconds", round(d.rng.uniform(1.0, 4.0), 2))
    proxy = d.proxy
    (proxy.drop if how == "drop" else proxy.cut)()
    d.note(f"{proxy.name}: {how} for {seconds:g} s")
    d.later(seconds, lambda: (proxy.heal(), d.note(f"{proxy.name}: healed")))


def heal_proxy(d: "Drill") -> None:
    if d.proxy is not None:
        d.proxy.heal()


def setup_tern_source_proxy(d: "Drill") -> None:
    """tern reaches the source through the proxy (``TERN_SOURCE_DATABASE_URL``, which tern reads before
    the app's own URL); the app keeps its direct route - a partition between tern and the source only."""
    from ..pg import url_endpoint, with_endpoint
    from .proxy import Proxy

    app = d.box.sb.app()
    url = app.config_var("DATABASE_URL")
    host, port, _ = url_endpoint(url)
    d.proxy = d.own(Proxy(host, port, name="tern<->source").start())
    app.set_config_vars({"TERN_SOURCE_DATABASE_URL": with_endpoint(url, *d.proxy.address)})
    d.note(f"tern reaches the source through a proxy on port {d.proxy.port}")


def setup_subscription_proxy(d: "Drill") -> None:
    """Hop 2: Aurora's subscription reaches the EC2 leader through the proxy (its connection string
    rewritten by Aurora's superuser, as the stand-in's privileged path would)."""
    from ..replication import native
    from .proxy import Proxy

    aurora = d.box.node("aurora")
    db = d.box.outputs.aurora.database
    row = aurora.query_one(f"SELECT subconninfo AS c FROM pg_subscription WHERE subname = '{native.SUBSCRIPTION}'",
                           database=db)
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    info = conninfo_to_dict(row["c"])
    d.proxy = d.own(Proxy(info.get("host", "127.0.0.1"), int(info["port"]), name="aurora<->leader").start())
    from ..postgres import literal

    conninfo = make_conninfo(row["c"], host="127.0.0.1", port=str(d.proxy.port))
    aurora.psql(f"ALTER SUBSCRIPTION {native.SUBSCRIPTION} CONNECTION {literal(conninfo)}", database=db)
    deadline = time.monotonic() + 30      # its apply worker restarts, then streams through the proxy
    while not (d.proxy.stats.forwarded and aurora.query(
            "SELECT 1 FROM pg_stat_subscription WHERE pid IS NOT NULL AND latest_end_lsn IS NOT NULL", database=db)):
        if time.monotonic() > deadline:
            raise TimeoutError("Aurora's subscription does not stream through the drill's proxy")
        time.sleep(0.2)
    d.note(f"Aurora's subscription reaches the leader through a proxy on port {d.proxy.port}")


def expect_partition(d: "Drill") -> set[str]:
    """A partition that heals: before the point of no return the run may wait it out or fall back; at
    or after it, it completes (resumed by the drill if it stopped). Never lost, never left half-way."""
    if d.landed is None:
        return {COMPLETED}
    p = phase(d.hop, d.landed)
    return {COMPLETED, FELL_BACK} if p == "before" else {COMPLETED, FELL_BACK, STOPPED} if p == "at" \
        else {COMPLETED, STOPPED}


def expect_completed(d: "Drill") -> set[str]:
    return {COMPLETED}


def source_outage(d: "Drill", ctx: Any) -> None:
    name = d.saved["outage_node"] = source(d, ctx)
    seconds = d.choose("outage_seconds", round(d.rng.uniform(2.0, 5.0), 2))
    pg = d.box.node(name)
    pg.stop(mode="immediate", timeout=30)
    d.note(f"{name} down (immediate stop) for {seconds:g} s")
    d.later(seconds, lambda: (pg.start(timeout=60), d.note(f"{name} back")))


def heal_source(d: "Drill") -> None:
    name = d.saved.get("outage_node")
    if name:
        d.box.node(name).start(timeout=60)


def expect_fell_back(d: "Drill") -> set[str]:
    if d.landed is None:
        return {COMPLETED}
    p = phase(d.hop, d.landed)
    return {FELL_BACK} if p == "before" else {FELL_BACK, STOPPED} if p == "at" else {COMPLETED, STOPPED}


def aurora_restart(d: "Drill", ctx: Any) -> None:
    seconds = d.choose("restart_seconds", round(d.rng.uniform(1.0, 4.0), 2))
    pg = d.box.node("aurora")
    pg.stop(mode="immediate", timeout=30)
    d.note(f"Aurora crashed; the service brings it back after {seconds:g} s")
    d.later(seconds, lambda: (pg.start(timeout=60), d.note("Aurora back")))


def expect_aurora_restart(d: "Drill") -> set[str]:
    """Waited through in the catch-up (the deadline covers a restart); a step that reads Aurora while it is
    down (the sequences, the gate) falls back."""
    if d.landed is None or d.landed in ("fence", "catch_up"):
        return {COMPLETED}
    return expect_fell_back(d)


def heal_aurora(d: "Drill") -> None:
    d.box.node("aurora").start(timeout=60)


def slot_lost(d: "Drill", ctx: Any) -> None:
    """The leader's logical slot for Aurora is dropped (max_slot_wal_keep_size exceeded, an operator)."""
    import psycopg

    pg = d.box.node(ctx.data["leader"])
    url = f"postgresql://{pg._user()}@/app?host={pg.socket_dir}&port={pg.port}"
    with psycopg.connect(url, autocommit=True) as conn:
        slot = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical' "
                            "AND slot_name NOT LIKE 'tern_rollback%' ORDER BY 1 LIMIT 1").fetchone()
        if slot is None:
            d.note("no logical slot on the leader")
            return
        deadline = time.monotonic() + 20
        while True:   # its walsender holds it: end it, then drop before the apply worker reconnects
            conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot[0],))
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot[0],))
                break
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    d.note(f"the leader's slot {slot[0]} dropped")


def expect_slot_lost(d: "Drill") -> set[str]:
    if d.landed is None:
        return {COMPLETED}
    return expect_fell_back(d)


def start_rogue(d: "Drill", ctx: Any) -> None:
    from .faults import RogueClient

    mode = d.choose("rogue_mode", d.rng.choice(["set_off", "begin_rw"]))
    backoff = d.choose("rogue_backoff", d.rng.choice([0.0, round(d.rng.uniform(0.2, 3.0), 2)]))
    url = d.saved["rogue_url"]
    rogue = RogueClient(url, d.box.sb.app_dir, mode=mode, backoff=backoff)
    d.rogue = rogue
    rogue.start()
    d.note(f"a rogue client ({mode}, reconnecting after {backoff:g} s) writes to the old database")
    time.sleep(0.3)


def setup_rogue(d: "Drill") -> None:
    from ..replication.leader import leader_url

    d.saved["rogue_url"] = leader_url(d.box.sb.app(), d.box.outputs)    # the database the app leaves


def journal_full(d: "Drill", ctx: Any) -> None:
    slack = d.choose("journal_block", d.rng.choice(["padded", "kept"]))
    d.disk.fill(ctx.journal.path, pad=slack == "padded")
    d.note(f"the journal's disk is full ({d.disk.how}; the journal's last block {slack})")


def setup_disk(d: "Drill") -> None:
    from .faults import FullDisk

    d.disk = FullDisk(d.box.state_root)
    d.note(f"disk: {d.disk.mount()}")


def heal_disk(d: "Drill") -> None:
    d.disk.free()
    d.note("the journal's disk has room again")


def expect_disk_full(d: "Drill") -> set[str]:
    """From where the journal first failed (``d.bit``, read from what the journal holds), not from when the
    disk filled: a failed write before the point of no return falls back; one inside the point-of-no-return
    step before anything irreversible (its first write: the seal's, a reversible fence) falls back too;
    after that, or after the step, the run stops for the operator."""
    if d.bit is None:
        return {COMPLETED, FELL_BACK} if d.landed is not None else {COMPLETED}
    step, event = d.bit
    p = phase(d.hop, step)
    if p == "before" or (p == "at" and event in ("none", "start")):
        return {FELL_BACK}
    return {STOPPED}


def kill_runbook(d: "Drill", ctx: Any) -> None:   # the runner kills the CLI itself (kills_runbook)
    raise NotImplementedError


# -- the registry -------------------------------------------------------------------------------
SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "candidate-crash-catchup", (1, 2),
        "the candidate crashes during the catch-up - its PostgreSQL, or its whole instance (hop 1: an EC2 replica; "
        "hop 2: Aurora, PostgreSQL only)",
        "hop 1: completed on the other replica (stopped at the repoint while the crashed instance does not "
        "answer, then completed); hop 2: fell back to the EC2 leader",
        {1: ("after:fence", "after:detach_others"), 2: ("after:fence", "before:catch_up")},
        candidate_crash, expect_candidate_crash_catchup, max_delay=0.25, threaded=True, heal=restart_crashed),
    Scenario(
        "candidate-crash-after-promotion", (1, 2),
        "the new leader crashes right after the point of no return (its PostgreSQL, or its whole instance)",
        "stopped for the operator; after the host is back, the same command completes",
        {1: ("after:promote", "after:switch", "after:start_app"), 2: ("after:switch_over", "after:switch")},
        candidate_crash, expect_stopped_after, max_delay=0.3, threaded=True, heal=restart_crashed),
    Scenario(
        "other-replica-crash", (1, 2),
        "another replica crashes - its PostgreSQL, or its whole instance (hop 1: the one not promoted; hop 2: "
        "the EC2 standby of the leader)",
        "hop 1: completed (the repoint starts a crashed PostgreSQL again), or stopped at the repoint while the "
        "instance does not answer, then completed once it is back; hop 2: fell back if the full verification "
        "needed it, else completed",
        {1: ("after:preflight", "after:snapshot", "after:fence", "after:flush", "after:promote", "after:smoke_test"),
         2: ("after:preflight", "after:snapshot", "after:verify_full", "after:fence")},
        other_crash, expect_other_crash, max_delay=0.5, threaded=True, heal=restart_crashed),
    Scenario(
        "runbook-killed", (1, 2),
        "the runbook's process (the operator's laptop) is SIGKILLed at a random moment, then run again",
        "the second run resumes and completes",
        {1: ("start:<any step>",), 2: ("start:<any step>",)}, kill_runbook, expect_completed, max_delay=0.5,
        kills_runbook=True),
    Scenario(
        "partition-replica-source", (1, 2),
        "the network between the replicas and their source breaks, then heals (hop 1: the WAL archive, "
        "their only route to Heroku's WAL; hop 2: Aurora's subscription to the EC2 leader, through a proxy)",
        "completed after waiting it out, or fell back before the point of no return",
        {1: ("after:preflight", "after:fence", "after:detach_others", "after:promote"),
         2: ("after:preflight", "after:fence", "before:catch_up")},
        lambda d, ctx: (archive_cut if d.hop == 1 else proxy_partition)(d, ctx), expect_partition,
        max_delay=0.3, threaded=True,
        setup=lambda d: setup_subscription_proxy(d) if d.hop == 2 else None,
        heal=lambda d: heal_archive(d) if d.hop == 1 else heal_proxy(d)),
    Scenario(
        "partition-tern-source", (1,),
        "the network between tern and the source drops or resets, then heals (a proxy on tern's route only)",
        "completed after waiting it out, or fell back before the point of no return",
        {1: ("after:preflight", "after:sample", "after:maintenance_on", "after:fence", "after:flush", "after:verify",
             "after:promote", "after:smoke_test")},
        proxy_partition, expect_partition, max_delay=0.3, threaded=True, setup=setup_tern_source_proxy,
        heal=heal_proxy),
    Scenario(
        "traffic-surge", (1, 2),
        "the app writes 5x its rate for a few seconds just before the freeze",
        "completed",
        {1: ("before:stop_workers", "before:sample", "before:maintenance_on"),
         2: ("before:stop_workers", "before:sample", "before:maintenance_on")},
        surge, expect_completed),
    Scenario(
        "slow-archive", (1,),
        "the source's WAL archive is slow: every segment arrives seconds late",
        "completed (the catch-up waits longer)",
        {1: ("after:preflight", "after:stop_workers", "after:maintenance_on", "after:fence")},
        slow_archive, expect_completed, heal=heal_slow_archive),
    Scenario(
        "source-unreachable-fence", (1, 2),
        "the source (hop 2: the EC2 leader) goes down at the fence and comes back seconds later",
        "fell back to the source once it is back",
        {1: ("before:fence", "after:fence"), 2: ("before:fence", "after:fence")},
        source_outage, expect_fell_back, max_delay=0.15, threaded=True, heal=heal_source),
    Scenario(
        "aurora-restart-catchup", (2,),
        "Aurora restarts during the catch-up (a crash the service recovers from in seconds)",
        "completed (the catch-up waits through it)",
        {2: ("after:fence", "before:catch_up")},
        aurora_restart, expect_aurora_restart, max_delay=0.2, threaded=True, heal=heal_aurora),
    Scenario(
        "slot-lost", (2,),
        "the EC2 leader's logical slot for Aurora is lost before the catch-up completes",
        "fell back at once, saying to run replicate-aurora again",
        {2: ("after:maintenance_on", "after:fence", "before:catch_up")},
        slot_lost, expect_slot_lost, max_delay=0.1, threaded=True),
    Scenario(
        "rogue-client", (1, 2),
        "a client of the app's role that turns default_transaction_read_only off (or opens BEGIN READ WRITE) "
        "and keeps reconnecting",
        "completed; nothing it wrote after the fence is accepted, nothing acknowledged is lost",
        {1: ("before:preflight", "after:stop_workers", "after:maintenance_on", "before:fence"),
         2: ("before:preflight", "after:stop_workers", "after:maintenance_on", "before:fence")},
        start_rogue, expect_completed, setup=setup_rogue),
    Scenario(
        "journal-disk-full", (1, 2),
        "the journal's disk fills up at a random moment",
        "fell back before the point of no return (saying the journal could not be written); stopped after it, "
        "and completes once there is room",
        {1: ("after:snapshot", "after:stop_workers", "after:maintenance_on", "after:fence", "after:flush",
             "after:verify", "after:promote", "after:switch", "after:smoke_test"),
         2: ("after:snapshot", "after:verify_full", "after:maintenance_on", "after:fence", "after:catch_up",
             "after:verify", "after:switch_over", "after:switch")},
        journal_full, expect_disk_full, setup=setup_disk, heal=heal_disk, journal_may_lag=True),
)

BY_NAME = {s.name: s for s in SCENARIOS}


def names() -> list[str]:
    return [s.name for s in SCENARIOS]
