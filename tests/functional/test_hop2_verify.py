"""Hop 2 against real PostgreSQL: replication status, the preflight's apply headroom, and the full
verification of Aurora against an EC2 standby held at the point where Aurora's apply stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

from runbook.errors import StepError
from runbook.failover import aurora as aurora_plan
from runbook.failover.run import failover_aurora
from runbook.journal import Journal
from runbook.replication import SUBSCRIPTION
from runbook.replication.leader import aurora_master_url
from runbook.replication.setup import replicate_aurora
from tests.conftest import ROOT
from tests.functional.test_failover_ec2 import Env, assert_nothing_lost
from tests.functional.test_hop2 import hop2  # noqa: F401 - the fixture (hop 1 done, the other replica streaming from the leader)

pytestmark = pytest.mark.functional




def invoke(e: Env, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_TERN_")}
    env.update({"INVOKE_TERN_SANDBOX_DIR": str(e.sb.root), "INVOKE_TERN_STATE_DIR": str(e.root / "state")})
    env.update({f"INVOKE_TERN_{k.upper()}": v for k, v in settings.items()})
    return subprocess.run([str(Path(sys.executable).with_name("invoke")), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def leader_name(e: Env) -> str:
    url = e.app_url()
    return next(r.name for r in e.outputs.replicas if f":{r.port}/" in url)


def standby_name(e: Env) -> str:
    return next(r.name for r in e.outputs.replicas if r.name != leader_name(e))


def aurora_sql(e: Env, statement: str) -> str:
    """As the Aurora stand-in's superuser (what a test may do and tern never does)."""
    return e.sb.node("aurora").psql(statement, database=e.outputs.aurora.database)


def subscription(e: Env) -> dict:
    with psycopg.connect(aurora_master_url(e.outputs), autocommit=True) as conn:
        enabled, = conn.execute("SELECT subenabled FROM pg_subscription WHERE subname = %s", (SUBSCRIPTION,)).fetchone()
        worker = conn.execute("SELECT count(*) FROM pg_stat_subscription WHERE subname = %s AND relid IS NULL "
                              "AND pid IS NOT NULL", (SUBSCRIPTION,)).fetchone()[0]
    return {"enabled": enabled, "worker": worker}


def assert_nothing_frozen(e: Env, app_url: str, formation: dict) -> None:
    """The app on the EC2 leader as before, not in maintenance, its workers running, the leader unfenced
    (a fresh session of the app's role writes), replication into Aurora enabled and applying."""
    app = e.sb.app()
    assert e.app_url() == app_url and not app.maintenance() and app.formation() == formation
    leader = e.sb.node(leader_name(e))
    assert leader.query("SELECT datconnlimit FROM pg_database WHERE datname = 'app'", database="app") == \
        [{"datconnlimit": -1}]
    with psycopg.connect(app_url, autocommit=True) as conn:
        assert conn.execute("SHOW default_transaction_read_only").fetchone()[0] == "off"
        ref = conn.execute("INSERT INTO orders (order_ref, channel, customer_email, status, total_cents) VALUES "
                           "(gen_random_uuid(), 'test', 'x@example.com', 'paid', 1) RETURNING order_ref::text"
                           ).fetchone()[0]
    deadline = time.monotonic() + 30
    while True:   # replication runs again: the write reaches Aurora
        with psycopg.connect(aurora_master_url(e.outputs), autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM orders WHERE order_ref = %s", (ref,)).fetchone():
                break
        assert time.monotonic() < deadline, "replication into Aurora did not resume"
        time.sleep(0.2)
    assert subscription(e) == {"enabled": True, "worker": 1}


def assert_standby_streams(e: Env) -> None:
    """The held standby was released, not rebuilt: it streams from the leader again, same timeline,
    no recovery target left, replay not paused and moving on."""
    leader = e.outputs.replica(leader_name(e))
    pg = e.sb.node(standby_name(e))
    probe = ("SELECT pg_last_wal_replay_lsn() - '0/0' AS replayed, pg_is_wal_replay_paused() AS paused, "
             "current_setting('recovery_target_lsn') AS target, "
             "(SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming') AS upstream, "
             "(SELECT received_tli FROM pg_stat_wal_receiver) AS tli")
    first = pg.query_one(probe)
    assert first["upstream"] == f"{leader.host}:{leader.port}" and first["tli"] == 2, first
    assert first["paused"] is False and first["target"] == "", first
    deadline = time.monotonic() + 15
    while pg.query_one(probe)["replayed"] <= first["replayed"]:
        assert time.monotonic() < deadline, "the released standby does not replay"
        time.sleep(0.2)


class WalWriter:
    """Writes WAL on the leader without touching the app's tables (logical messages, not published)."""

    def __init__(self, e: Env) -> None:
        self.url, self.stop = e.app_url(), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stop.is_set():
                conn.execute("SELECT pg_logical_emit_message(false, 'tern-test', repeat('x', 2000))")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def assert_refused(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, one line naming the reason, no traceback, nothing on stdout."""
    lines = [line for line in res.stderr.splitlines() if line.startswith("tern: error: ")]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-2000:]
    assert "refused, nothing changed" in lines[0], lines
    for needle in needles:
        assert needle in lines[0], lines
    assert res.stdout == ""
    return lines[0]


def test_status_then_preflight_refusals_then_a_run_verified_in_full(hop2):
    e = hop2
    # before replicate-aurora: status says so, and does not fail
    res = invoke(e, "status", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(res.stdout)["replication"]
    assert rep["state"] == "not set up" and "replicate-aurora" in rep["note"] and rep["tables"] == {}
    replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    time.sleep(1.0)

    # status: every table ready, lag from the leader's current LSN, apply against write rate
    res = invoke(e, "status", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(res.stdout)
    rep = data["replication"]
    assert rep["state"] == "streaming" and rep["leader"] == leader_name(e) and rep["enabled"] is True
    assert rep["tables"] and set(rep["tables"].values()) == {"r"}, rep["tables"]
    assert "public.orders" in rep["tables"] and rep["tables_ready"] == rep["tables_total"] == len(rep["tables"])
    assert rep["lag_bytes"] is not None and 0 <= rep["lag_bytes"] < 16 << 20
    assert rep["lag_seconds"] is not None and 0 <= rep["lag_seconds"] < 10
    assert rep["slot_active"] is True and rep["sample_seconds"] >= 1.5
    assert rep["write_bytes_per_second"] > 0 and rep["apply_bytes_per_second"] > 0   # the app writes throughout
    assert rep["headroom"] is not None and isinstance(rep["caught_up"], bool)
    aurora = next(n for n in data["nodes"] if n["kind"] == "aurora")
    assert aurora["lag_bytes"] == rep["lag_bytes"] and aurora["upstream"].endswith(
        f":{e.outputs.replica(leader_name(e)).port}")
    human = invoke(e, "status")
    assert human.returncode == 0 and "replication into Aurora (native, from" in human.stderr + human.stdout

    app_url, formation, standby = e.app_url(), e.sb.app().formation(), standby_name(e)
    # a table not synchronised (its copy restarted): refused, naming it
    aurora_sql(e, f"ALTER SUBSCRIPTION {SUBSCRIPTION} DISABLE")
    aurora_sql(e, "UPDATE pg_subscription_rel SET srsubstate = 'd' WHERE srrelid = 'public.stock_levels'::regclass")
    try:
        line = assert_refused(invoke(e, "failover-aurora", "--yes", "--json"), "public.stock_levels (copying)")
    finally:
        aurora_sql(e, "UPDATE pg_subscription_rel SET srsubstate = 'r' WHERE srrelid = 'public.stock_levels'::regclass")
        aurora_sql(e, f"ALTER SUBSCRIPTION {SUBSCRIPTION} ENABLE")
    assert "not every table is synchronised" in line
    run = Journal.load(e.root / "state" / "local", Journal.latest(e.root / "state" / "local", aurora_plan.KIND))
    assert run.outcome()[0] == "refused" and [s.name for s in run.steps()] == ["preflight"]

    # lag over the threshold while the leader writes: refused
    with WalWriter(e):
        line = assert_refused(invoke(e, "failover-aurora", "--yes", max_lag_bytes="1"), "threshold 1)")
    assert "bytes behind the leader" in line
    assert_nothing_frozen(e, app_url, formation)

    # the normal run: every row verified before the freeze, at one point, and equal
    report = failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert report["outcome"] == "completed", report["reason"]
    assert [s["name"] for s in report["steps"]] == aurora_plan.STEP_NAMES
    full = report["verification_full"]
    assert full["ok"] is True and full["differences"] == [] and full["standby"] == standby
    assert full["tables"] >= 7 and full["rows"] > 0 and full["seconds"] > 0
    assert full["standby_lsn"] == full["lsn"]      # held exactly after Aurora's last applied commit
    assert full["sequences_checked"] is False and full["released"]
    step = {s["name"]: s for s in report["steps"]}
    assert step["verify_full"]["started_at"] < step["stop_workers"]["started_at"]   # before the freeze
    assert report["write_unavailability"]["seconds"] is not None
    assert f":{e.outputs.aurora.port}/" in e.app_url()
    assert_nothing_lost(e, report)


def test_a_row_changed_on_aurora_only_refuses_before_freezing(hop2):
    e = hop2
    replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    time.sleep(1.0)
    app_url, formation = e.app_url(), e.sb.app().formation()
    # a change on Aurora that replication never carries (the app never updates warehouses)
    aurora_sql(e, "SET session_replication_role = replica; "
                  "UPDATE warehouses SET name = name || ' (changed on Aurora)' WHERE id = (SELECT min(id) FROM warehouses)")
    wid = e.sb.node("aurora").query("SELECT id FROM warehouses WHERE name LIKE '%(changed on Aurora)'",
                                    database=e.outputs.aurora.database)[0]["id"]
    with pytest.raises(StepError) as failed:
        failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
    report = failed.value.context["report"]
    assert report["outcome"] == "fell_back", report
    assert "public.warehouses" in report["reason"] and f"row (id={wid}) differs in name" in report["reason"]
    full = report["verification_full"]
    assert full["ok"] is False and full["standby"] == standby_name(e)
    assert full["differences"] == [f"public.warehouses: row (id={wid}) differs in name"]
    outcomes = {s["name"]: s["outcome"] for s in report["steps"]}
    assert outcomes == {"preflight": "done", "snapshot": "done", "verify_full": "reverted"}, outcomes   # released
    assert report["downtime"]["maintenance_at"] is None
    assert_standby_streams(e)
    assert_nothing_frozen(e, app_url, formation)
    # the row is still different on Aurora (tern repairs nothing behind the operator's back)
    assert e.sb.node("aurora").query(f"SELECT 1 FROM warehouses WHERE id = {int(wid)} AND name LIKE '%(changed on Aurora)'",
                                     database=e.outputs.aurora.database)
    assert_nothing_lost(e, report)


def test_an_error_during_the_full_verification_still_releases_everything(hop2, monkeypatch):
    from runbook.failover import consistent_point

    e = hop2
    replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    time.sleep(1.0)
    app_url, formation = e.app_url(), e.sb.app().formation()
    seen = {}

    def broken(*args, **kwargs):
        seen["subscription"] = subscription(e)     # Aurora stopped while the standby is held
        seen["target"] = e.sb.node(standby_name(e)).query_one(
            "SELECT current_setting('recovery_target_lsn') AS lsn, pg_is_wal_replay_paused() AS paused")
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(consistent_point, "run_verify", broken)
    with pytest.raises(StepError, match="the engine broke"):
        failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert seen["subscription"] == {"enabled": False, "worker": 0}
    assert seen["target"]["lsn"] != "" and seen["target"]["paused"] is True
    assert_standby_streams(e)
    assert_nothing_frozen(e, app_url, formation)

    # no standby to hold: refused before anything (exit 2) - unless the setting allows going without
    standby = standby_name(e)
    e.sb.node(standby).stop()
    assert_refused(invoke(e, "failover-aurora", "--yes"), f"no EC2 standby streams from {leader_name(e)}")
    assert_nothing_frozen(e, app_url, formation)
    report = failover_aurora(e.outputs, e.settings.replace(full_verification="skip"), confirm=lambda q: True)
    assert report["outcome"] == "completed", report["reason"]
    full = report["verification_full"]
    assert full["ok"] is None and "skip" in full["note"] and "no EC2 standby streams" in full["note"]
    assert_nothing_lost(e, report)
