"""Hop 2 under faults, against real PostgreSQL: the apply worker dies, Aurora restarts, the slot is
dropped, the app bursts - failover-aurora completes or falls back, never switches behind, loses nothing."""

from __future__ import annotations

import dataclasses
import threading
import time

import psycopg
import pytest

from runbook.errors import StepError
from runbook.failover.run import failover_aurora
from runbook.replication.setup import replicate_aurora
from tests.conftest import subset
from tests.functional.test_failover_ec2 import assert_nothing_lost
from tests.functional.test_hop2 import hop2  # noqa: F401 - the fixture

pytestmark = pytest.mark.functional


def superuser(e, node: str) -> psycopg.Connection:
    pg = e.sb.node(node)
    return psycopg.connect(f"postgresql://{pg._user()}@/{'app' if node != 'aurora' else e.outputs.aurora.database}"
                           f"?host={pg.socket_dir}&port={pg.port}", autocommit=True)


def leader_name(e) -> str:
    url = e.app_url()
    return next(r.name for r in e.outputs.replicas if f":{r.port}/" in url)


def outcome_is_safe(e, run):
    """Completed on Aurora, or fell back to the EC2 leader: either way every acknowledged write is there."""
    try:
        report = run()
    except StepError as exc:
        report = exc.context.get("report") or {}
        assert report.get("outcome") == "fell_back", report
        assert f":{e.outputs.aurora.port}/" not in e.app_url() and not e.sb.app().maintenance()
        with psycopg.connect(e.app_url(), autocommit=True) as conn:   # the leader takes writes again
            conn.execute("INSERT INTO warehouses (code, name, region) VALUES ('FB1', 'x', 'x')")
        assert_nothing_lost(e)
        return report, exc
    assert report["outcome"] == "completed", report
    assert f":{e.outputs.aurora.port}/" in e.app_url()
    assert_nothing_lost(e, report)
    return report, None


@pytest.fixture
def replicating(hop2):  # noqa: F811
    replicate_aurora(hop2.outputs, hop2.settings, replica_identity_full=True)
    time.sleep(1.0)
    return hop2


def run(e, hooks, **settings):
    s = dataclasses.replace(e.settings, **settings) if settings else e.settings
    return lambda: failover_aurora(e.outputs, s, confirm=lambda q: True, hooks=hooks)


@pytest.mark.parametrize("fault", subset(["apply_worker_dies", "aurora_restarts"], {"aurora_restarts"}))
def test_aurora_side_faults_during_catch_up_never_switch_behind(replicating, fault):
    e = replicating

    def apply_worker_dies(ctx):
        with superuser(e, "aurora") as conn:
            pids = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_subscription WHERE pid IS NOT NULL")]
            assert pids, "no apply worker to kill"
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

    restart = threading.Timer(3.0, lambda: e.sb.node("aurora").start(timeout=60))

    def aurora_restarts(ctx):
        e.sb.node("aurora").stop(mode="immediate", timeout=30)   # a crash; the service brings it back 3 s later
        restart.start()

    hooks = {"before:catch_up": apply_worker_dies if fault == "apply_worker_dies" else aurora_restarts}
    try:
        report, exc = outcome_is_safe(e, run(e, hooks, catchup_timeout=60))
    finally:
        if restart.is_alive():
            restart.join()
    # a transient outage within the catch-up deadline is waited through, not a fallback
    assert exc is None, str(exc)
    catch_up = next(s for s in report["steps"] if s["name"] == "catch_up")
    assert "sentinel seen on Aurora" in catch_up["detail"]


def test_slot_dropped_on_the_leader_falls_back_with_a_clear_error(replicating):
    e = replicating

    def drop_slot(ctx):
        with superuser(e, leader_name(e)) as conn:
            slot = conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_type = 'logical'").fetchone()[0]
            deadline = time.monotonic() + 20
            while True:   # the walsender holds it: end it, then drop before the apply worker reconnects
                conn.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                             "WHERE slot_name = %s AND active_pid IS NOT NULL", (slot,))
                try:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                    return
                except psycopg.errors.ObjectInUse:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)

    t0 = time.monotonic()
    report, exc = outcome_is_safe(e, run(e, {"before:catch_up": drop_slot}, catchup_timeout=60))
    assert exc is not None, "a switch without the slot cannot have applied the final LSN"
    assert "slot" in str(exc) and "replicate-aurora" in str(exc), str(exc)
    assert time.monotonic() - t0 < 55, "the lost slot must be seen at once, not after the catch-up timeout"


def test_burst_just_before_the_fence_loses_nothing(replicating):
    e = replicating

    def burst(ctx):
        e.sb.app().set_load(burst_factor=5, burst_seconds=3)
        time.sleep(1.0)

    report, exc = outcome_is_safe(e, run(e, {"before:stop_workers": burst}))
    assert exc is None and report["outcome"] == "completed"


def test_aurora_unreachable_is_a_clear_error_and_changes_nothing(hop2):  # noqa: F811
    from tests.conftest import run_invoke

    e = hop2
    before = e.app_url()
    e.sb.node("aurora").stop(mode="fast", timeout=30)
    try:
        res = run_invoke("replicate-aurora", "--replica-identity-full", sandbox_dir=e.sb.root,
                         state_dir=e.root / "state")
        assert res.returncode == 2, res.stderr[-2000:]
        assert "Traceback" not in res.stderr and "aurora" in res.stderr.lower()
        res = run_invoke("failover-aurora", "--yes", sandbox_dir=e.sb.root, state_dir=e.root / "state")
        assert res.returncode == 2, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
    finally:
        e.sb.node("aurora").start(timeout=60)
    with superuser(e, leader_name(e)) as conn:   # nothing set up on the leader, the app untouched
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'tern%'").fetchone()[0] == 0
    assert e.app_url() == before and not e.sb.app().maintenance()
    assert_nothing_lost(e)
