"""Hop 2's rollback (Aurora -> the EC2 leader) against real PostgreSQL: rollback-aurora after failover-aurora."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from runbook.errors import StepError
from runbook.failover import rollback as rollback_plan
from runbook.failover.run import failover_aurora, rollback_aurora
from runbook.pg import url_endpoint
from runbook.replication import REVERSE, SUBSCRIPTION, native
from runbook.replication.leader import EC2_URL_VAR, aurora_app_url, aurora_master_url
from runbook.replication.setup import replicate_aurora
from runbook.steps import FAULT_KILL_AFTER
from tests.conftest import make_root, run_invoke, subset
from tests.functional.test_failover_ec2 import Env, assert_nothing_lost

pytestmark = pytest.mark.functional

ROOT = Path(__file__).resolve().parents[2]


def hop1_env(e: Env) -> Env:
    """After hop 1 (the app on the EC2 leader); runs journaled where the CLI looks for them."""
    e.settings = e.settings.replace(state_dir=e.settings.stack_state_dir("local"))
    e.restore()
    e.failover()
    time.sleep(1.0)
    return e


@pytest.fixture
def hop1():
    e = Env(make_root())
    try:
        yield hop1_env(e)
    finally:
        e.sb.down(check_ledger=False)
        shutil.rmtree(e.root, ignore_errors=True)


@pytest.fixture
def on_aurora():
    """After hop 2: replication set up, failover-aurora completed, the app writing on Aurora."""
    e = Env(make_root())
    try:
        hop1_env(e)
        assert replicate_aurora(e.outputs, e.settings, replica_identity_full=True)["outcome"] == "completed"
        time.sleep(1.0)
        report = failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
        assert report["outcome"] == "completed", report
        e.leader = next(r.name for r in e.outputs.replicas if (r.host, r.port) == endpoint(e.sb.app().config_var(
            EC2_URL_VAR)))
        time.sleep(2.0)                   # the app writes on Aurora
        yield e
    finally:
        e.sb.down(check_ledger=False)
        shutil.rmtree(e.root, ignore_errors=True)


def endpoint(url: str) -> tuple[str, int]:
    return url_endpoint(url)[:2]


def on_leader(e: Env) -> bool:
    r = e.outputs.replica(e.leader)
    return endpoint(e.app_url()) == (r.host, r.port)


def aurora(e: Env, query: str, params=()):
    with psycopg.connect(aurora_master_url(e.outputs), autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def leader_query(e: Env, query: str):
    return e.sb.node(e.leader).query(query, database="app")


def apply_errors(e: Env) -> int:
    return aurora(e, "SELECT apply_error_count FROM pg_stat_subscription_stats WHERE subname = %s",
                  (SUBSCRIPTION,))[0][0]


def aurora_log_errors(e: Env) -> str:
    text = Path(e.sb.node("aurora").log_file).read_text(errors="replace")
    return "\n".join(line for line in text.splitlines() if "ERROR" in line or "DETAIL" in line)[-4000:]


def wait_for(probe, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_rollback_end_to_end_then_failover_again(on_aurora):
    e = on_aurora
    dry = e.invoke("rollback-aurora", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr[-2000:]
    plan = json.loads(dry.stdout)
    assert [r["step"] for r in plan["plan"]] == rollback_plan.STEP_NAMES and plan["preflight_error"] is None
    assert "POINT OF NO RETURN" in next(r["state"] for r in plan["plan"] if r["step"] == "switch_back")

    def late_write(ctx):   # a role beyond the app's fence writes on Aurora after the sentinel
        aurora(e, "INSERT INTO warehouses (code, name, region) VALUES ('WHL', 'late', 'l') RETURNING 1")

    errors_before = apply_errors(e)
    report = rollback_aurora(e.outputs, e.settings, confirm=lambda q: True, hooks={"before:switch_back": late_write})
    assert report["outcome"] == "completed", report
    assert [s["name"] for s in report["steps"]] == rollback_plan.STEP_NAMES
    assert "second sentinel" in next(s["detail"] for s in report["steps"] if s["name"] == "switch_back")
    assert leader_query(e, "SELECT 1 AS one FROM warehouses WHERE code = 'WHL'") == [{"one": 1}]
    assert report["new_leader"] == e.leader and on_leader(e)
    assert e.sb.app().config_var(EC2_URL_VAR) is None
    assert report["missing_on_target"] == 0 and report["acknowledged_writes"] > 0
    assert report["write_unavailability"]["seconds"] is not None
    # every sequence-backed table takes an insert on the leader (sequences were synced back)
    with psycopg.connect(e.app_url(), autocommit=True) as conn:
        conn.execute("INSERT INTO warehouses (code, name, region) VALUES ('WHR', 'r', 'r')")
        conn.execute("INSERT INTO orders (order_ref, channel, customer_email, status, total_cents) "
                     "VALUES (gen_random_uuid(), 'test', 'x@example.com', 'paid', 1)")
        conn.execute("SELECT nextval('invoice_number_seq')")
    # Aurora follows the leader again, without re-applying what it sent the leader itself
    wait_for(lambda: aurora(e, "SELECT 1 FROM warehouses WHERE code = 'WHR'"), "the leader's write reached Aurora")
    time.sleep(1.0)
    assert apply_errors(e) == errors_before, aurora_log_errors(e)
    # the reverse replication is retired; Aurora stays fenced for the app's role
    assert not leader_query(e, f"SELECT 1 FROM pg_subscription WHERE subname = '{REVERSE}'")
    assert not aurora(e, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (REVERSE,))
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        psycopg.connect(aurora_app_url(e.sb.app(), e.outputs), connect_timeout=5).close()
    again = rollback_aurora(e.outputs, e.settings, confirm=lambda q: True)     # running it again: a no-op
    assert again["already_done"] and again["run_id"] == report["run_id"]
    # failover-aurora runs again later: the app back on Aurora (its role readmitted there), nothing lost
    time.sleep(1.0)
    second = failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert second["outcome"] == "completed", second
    assert endpoint(e.app_url()) == (e.outputs.aurora.writer_endpoint, e.outputs.aurora.port)
    assert_nothing_lost(e, second)


def test_rollback_before_failover_aurora_is_refused(hop1):
    e = hop1
    before = e.app_url()
    res = e.invoke("rollback-aurora", "--yes", "--json")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "failover-aurora has not run" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout.strip() == ""
    assert e.app_url() == before and not e.sb.app().maintenance()
    assert e.sb.app().running().get("worker", 0) >= 1
    with psycopg.connect(e.app_url(), autocommit=True) as conn:   # the leader still takes the app's writes
        conn.execute("INSERT INTO warehouses (code, name, region) VALUES ('WHN', 'n', 'n')")
    res = e.invoke("rollback-aurora", "--dry-run")
    assert res.returncode == 2 and "failover-aurora has not run" in res.stderr
    shown = e.invoke("report", "--json")                    # the refusal is on record, nothing acted
    assert shown.returncode == 0, shown.stderr[-2000:]
    refused = json.loads(shown.stdout)
    assert (refused["kind"], refused["outcome"]) == ("rollback-aurora", "refused")
    assert [s["name"] for s in refused["steps"]] == ["preflight"]


def test_reverse_replication_broken_before_the_point_of_no_return_falls_back(on_aurora):
    e = on_aurora
    leader = e.sb.node(e.leader)

    def break_reverse(ctx):
        leader.psql(native.BYPASS_GUARD + f"ALTER SUBSCRIPTION {REVERSE} DISABLE", database="app")

    with pytest.raises(StepError) as failed:
        rollback_aurora(e.outputs, e.settings.replace(catchup_timeout=5), confirm=lambda q: True,
                        hooks={"before:catch_up": break_reverse})
    report = failed.value.context["report"]
    assert report["outcome"] == "fell_back" and "catch_up" in report["reason"], report
    a = e.outputs.aurora
    assert endpoint(e.app_url()) == (a.writer_endpoint, a.port) and not e.sb.app().maintenance()
    assert aurora(e, "SELECT rolconnlimit FROM pg_roles WHERE rolname = 'app'") == [(-1,)]
    assert leader_query(e, "SELECT datconnlimit AS n FROM pg_database WHERE datname = 'app'") == [{"n": 0}]
    # the app writes on Aurora again, its workers too
    assert "read back" in e.sb.app().smoke_test(a.writer_endpoint, a.port, since=time.time(), timeout=30)
    assert e.sb.app().running().get("worker", 0) >= 1
    # repaired, the rollback runs to the end and loses nothing
    leader.psql(native.BYPASS_GUARD + f"ALTER SUBSCRIPTION {REVERSE} ENABLE", database="app")
    time.sleep(2.0)
    report = rollback_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert report["outcome"] == "completed", report
    assert on_leader(e)
    assert_nothing_lost(e, report)


@pytest.mark.parametrize("step", subset(["hold_leader", "fence", "catch_up", "verify", "switch_back", "switch",
                                         "smoke_test"], set()))   # TERN_TESTS=all: the pooler tests resume after a point of no return
def test_rollback_killed_after_a_step_resumes_and_loses_nothing(on_aurora, step):
    e = on_aurora
    env = dict(os.environ, **{FAULT_KILL_AFTER: step, "INVOKE_TERN_SANDBOX_DIR": str(e.sb.root),
                              "INVOKE_TERN_STATE_DIR": str(e.root / "state")})
    first = subprocess.run([str(Path(sys.executable).with_name("invoke")), "rollback-aurora", "--yes"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), first.stderr[-2000:]
    second = run_invoke("rollback-aurora", "--yes", "--json", sandbox_dir=e.sb.root, state_dir=e.root / "state")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run" in second.stderr
    report = json.loads(second.stdout)
    assert report["outcome"] == "completed"
    assert on_leader(e)
    assert_nothing_lost(e, report)
