"""Run a drill: a real failover on a fresh sandbox, its fault fired at a seeded random moment, then the
checks an after-action review starts from.

One run (:func:`run_one`):

1. a fresh sandbox of the hop (:class:`~.lab.Lab`), the app writing; the scenario's ``setup``;
2. the moment: a point of the plan and a delay past it, drawn from ``random.Random(seed)`` - as is every
   other random choice of the scenario (how long, which way): each is printed and kept in the result, and
   the same seed replays the same choices (``invoke drill --scenario NAME --seed S``);
3. the failover, in this process with the runner's hooks (or, for ``runbook-killed``, the operator's CLI
   in a subprocess, SIGKILLed); the step that was running when the fault fired is where it *landed*;
4. the fault healed (``heal``); a run that stopped for the operator (or was killed) is run again, as an
   operator would, and must then complete;
5. the checks, with the app stopped, against the database the app ends on:

   * **lost**: acknowledged writes (the app's ledger, the rogue client's too) missing there;
   * **duplicates**: an app key on more than one row, and audit events (a table without a key, where a
     logical copy applied twice would not be refused) repeated;
   * **post-fence writes**: writes the old database accepted after the fence - transactions that *began*
     after the fence was proved and were acknowledged by the old database (before a fallback lifted the
     fence), and, once the app has moved, app rows on the old database that the new one does not have
     (read as its superuser: the old database admits nobody else);
   * **outcome**: completed / fell back / stopped, from the run's journal, and it must agree with where
     the app is (its database URL, maintenance mode); it must be one the scenario expects for where the
     fault landed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import psycopg

from ..errors import RunbookError, StepError
from ..journal import Journal
from ..pg import url_endpoint
from ..redact import redact
from ..settings import PROJECT_DIR
from ..workload import ledger as ledger_mod
from .lab import Box, Lab
from .scenarios import BY_NAME, COMPLETED, FELL_BACK, STEPS, STOPPED, Scenario

KINDS = {1: "failover-ec2", 2: "failover-aurora"}
WARMUP_SECONDS = 1.0          # the app writes on the old database before the failover starts
BACK_IN_SERVICE_SECONDS = 20  # after a fallback, the app must write on the old database again within this


class Drill:
    """One run's state: its random choices, what happened when, and what it must clean up."""

    def __init__(self, scenario: Scenario, hop: int, seed: int, say: Callable[[str], None]) -> None:
        self.scenario, self.hop, self.seed = scenario, hop, seed
        self.rng = random.Random(f"{scenario.name}/hop{hop}/{seed}")   # one stream per scenario, hop and seed
        self.say = say
        self.box: Box | None = None
        self.params: dict[str, Any] = {}
        self.events: list[str] = []
        self.saved: dict[str, Any] = {}
        self.crashed: list[str] = []
        self.proxy = None
        self.rogue = None
        self.disk = None
        self.ctx: Any = None
        self.landed: str | None = None
        self.bit: tuple[str, str] | None = None   # disk full: the step (and its last event) the journal failed in
        self.fired = False
        self.finished = threading.Event()   # the failover's first run has returned
        self.errors: list[str] = []
        self._timers: list[threading.Thread] = []
        self._owned: list[Any] = []
        self.t0 = time.monotonic()

    def choose(self, key: str, value: Any) -> Any:
        """Record (and print) one random choice; returns it."""
        self.params[key] = value
        self.say(f"  {key} = {value}")
        return value

    def note(self, message: str) -> None:
        self.events.append(f"+{time.monotonic() - self.t0:.2f}s {message}")
        self.say(f"  +{time.monotonic() - self.t0:.2f}s {message}")

    def later(self, seconds: float, fn: Callable[[], Any]) -> None:
        """``fn`` in a thread ``seconds`` from now (a fault's end: the node back, the partition healed)."""
        def run() -> None:
            time.sleep(seconds)
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - kept: a heal that failed is the drill's problem
                self.errors.append(f"a delayed action failed: {redact(exc)}")

        t = threading.Thread(target=run, daemon=True, name="tern-drill-later")
        t.start()
        self._timers.append(t)

    def own(self, thing: Any) -> Any:
        """Close ``thing`` when the run ends."""
        self._owned.append(thing)
        return thing

    def join_timers(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._timers:
            t.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.join_timers()
        if self.rogue is not None:
            self.rogue.stop()
        for thing in self._owned:
            try:
                thing.close()
            except Exception:  # noqa: BLE001
                pass
        if self.disk is not None:
            self.disk.unmount()


class FenceWatch(threading.Thread):
    """Watches the old database's connection limit (as its superuser, over its socket) while the failover
    runs: when a fallback lifted the fence without the journal saying so (its disk full), the last moment
    the fence was seen in place bounds the window in which nothing may have been written there."""

    def __init__(self, box: Box, node: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="tern-drill-fence-watch")
        self.pg = box.sb.node(node)
        self.interval = interval
        self.original: int | None = None
        self.last_fenced_at: float | None = None
        self.lifted_after_fence = False
        self.halt = threading.Event()

    def run(self) -> None:
        url = f"postgresql://{self.pg._user()}@/postgres?host={self.pg.socket_dir}&port={self.pg.port}"
        conn = None
        while not self.halt.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(url, autocommit=True, connect_timeout=2,
                                           application_name="tern-drill:fence-watch")
                limit = conn.execute("SELECT datconnlimit FROM pg_database WHERE datname = 'app'").fetchone()[0]
                now = time.time()
                if self.original is None:
                    self.original = limit
                elif limit != self.original:
                    self.last_fenced_at = now
                elif self.last_fenced_at is not None:
                    self.lifted_after_fence = True
            except psycopg.Error:
                conn = None
            self.halt.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


# -- the moment -------------------------------------------------------------------------------
def trigger(d: Drill, delay: float) -> Callable[[Any], None]:
    """The hook that fires the scenario's fault at the drawn moment."""
    def fire(ctx: Any) -> None:
        if d.finished.is_set() or d.fired:
            return
        d.landed = getattr(getattr(ctx, "runner", None), "current", None)
        if d.landed is None:     # the plan has finished (its report is being written): nothing to break
            d.note("the run ended before the fault's moment: not injected")
            return
        d.fired = True
        d.note(f"fault fires during {d.landed}")
        try:
            d.scenario.fire(d, ctx)
        except Exception as exc:  # noqa: BLE001 - a fault that could not be injected fails the drill
            d.errors.append(f"the fault could not be injected: {type(exc).__name__}: {redact(exc)}")

    def hook(ctx: Any) -> None:
        d.ctx = ctx
        if not d.scenario.threaded:
            if delay > 0:
                time.sleep(delay)
            fire(ctx)
            return

        def later() -> None:
            time.sleep(delay)
            if not d.finished.is_set():
                fire(ctx)

        t = threading.Thread(target=later, daemon=True, name="tern-drill-fault")
        t.start()
        d._timers.append(t)

    return hook


# -- running the failover -------------------------------------------------------------------
def failover(box: Box, hooks: dict[str, Callable[[Any], None]] | None = None) -> tuple[dict | None, str]:
    """Run (or resume) the hop's failover in this process: (its report or None, what it raised)."""
    from ..failover.run import failover_aurora, failover_ec2

    fn = failover_ec2 if box.hop == 1 else failover_aurora
    try:
        return fn(box.outputs, box.settings, confirm=lambda q: True, hooks=hooks or {}), ""
    except StepError as exc:
        return exc.context.get("report"), f"{type(exc).__name__}: {redact(exc)}"
    except (RunbookError, OSError) as exc:
        return None, f"{type(exc).__name__}: {redact(exc)}"


def failover_killed(d: Drill, box: Box) -> str:
    """The operator's CLI, SIGKILLed (its whole process group) at the drawn moment - ``delay`` seconds after
    the journal shows the drawn step started (whatever the machine's speed) - then what it printed."""
    step = d.choose("point", "start:" + d.rng.choice(STEPS[d.hop]))[len("start:"):]
    delay = d.choose("delay_seconds", round(d.rng.uniform(0.0, d.scenario.max_delay), 3))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_TERN_")}
    env.update(box.cli_env())
    log = box.root / f"cli-{d.seed}.log"
    kind = KINDS[d.hop]
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("invoke")), kind, "--yes"],
                                cwd=PROJECT_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            journal = Journal.current(box.settings.state_dir, kind)
            if journal is not None and journal.started(step):
                time.sleep(delay)
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            d.note(f"the runbook ended (exit {proc.returncode}) before the kill")
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            d.fired = True
            journal = Journal.current(box.settings.state_dir, kind)
            if journal is None and Journal.latest(box.settings.state_dir, kind):
                journal = Journal.load(box.settings.state_dir, Journal.latest(box.settings.state_dir, kind))
            started = [e["step"] for e in (journal.events if journal else []) if e["event"] == "start"]
            if journal is not None and journal.outcome():
                d.landed = None
                d.note(f"the runbook SIGKILLed after its plan had ended ({journal.outcome()[0]}), before it exited")
            else:
                d.landed = started[-1] if started else "preflight"
                d.note(f"the runbook SIGKILLed during {d.landed}")
    return log.read_text(errors="replace")[-2000:]


# -- outcome --------------------------------------------------------------------------------
def journal_outcome(box: Box, report: dict | None) -> str:
    if report and report.get("outcome"):
        return report["outcome"]
    run_id = Journal.latest(box.settings.state_dir, KINDS[box.hop])
    if run_id is None:
        return "none"
    from .. import report as report_mod

    try:
        return report_mod.build(Journal.load(box.settings.state_dir, run_id), box.outputs)["outcome"]
    except Exception:  # noqa: BLE001
        return "unknown"


def as_outcome(journal: str) -> str:
    return {"completed": COMPLETED, "fell_back": FELL_BACK, "failed": STOPPED, "in_progress": STOPPED}.get(journal,
                                                                                                        journal)


def app_side(box: Box, old: tuple[str, int]) -> str:
    """Where the app is: ``new`` (its URL names the hop's target, out of maintenance), ``old`` (back on the
    old database, out of maintenance, every process running) or ``between``."""
    app = box.sb.app()
    url = app.config_var("DATABASE_URL") or ""
    at = url_endpoint(url)[:2] if url else ("", 0)
    o = box.outputs
    targets = {(r.host, r.port) for r in o.replicas} if box.hop == 1 else {(o.aurora.writer_endpoint, o.aurora.port)}
    if app.maintenance():
        return "between"
    if at in targets and at != old:
        return "new"
    if at == old and all(app.running().get(t, 0) >= n for t, n in app.formation().items()):
        return "old"
    return "between"


def old_database(box: Box) -> tuple[str, tuple[str, int]]:
    """The node the app leaves and its endpoint, read before the run."""
    url = box.sb.app().config_var("DATABASE_URL")
    host, port, _ = url_endpoint(url)
    state = box.sb.state()
    name = next((n for n, info in state["nodes"].items() if int(info["port"]) == port), "source")
    return name, (host, port)


# -- checks -----------------------------------------------------------------------------------
def fence_window(box: Box, end: float) -> tuple[float | None, float | None]:
    """When the fence held on the old database: from its proof (or its start) to its revert (or ``end``
    when it was reverted unrecorded, or never)."""
    run_id = Journal.latest(box.settings.state_dir, KINDS[box.hop])
    if run_id is None:
        return None, None
    events = Journal.load(box.settings.state_dir, run_id).events
    done = [e["ts"] for e in events if e["step"] == "fence" and e["event"] == "done"]
    start = [e["ts"] for e in events if e["step"] == "fence" and e["event"] == "start"]
    reverted = [e["ts"] for e in events if e["step"] == "fence" and e["event"] == "reverted"]
    begin = done[0] if done else start[0] if start else None
    return begin, (reverted[-1] if reverted else None)


def post_fence_acks(entries: list, old: tuple[str, int], since: float | None, until: float | None) -> list[str]:
    """Writes acknowledged by the old database whose transaction began after the fence held."""
    if since is None:
        return []
    endpoint = f"{old[0]}:{old[1]}"
    began = {(e.table, e.key): e.began for e in entries if e.ev == "intent" and e.began is not None}
    out = []
    for e in entries:
        if e.ev != "ack" or e.endpoint != endpoint:
            continue
        b = began.get((e.table, e.key))
        if b is not None and b > since and (until is None or b < until):
            out.append(e.key)
    return out


def app_keys_sql() -> str:
    return " UNION ALL ".join(f"SELECT {col}::text AS k FROM {table} WHERE {where}"
                              for table, (col, where) in ledger_mod.KEYED_TABLES.items())


def left_on_old(box: Box, old_name: str, new_url: str) -> list[str]:
    """App rows on the old database (read as its superuser) that the database the app moved to lacks."""
    on_old = {r["k"] for r in box.sb.node(old_name).query(app_keys_sql(), database="app", timeout=60)}
    with psycopg.connect(new_url, autocommit=True, connect_timeout=10, application_name="tern-drill:check") as conn:
        on_new = {r[0] for r in conn.execute(app_keys_sql()).fetchall()}
    return sorted(on_old - on_new)


DUPLICATES_SQL = " + ".join(
    [f"(SELECT count(*) FROM (SELECT {col} FROM {table} WHERE {where} GROUP BY 1 HAVING count(*) > 1) d)"
     for table, (col, where) in ledger_mod.KEYED_TABLES.items()]
    + ["(SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM audit_events WHERE payload ? 'ref' "
       "GROUP BY actor, payload->>'ref' HAVING count(*) > 1) d)"])
# each app order's lines and stock movements come from one transaction: as many of one as of the other
TORN_SQL = ("SELECT count(*) FROM orders o WHERE o.channel = 'web' AND (SELECT count(*) FROM order_lines l "
            "WHERE l.order_id = o.id) <> (SELECT count(*) FROM stock_movements m WHERE m.order_id = o.id)")


def duplicates(url: str) -> tuple[int, int]:
    with psycopg.connect(url, autocommit=True, connect_timeout=10, application_name="tern-drill:check") as conn:
        dup = int(conn.execute(f"SELECT {DUPLICATES_SQL}").fetchone()[0])
        torn = int(conn.execute(TORN_SQL).fetchone()[0])
    return dup, torn


def back_in_service(box: Box, old: tuple[str, int], since: float, timeout: float) -> bool:
    """After a fallback: a web write acknowledged on the old database after ``since``."""
    endpoint = f"{old[0]}:{old[1]}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e.ev == "ack" and e.ts > since and e.endpoint == endpoint and e.dyno.startswith("web")
               for e in ledger_mod.read(box.sb.app_dir)):
            return True
        time.sleep(0.2)
    return False


# -- one run --------------------------------------------------------------------------------
def run_one(lab: Lab, scenario: Scenario, hop: int, seed: int, *, say: Callable[[str], None] = lambda m: None,
            keep_dir: Path | None = None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """One drill run; never raises for what the failover does (that is the result), only for the lab.
    ``settings``: tern settings for this run's failovers, over the lab's."""
    if hop not in scenario.hops:
        raise ValueError(f"{scenario.name} has no hop {hop}")
    lab.prepare(hop)                          # built once, not counted in the run's seconds
    d = Drill(scenario, hop, seed, say)
    say(f"{scenario.name} (hop {hop}) seed {seed}: replay with "
        f"`invoke drill --scenario {scenario.name} --hop {hop} --seed {seed}`")
    t0 = time.monotonic()
    box = d.box = lab.fresh(hop)
    if settings:
        box.settings = box.settings.replace(**settings)
    result: dict[str, Any] = {"scenario": scenario.name, "hop": hop, "seed": seed}
    try:
        result.update(_run(d, box))
    except Exception as exc:  # noqa: BLE001 - the drill itself broke: a failed run, with why
        d.errors.append(f"the drill failed: {type(exc).__name__}: {redact(exc)}")
        say("".join(traceback.format_exception(exc))[-3000:])
    finally:
        try:
            d.close()
        except Exception as exc:  # noqa: BLE001
            d.errors.append(f"cleanup failed: {redact(exc)}")
    result.update(params=d.params, landed=d.landed, journal_failed_in=list(d.bit) if d.bit else None,
                  events=d.events, errors=d.errors, seconds=round(time.monotonic() - t0, 1))
    result["ok"] = bool(result.get("outcome_ok")) and not d.errors and all(
        result.get(k) == 0 for k in ("lost", "duplicates", "post_fence", "unexplained", "torn"))
    if not result["ok"] and keep_dir is not None:
        result["kept"] = str(keep_evidence(box, keep_dir / f"{scenario.name}-hop{hop}-seed{seed}"))
    lab.discard(box)
    return result


def _run(d: Drill, box: Box) -> dict[str, Any]:
    scenario, hop = d.scenario, d.hop
    old_name, old = old_database(box)
    if not scenario.kills_runbook:
        point = d.choose("point", d.rng.choice(list(scenario.points[hop])))
        delay = d.choose("delay_seconds", round(d.rng.uniform(0.0, scenario.max_delay), 3) if scenario.max_delay
                         else 0.0)
    if scenario.setup is not None:
        scenario.setup(d)
    watch = FenceWatch(box, old_name)
    watch.start()
    time.sleep(WARMUP_SECONDS)
    first_error = ""
    if scenario.kills_runbook:
        output = failover_killed(d, box)
        report, journal = None, "killed" if d.fired else journal_outcome(box, None)
        if not d.fired:
            first_error = output
    else:
        report, first_error = failover(box, {point: trigger(d, delay)})
        journal = journal_outcome(box, report)
    d.finished.set()
    ended = time.time()
    watch.stop()
    if scenario.journal_may_lag and d.ctx is not None and getattr(d.ctx.runner, "journal_error", None):
        # the runner keeps exactly the events that reached the file (a record cut short is taken back)
        d.bit = journal_failed_at(d.ctx.journal.events, STEPS[hop])
        d.note(f"the journal's first failed write: in {d.bit[0]} (after its {d.bit[1]!r} event)")
    d.join_timers()                           # the fault's own end (the node back, the partition healed)
    side = app_side(box, old)
    first = "killed" if journal == "killed" else as_outcome(journal)
    disk_full = scenario.journal_may_lag and d.disk is not None and d.disk.how
    if disk_full and first == STOPPED and side == "old":
        first = FELL_BACK                     # the journal could not record the fallback it made
    d.note(f"first run: {first} (journal: {journal}; app on the {side} database)"
           + (f"; {first_error.splitlines()[-1][:300]}" if first_error.strip() else ""))
    consistent = not ((first == COMPLETED and side != "new") or (first == FELL_BACK and side != "old"))
    if scenario.heal is not None:
        scenario.heal(d)
    final, resumed, resume_error = first, False, ""
    if first in (STOPPED, "killed"):
        resumed = True
        report, resume_error = failover(box)
        final = as_outcome(journal_outcome(box, report))
        d.note(f"run again: {final}" + (f" ({resume_error.splitlines()[-1][:300]})" if resume_error else ""))
        side = app_side(box, old)
        consistent = consistent and not ((final == COMPLETED and side != "new") or (final == FELL_BACK and side != "old"))
    if final == FELL_BACK and not back_in_service(box, old, ended, BACK_IN_SERVICE_SECONDS):
        d.errors.append(f"the app did not write on the old database within {BACK_IN_SERVICE_SECONDS}s of the fallback")
    expected = scenario.expect(d)
    outcome_ok = (first in expected or (first == "killed" and final in expected)) and consistent \
        and final in (COMPLETED, FELL_BACK)
    if not consistent:
        d.errors.append(f"the journal says {final}, but the app is on the {side} database")
    # -- the checks, with the app stopped ------------------------------------------------
    if d.rogue is not None:
        d.rogue.stop()
        d.rogue = None
    check = box.sb.check_ledger_after_stop()
    entries = ledger_mod.read(box.sb.app_dir)
    url = box.sb.app().config_var("DATABASE_URL")
    since, until = fence_window(box, ended)
    if first == FELL_BACK and until is None and since is not None:
        # the journal did not record the fence's revert: the last moment the fence was seen in place
        until = watch.last_fenced_at if watch.lifted_after_fence else ended
    leaks = set(post_fence_acks(entries, old, since, until))
    if final == COMPLETED:
        leaks |= set(left_on_old(box, old_name, url))
    dup, torn = duplicates(url)
    rogue_acks = sum(1 for e in entries if e.ev == "ack" and e.dyno.startswith("rogue"))
    return {"first_outcome": first, "outcome": final, "resumed": resumed, "journal": journal,
            "expected": sorted(expected), "outcome_ok": outcome_ok,
            "acknowledged": check["acknowledged"], "rogue_acknowledged": rogue_acks, "lost": check["missing"],
            "missing_keys": check["missing_keys"], "unexplained": check["unexplained"], "duplicates": dup,
            "torn": torn, "post_fence": len(leaks), "post_fence_keys": sorted(leaks)[:20],
            "ended_on": check["endpoint"], "steps": steps_seconds(box),
            "reason": (report or {}).get("reason") or (first_error.strip().splitlines() or [""])[-1][:500]}


def journal_failed_at(events: list[dict], steps: tuple[str, ...]) -> tuple[str, str]:
    """Where a run's journal first failed: the step whose event was the first not written, from the events
    that were. (step, its last written event)."""
    last = next((e for e in reversed(events) if e["step"] != "run"), None)
    if last is None:
        return steps[0], "none"
    if last["event"] in ("start", "progress"):
        return last["step"], last["event"]
    i = steps.index(last["step"]) if last["step"] in steps else len(steps) - 1
    return (steps[i + 1] if i + 1 < len(steps) else last["step"]), "none"


def steps_seconds(box: Box) -> dict[str, float | None]:
    """Each step's seconds in the last run of the hop (the resumed one, if any)."""
    run_id = Journal.latest(box.settings.state_dir, KINDS[box.hop])
    if run_id is None:
        return {}
    return {s.name: (round(s.ended_at - s.started_at, 2) if s.ended_at and s.started_at else None)
            for s in Journal.load(box.settings.state_dir, run_id).steps()}


def keep_evidence(box: Box, where: Path) -> Path:
    """A failed run's journals, the app's ledger and logs, and the servers' logs, kept for the review."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True, exist_ok=True)
    if box.state_root.exists():
        shutil.copytree(box.state_root, where / "state", ignore=shutil.ignore_patterns("*.key", "*.pem", "*.lock"),
                        dirs_exist_ok=True)
    for sub in ("ledger", "logs"):
        src = box.sb.app_dir / sub
        if src.exists():
            shutil.copytree(src, where / "app" / sub, dirs_exist_ok=True)
    for log in (box.sb.root / "nodes").glob("*/postgres.log"):
        (where / "nodes").mkdir(exist_ok=True)
        shutil.copy(log, where / "nodes" / f"{log.parent.name}.log")
    for log in box.root.glob("cli-*.log"):
        shutil.copy(log, where / log.name)
    return where


# -- many runs --------------------------------------------------------------------------------
def run_many(lab: Lab, plan: list[tuple[str, int]], runs: int, seed: int, *, say: Callable[[str], None],
             keep_dir: Path | None = None) -> dict[str, Any]:
    """Every (scenario, hop) of ``plan`` ``runs`` times; run ``i`` of each uses seed ``seed + i`` (printed)."""
    results = []
    for name, hop in plan:
        for i in range(runs):
            r = run_one(lab, BY_NAME[name], hop, seed + i, say=say, keep_dir=keep_dir)
            say(f"{'ok' if r['ok'] else 'FAILED'}: {name} hop {hop} seed {seed + i}: {r.get('first_outcome')}"
                + (f" -> {r.get('outcome')}" if r.get("resumed") else "")
                + f", lost {r.get('lost')}, duplicates {r.get('duplicates')}, post-fence {r.get('post_fence')}, "
                  f"{r['seconds']} s" + (f"; {'; '.join(r['errors'])}" if r["errors"] else "")
                + (f"; evidence in {r['kept']}" if r.get("kept") else ""))
            results.append(r)
    return {"seed": seed, "runs": results, "summary": summarise(results), "ok": all(r["ok"] for r in results),
            "lab": lab.describe()}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault((r["scenario"], r["hop"]), {
            "scenario": r["scenario"], "hop": r["hop"], "runs": 0, "completed": 0, "fell_back": 0, "stopped": 0,
            "failed": 0, "lost": 0, "duplicates": 0, "post_fence": 0, "seconds": []})
        row["runs"] += 1
        first = r.get("first_outcome")
        key = {COMPLETED: "completed", FELL_BACK: "fell_back", STOPPED: "stopped"}.get(
            first if first != "killed" else r.get("outcome"))
        if key:
            row[key] += 1
        row["failed"] += 0 if r["ok"] else 1
        for k in ("lost", "duplicates", "post_fence"):
            row[k] += int(r.get(k) or 0)
        row["seconds"].append(r["seconds"])
    out = []
    for row in rows.values():
        secs = row.pop("seconds")
        row["median_seconds"] = round(statistics.median(secs), 1) if secs else None
        row["max_seconds"] = max(secs) if secs else None
        out.append(row)
    return out
