"""The fence against clients nobody here wrote: no acknowledged write may land on the old source
after the fence, whatever the client sets, whichever role it uses, whenever it reconnects."""

from __future__ import annotations

import shutil
import threading
import time

import psycopg
import pytest
from psycopg import sql

from runbook.errors import StepError
from runbook.journal import Journal
from runbook.pg import with_endpoint
from tests.conftest import make_root, subset
from tests.functional.test_failover_ec2 import Env, assert_nothing_lost

pytestmark = pytest.mark.functional

TABLE = "CREATE TABLE IF NOT EXISTS rogue_writes (id bigserial PRIMARY KEY, who text NOT NULL, at timestamptz DEFAULT now())"


class Rogue(threading.Thread):
    """A client that writes as fast as it can, turns read-only off, and reconnects after ``delay`` s."""

    def __init__(self, url: str, who: str, mode: str = "set_off", delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.url, self.who, self.mode, self.delay = url, who, mode, delay
        self.acked: list[int] = []
        self.refused = 0
        self.halt = threading.Event()

    def write(self, conn) -> int:
        if self.mode == "set_off":
            conn.execute("SET default_transaction_read_only = off")
            return conn.execute("INSERT INTO rogue_writes (who) VALUES (%s) RETURNING id", (self.who,)).fetchone()[0]
        conn.execute("BEGIN READ WRITE")
        try:
            new = conn.execute("INSERT INTO rogue_writes (who) VALUES (%s) RETURNING id", (self.who,)).fetchone()[0]
        except psycopg.Error:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return new

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=2) as conn:
                    while not self.halt.is_set():
                        self.acked.append(self.write(conn))
                        time.sleep(0.01)
            except psycopg.Error:
                self.refused += 1
                self.halt.wait(self.delay or 0.02)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


@pytest.fixture
def env():
    root = make_root()
    e = Env(root)
    with psycopg.connect(e.app_url(), autocommit=True) as conn:
        conn.execute(TABLE)
    e.restore()
    yield e
    e.sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


def lost(e: Env, rogues: list[Rogue]) -> list[int]:
    acked = sorted(i for r in rogues for i in r.acked)
    with psycopg.connect(e.app_url(), autocommit=True) as conn:
        present = {r[0] for r in conn.execute("SELECT id FROM rogue_writes WHERE id = ANY(%s)", (acked,)).fetchall()}
    return [i for i in acked if i not in present]


@pytest.mark.parametrize("mode, delay", subset([("set_off", 0.0), ("set_off", 3.0), ("begin_rw", 0.0), ("begin_rw", 3.0)],
                                                {("set_off", 3.0), ("begin_rw", 0.0)}))
def test_rogue_clients_of_the_app_role_lose_nothing(env, mode, delay):
    """Clients that reconnect at once or seconds later (a pool's back-off) and turn read-only off."""
    rogues = [Rogue(env.app_url(), f"rogue-{i}", mode, delay) for i in range(2)]
    for r in rogues:
        r.start()
    time.sleep(0.5)
    try:
        report = env.failover()
        time.sleep(delay + 1.0)   # the late reconnects happen after the switch
    finally:
        for r in rogues:
            r.stop()
    assert report["outcome"] == "completed"
    assert sum(len(r.acked) for r in rogues) > 10
    assert lost(env, rogues) == []
    assert_nothing_lost(env, report)


def test_another_role_connected_at_the_fence_makes_it_fall_back(env):
    """The app's role may not terminate another role's sessions: the fence must not pretend to hold."""
    password = "rogue-secret-1"
    with psycopg.connect(env.app_url(), autocommit=True) as conn:
        conn.execute("GRANT INSERT, SELECT ON rogue_writes TO PUBLIC")
        conn.execute("GRANT USAGE ON SEQUENCE rogue_writes_id_seq TO PUBLIC")
    env.sb.node("source").psql(f"CREATE ROLE other_role LOGIN PASSWORD '{password}'")
    url = env.app_url()
    other_url = url.replace(url.split("//", 1)[1].split("@", 1)[0], f"other_role:{password}")
    rogue = Rogue(other_url, "other", "set_off", 0.0)
    rogue.start()
    time.sleep(0.5)
    before = env.app_url()
    try:
        with pytest.raises(StepError, match="other_role"):
            env.failover()
    finally:
        rogue.stop()
    journal = Journal.load(env.settings.state_dir, Journal.latest(env.settings.state_dir))
    assert journal.outcome()[0] == "fell_back"
    app = env.sb.app()
    assert app.config_var("DATABASE_URL") == before and not app.maintenance()
    assert rogue.acked and lost(env, [rogue]) == []
    # the fence was applied, then its proof failed: it was reverted too - the app's role writes again
    with psycopg.connect(env.app_url(), autocommit=True) as conn:
        conn.execute("INSERT INTO rogue_writes (who) VALUES ('after-fallback')")
    assert_nothing_lost(env)


def test_the_window_after_a_fallback_is_the_real_gap(env):
    """The report's write-unavailability window after a fallback: the real gap (it said 0.003 s for 2.2 s)."""
    import dataclasses

    def stall_then_fail(ctx):
        time.sleep(2.0)
        ctx.settings = dataclasses.replace(ctx.settings, catchup_timeout=0.001)
        ctx.pg(ctx.data["candidate"]).stop(mode="fast")
        for other in ctx.data["others"]:
            ctx.pg(other).stop(mode="fast")

    with pytest.raises(StepError, match="fell back"):
        env.failover(hooks={"before:flush": stall_then_fail})
    time.sleep(2.0)   # the app writes on the source again
    from runbook import report as report_mod

    journal = Journal.load(env.settings.state_dir, Journal.latest(env.settings.state_dir))
    report = report_mod.build(journal, env.outputs)
    assert report["outcome"] == "fell_back"
    window = report["write_unavailability"]
    assert window["seconds"] is not None and window["seconds"] >= 2.0, window
    assert_nothing_lost(env)


def test_another_role_reconnecting_after_the_fence_is_refused(env):
    password = "rogue-secret-2"
    with psycopg.connect(env.app_url(), autocommit=True) as conn:
        conn.execute("GRANT INSERT, SELECT ON rogue_writes TO PUBLIC")
        conn.execute("GRANT USAGE ON SEQUENCE rogue_writes_id_seq TO PUBLIC")
    env.sb.node("source").psql(f"CREATE ROLE late_role LOGIN PASSWORD '{password}'")
    url = env.app_url()
    late_url = url.replace(url.split("//", 1)[1].split("@", 1)[0], f"late_role:{password}")
    rogue = Rogue(late_url, "late", "set_off", 0.0)

    def start_rogue(ctx):
        rogue.start()
        time.sleep(1.0)

    try:
        report = env.failover(hooks={"after:fence": start_rogue})
    finally:
        rogue.stop()
    assert report["outcome"] == "completed"
    assert rogue.refused > 0 and lost(env, [rogue]) == []
    assert_nothing_lost(env, report)


def test_prepared_transaction_is_refused_at_preflight(env):
    env.sb.node("source").psql("ALTER SYSTEM SET max_prepared_transactions = 5")
    env.sb.node("source").stop()
    env.sb.node("source").start()
    conn = psycopg.connect(env.app_url(), autocommit=True)
    conn.execute("BEGIN")
    conn.execute("INSERT INTO rogue_writes (who) VALUES ('prepared')")
    conn.execute("PREPARE TRANSACTION 'tern-test-gid'")
    before = env.app_url()
    try:
        with pytest.raises(StepError, match="prepared transactions"):
            env.failover()
        app = env.sb.app()
        assert app.config_var("DATABASE_URL") == before and not app.maintenance()
    finally:
        conn.execute("ROLLBACK PREPARED 'tern-test-gid'")
        conn.close()


def test_write_after_the_final_lsn_is_copied_never_lost(env):
    """Something writes on the source after the flush (autovacuum's analyze on a busy database, the
    platform's superuser, a hole in the fence): the promotion must not leave it behind - it flushes
    again and the candidate replays it before promoting."""
    state = {}

    def sneak_a_write(ctx):
        # tern's own held session stands in for a writer the fence cannot stop
        conn = ctx.held().control
        state["id"] = conn.execute("INSERT INTO rogue_writes (who) VALUES ('after-final') RETURNING id").fetchone()[0]

    report = env.failover(hooks={"before:promote": sneak_a_write})
    assert report["outcome"] == "completed"
    promote = next(s for s in report["steps"] if s["name"] == "promote")
    assert "more flushes, copied too" in promote["detail"]
    with psycopg.connect(env.app_url(), autocommit=True) as conn:      # the new leader
        assert conn.execute("SELECT count(*) FROM rogue_writes WHERE id = %s", (state["id"],)).fetchone()[0] == 1
    assert_nothing_lost(env, report)


def test_a_transaction_running_through_the_flush_is_never_left_behind(env):
    """A session the fence cannot stop (the platform's superuser) holds a write transaction open across
    the flush: the snapshot's xmax would not move when it commits later, so the flush must wait for it
    (bounded) and fall back rather than promote without it."""
    import dataclasses

    env.settings = dataclasses.replace(env.settings, stop_app_timeout=3.0)
    source = env.sb.node("source")
    su = psycopg.connect(f"postgresql://postgres@/app?host={source.socket_dir}&port={source.port}", autocommit=True)
    su.execute("BEGIN")
    su.execute("INSERT INTO rogue_writes (who) VALUES ('superuser, committed late')")
    try:
        with pytest.raises(StepError, match="still running on the source"):
            env.failover()
    finally:
        su.execute("COMMIT")
        su.close()
    journal = Journal.load(env.settings.state_dir, Journal.latest(env.settings.state_dir))
    assert journal.outcome()[0] == "fell_back"
    with psycopg.connect(env.app_url(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM rogue_writes WHERE who = 'superuser, committed late'"
                            ).fetchone()[0] == 1
    assert_nothing_lost(env)


def test_the_window_checks_a_bounded_sample_and_every_row_is_compared_after(env):
    """Inside the window: no row counts, a bounded sample. After the switch: every row, against a
    replica held at the final LSN - and a difference there stops the run loudly."""
    report = env.failover()
    gate, full = report["verification"], report["verification_full"]
    assert gate["ok"] and gate["rows"] == 0                      # nothing counted inside the window
    assert 0 < gate["sampled_rows"] <= env.settings.gate_sample_rows * gate["tables"]
    assert full["ok"] is True and full["witness"] != report["new_leader"]
    assert full["rows"] > gate["sampled_rows"]
    assert_nothing_lost(env, report)


def test_a_difference_found_after_the_switch_stops_the_run(tmp_root):
    e = Env(tmp_root)
    try:
        with psycopg.connect(e.app_url(), autocommit=True) as conn:
            conn.execute(TABLE)
        e.restore()

        def corrupt_source(ctx):
            # the source differs from what was copied (tern's own session: nothing else can write)
            ctx.held().control.execute("INSERT INTO rogue_writes (id, who) VALUES (999999, 'diverged')")

        with pytest.raises(StepError, match=r"row \(id=999999\) is missing on the target"):
            e.failover(hooks={"before:verify_full": corrupt_source})
        journal = Journal.load(e.settings.state_dir, Journal.latest(e.settings.state_dir))
        assert journal.outcome() is None      # stopped for the operator, not completed
        assert journal.context()["verification_full"]["ok"] is False
    finally:
        e.sb.down(check_ledger=False)


def test_a_final_lsn_right_after_a_segment_switch_is_reached_at_once(env):
    """The source switched WAL segments just before the flush (archive_timeout on a quiet database does it):
    the final insert position is past the new segment's page header, while the candidate reports the end of
    the last record, the boundary itself. Waiting for the header's end waited for the *next* segment, a
    whole archive_timeout (a minute) inside the window; here the catch-up is bounded well below that."""
    import dataclasses

    env.settings = dataclasses.replace(env.settings, catchup_timeout=20.0)   # the sandbox's archive_timeout is 60 s
    source = env.sb.node("source")

    def switch_segment(ctx):
        with psycopg.connect(f"postgresql://postgres@/postgres?host={source.socket_dir}&port={source.port}",
                             autocommit=True) as su:
            su.execute("SELECT pg_switch_wal()")

    report = env.failover(hooks={"before:flush": switch_segment})
    assert report["outcome"] == "completed", report.get("reason")
    journal = Journal.load(env.settings.state_dir, Journal.latest(env.settings.state_dir))
    final = [e["context"]["final_lsn"] for e in journal.events
             if e["event"] == "progress" and "final_lsn" in e.get("context", {})][0]
    hi, _, lo = final.partition("/")
    assert int(lo, 16) % (16 * 1024 * 1024) == 40, f"the final LSN {final} is not right after a segment switch"
    assert_nothing_lost(env, report)
