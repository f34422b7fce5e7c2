"""Hop 2 (EC2 -> Aurora) against real PostgreSQL: replicate-aurora, failover-aurora, the app on Aurora."""

from __future__ import annotations

import shutil
import time

import psycopg
import pytest

from runbook.errors import StepError
from runbook.failover import aurora as aurora_plan
from runbook.failover.run import failover_aurora
from runbook.replication.leader import aurora_master_url
from runbook.replication.setup import replicate_aurora
from tests.conftest import make_root, subset
from tests.functional.test_failover_ec2 import Env, assert_nothing_lost

pytestmark = pytest.mark.functional


@pytest.fixture
def hop2():
    root = make_root()
    e = Env(root)
    e.restore()
    e.failover()                      # hop 1: the app on the EC2 leader
    time.sleep(1.0)
    yield e
    e.sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


def test_both_hops_end_to_end(hop2):
    e = hop2
    with pytest.raises(StepError, match="audit_events.*--replica-identity-full") as refused:
        replicate_aurora(e.outputs, e.settings)                # a table without a key: refused by default
    assert any(f["severity"] == "block" for f in refused.value.context["risk_register"])
    leader = e.sb.node(next(r.name for r in e.outputs.replicas if f":{r.port}/" in e.app_url()))   # hop 1's
    leader.psql("ALTER TABLE warehouses SET (autovacuum_enabled = false);", database="app")   # the app's choice
    setup = replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    assert setup["outcome"] == "completed"
    # Aurora as the leader: every foreign key, index and constraint; autovacuum as the app set it (tern turned it
    # off for the copy only); statistics for every table (the app's first queries after the switch are planned)
    catalog = ("SELECT (SELECT array_agg(conname::text ORDER BY conname) FROM pg_constraint k JOIN pg_namespace n "
               "ON n.oid = k.connamespace WHERE n.nspname = 'public') AS constraints, "
               "(SELECT array_agg(indexname::text ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public') AS indexes, "
               "(SELECT array_agg(relname::text || ':' || coalesce(array_to_string(reloptions, ','), '') ORDER BY relname) "
               " FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace) AS options")
    on_leader = leader.query_one(catalog, database="app")
    with psycopg.connect(aurora_master_url(e.outputs), autocommit=True) as master:
        row = master.execute(catalog).fetchone()
        unanalyzed = master.execute("SELECT relname FROM pg_stat_user_tables WHERE schemaname = 'public' "
                                    "AND last_analyze IS NULL AND last_autoanalyze IS NULL").fetchall()
    assert list(row) == [on_leader["constraints"], on_leader["indexes"], on_leader["options"]]
    assert "warehouses:autovacuum_enabled=false" in row[2] and "orders:" in row[2]
    assert unanalyzed == []
    risks = {f["risk"]: f for f in setup["risk_register"]}
    assert risks["tables without a primary key or replica identity"]["severity"] == "warn"
    assert "sequences" in risks and "public.invoice_number_seq" in risks["sequences"]["objects"]
    again = replicate_aurora(e.outputs, e.settings, replica_identity_full=True)   # safe to run again
    assert again["outcome"] == "completed"
    time.sleep(2.0)
    report = failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert report["outcome"] == "completed", report
    assert [s["name"] for s in report["steps"]] == aurora_plan.STEP_NAMES
    assert report["missing_on_target"] == 0 and report["acknowledged_writes"] > 0
    assert report["write_unavailability"]["seconds"] is not None
    a = e.outputs.aurora
    assert f":{a.port}/" in e.app_url()
    # every sequence-backed table takes an insert on Aurora (sequences were synced)
    with psycopg.connect(e.app_url(), autocommit=True) as conn:
        conn.execute("INSERT INTO warehouses (code, name, region) VALUES ('WHX', 'x', 'x')")
        conn.execute("INSERT INTO orders (order_ref, channel, customer_email, status, total_cents) "
                     "VALUES (gen_random_uuid(), 'test', 'x@example.com', 'paid', 1)")
        conn.execute("SELECT nextval('invoice_number_seq')")
    # the reverse replication carries Aurora's writes back to the EC2 leader
    leader = e.sb.node(report["steps"][0]["detail"].split()[1].rstrip(";"))
    deadline = time.monotonic() + 30
    while not leader.query("SELECT 1 FROM warehouses WHERE code = 'WHX'", database="app"):
        assert time.monotonic() < deadline, "Aurora's write did not reach the EC2 leader"
        time.sleep(0.2)
    assert_nothing_lost(e, report)


def test_hop2_refuses_without_replication_and_ddl_is_guarded(hop2):
    e = hop2
    before = e.app_url()
    with pytest.raises(StepError, match="replicate-aurora"):
        failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert e.app_url() == before and not e.sb.app().maintenance()
    replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    with psycopg.connect(e.app_url(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match="replicates to Aurora"):
            conn.execute("CREATE TABLE sneaky (id int)")
    with psycopg.connect(aurora_master_url(e.outputs), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_subscription").fetchone()[0] == 1


@pytest.mark.parametrize("step", subset(["fence", "catch_up", "switch_over", "switch"], {"switch_over"}))
def test_failover_aurora_killed_after_a_step_resumes_and_loses_nothing(hop2, step):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from runbook.steps import FAULT_KILL_AFTER
    from tests.conftest import run_invoke

    e = hop2
    replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    time.sleep(1.0)
    env = dict(os.environ, **{FAULT_KILL_AFTER: step, "INVOKE_TERN_SANDBOX_DIR": str(e.sb.root),
                              "INVOKE_TERN_STATE_DIR": str(e.root / "state")})
    first = subprocess.run([str(Path(sys.executable).with_name("invoke")), "failover-aurora", "--yes"],
                           cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), first.stderr[-2000:]
    second = run_invoke("failover-aurora", "--yes", "--json", sandbox_dir=e.sb.root, state_dir=e.root / "state")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run" in second.stderr
    import json

    report = json.loads(second.stdout[second.stdout.index("{"):])
    assert report["outcome"] == "completed"
    assert f":{e.outputs.aurora.port}/" in e.app_url()
    assert_nothing_lost(e, report)


def test_bad_input_for_hop2_changes_nothing(hop2):
    from tests.conftest import run_invoke

    e = hop2
    res = run_invoke("replicate-aurora", "--engine", "nope", sandbox_dir=e.sb.root, state_dir=e.root / "state")
    assert res.returncode == 2 and "unknown engine 'nope'" in res.stderr and "Traceback" not in res.stderr
    res = run_invoke("replicate-aurora", "--dry-run", "--json", sandbox_dir=e.sb.root, state_dir=e.root / "state")
    assert res.returncode == 2 and "audit_events" in res.stderr   # refused by the register, nothing changed
    with psycopg.connect(aurora_master_url(e.outputs), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_subscription").fetchone()[0] == 0


def test_a_write_on_the_fenced_leader_after_the_sentinel_is_carried_not_lost(hop2):
    """The platform's superuser (or autovacuum's analyze) writes on the fenced leader after the sentinel: the
    switch-over carries it with a new sentinel instead of falling back, and the row is on Aurora."""
    e = hop2
    replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    time.sleep(1.0)
    leader = e.sb.node(next(r.name for r in e.outputs.replicas if f":{r.port}/" in e.app_url()))

    def superuser_writes(ctx):
        leader.psql("SET default_transaction_read_only = off;\n"
                    "INSERT INTO warehouses (code, name, region) VALUES ('SU', 'after the sentinel', 'x');",
                    database="app")

    report = failover_aurora(e.outputs, e.settings, confirm=lambda q: True, hooks={"before:switch_over": superuser_writes})
    assert report["outcome"] == "completed", report.get("reason")
    over = next(s for s in report["steps"] if s["name"] == "switch_over")
    assert "more sentinels, carried too" in over["detail"]
    with psycopg.connect(aurora_master_url(e.outputs), autocommit=True) as master:
        assert master.execute("SELECT count(*) FROM warehouses WHERE code = 'SU'").fetchone()[0] == 1
    assert_nothing_lost(e, report)
