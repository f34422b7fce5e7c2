"""Repoint against real PostgreSQL: a slow replica is waited for, never wiped on a timer; one past the
fork point is rebuilt and reported; one not following by the deadline fails the run and loses its slot."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from runbook.contract import load
from runbook.errors import StepError
from runbook.failover import ec2
from runbook.failover.repoint import parse_history, slot_name
from runbook.failover.run import failover_ec2
from runbook.pg import lsn_to_int
from runbook.restore import restore_all
from runbook.sandbox import Sandbox
from runbook.settings import Settings
from runbook.status import replica_host, replica_status
from tests.conftest import make_root

pytestmark = pytest.mark.functional

MARK = "tern-test-not-rebuilt"   # a file in the data directory: a rebuild (a copy of the leader) has none


@pytest.fixture
def env():
    root = make_root()
    sb = Sandbox(root / "sandbox")
    sb.up(replicas=2, scale=1, rate=50)
    outputs = load("local", sb.root)
    restore_all(outputs, timeout=120, connect_timeout=5)
    time.sleep(1.5)
    yield SimpleNamespace(root=root, sb=sb, outputs=outputs)
    sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


def settings(env, **kw) -> Settings:
    # no witness: holding a replica at the final LSN for the full verification makes it unable to
    # follow (it is rebuilt); these tests are about replicas that can
    return Settings(sandbox_dir=env.sb.root, state_dir=env.root / "state", catchup_timeout=30,
                    full_verification="skip", **kw)


def failover(env, s: Settings, hooks=None):
    return failover_ec2(env.outputs, s, confirm=lambda q: True, hooks=hooks or {})


def mark(ctx, name: str) -> Path:
    pg = ctx.pg(name)
    pg.host.write_file(f"{pg.data_dir}/{MARK}", "this data directory was never removed\n")
    return Path(pg.data_dir) / MARK


def block_replication(ctx):
    """The new leader refuses replication connections (as a security group not opened yet would);
    returns the function that lets them in again."""
    leader = ctx.pg(ctx.data["candidate"])
    row = leader.query_one("SELECT current_setting('hba_file') AS f, current_setting('ssl') AS ssl")
    hba = row["f"]
    original = leader.host.read_file(hba)
    refuse = "host replication all 127.0.0.1/32 reject\n"
    leader.host.write_file(hba, refuse + (refuse.replace("host ", "hostssl ") if row["ssl"] == "on" else "")
                           + original)
    leader.psql("SELECT pg_reload_conf()")

    def unblock():
        leader.host.write_file(hba, original)
        leader.psql("SELECT pg_reload_conf()")

    return unblock


def repoint_step(report):
    return next(s for s in report["steps"] if s["name"] == "repoint")


def follows(env, name: str, leader: str) -> dict:
    r = env.outputs.replica(leader)
    deadline = time.monotonic() + 30
    while True:
        status = replica_status(env.outputs.replica(name), None)
        if status["upstream"] == f"{r.host}:{r.port}" or time.monotonic() > deadline:
            return status
        time.sleep(0.2)


def test_a_slow_replica_is_waited_for_and_never_rebuilt(env):
    """Replication is refused for 8 s - the old repoint wiped and rebuilt the replica after 3 s."""
    seen = {}

    def slow(ctx):
        seen["other"] = other = ctx.data["others"][0]
        seen["mark"] = mark(ctx, other)
        threading.Timer(8.0, block_replication(ctx)).start()

    report = failover(env, settings(env, repoint_timeout=60), {"before:repoint": slow})
    assert report["outcome"] == "completed", report
    step = repoint_step(report)
    assert step["seconds"] >= 7, step           # it really could not stream for those seconds
    other, leader = seen["other"], report["new_leader"]
    assert seen["mark"].exists(), step["detail"]   # the same data directory: not rebuilt
    assert "rebuilt" not in step["detail"] and f"{other}: streaming on timeline 2" in step["detail"]
    status = follows(env, other, leader)
    assert status["role"] == "standby" and status["timeline"] == 2, status


def test_a_replica_not_following_by_the_deadline_fails_the_run_keeps_its_data_and_loses_its_slot(env):
    seen = {}

    def refused(ctx):
        seen["other"] = other = ctx.data["others"][0]
        seen["mark"] = mark(ctx, other)
        seen["unblock"] = block_replication(ctx)

    with pytest.raises(StepError) as exc:
        failover(env, settings(env, repoint_timeout=4), {"before:repoint": refused})
    other = seen["other"]
    assert exc.value.exit_code == 1
    assert f"{other}: NOT following yet after 4s" in str(exc.value), str(exc.value)
    assert "run the same command again" in str(exc.value)
    report = exc.value.context["report"]
    assert report["outcome"] != "completed" and other in report["repoint_failures"]
    assert seen["mark"].exists()                  # its data is kept
    lpg = replica_host(env.outputs.replica(report["new_leader"]))
    assert not lpg.query(f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot_name(other)}'")
    assert lpg.query_one("SELECT current_setting('max_slot_wal_keep_size') AS v")["v"] == "8GB"
    # the leader lets it in: running again resumes the repoint only, and it follows with its own data
    seen["unblock"]()
    again = failover(env, settings(env, repoint_timeout=60))
    assert again["outcome"] == "completed" and again["repoint_failures"] == {}
    assert seen["mark"].exists()
    assert lpg.query(f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot_name(other)}' AND active")


def test_a_replica_past_the_fork_point_is_rebuilt_and_reported(env):
    """The other replica replays the old timeline past the point where the new leader's began: it
    provably cannot follow, and is rebuilt at once from the new leader."""
    seen = {}

    def past_the_fork(ctx):
        seen["other"] = other = ctx.data["others"][0]
        seen["mark"] = mark(ctx, other)
        leader = ctx.pg(ctx.data["candidate"])
        history = leader.query_one("SELECT pg_read_file('pg_wal/00000002.history') AS h")["h"]
        fork = parse_history(history)[-1][1]
        # the old source writes on: what the new leader never had
        env.sb.node("source").psql("SET default_transaction_read_only = off;\n"
                                   "CREATE TABLE after_the_fork AS SELECT 1 AS x;\nSELECT pg_switch_wal();")
        ec2.attach_to_archive(ctx, other)
        pg = ctx.pg(other)
        deadline = time.monotonic() + 60
        while (lsn_to_int(pg.query_one("SELECT pg_last_wal_replay_lsn()::text AS l")["l"]) or 0) <= fork:
            assert time.monotonic() < deadline, "the replica did not replay past the fork point"
            time.sleep(0.2)
        pg.psql("ALTER SYSTEM SET restore_command = '';\nSELECT pg_reload_conf();")

    report = failover(env, settings(env, repoint_timeout=60), {"before:repoint": past_the_fork})
    assert report["outcome"] == "completed", report
    other, detail = seen["other"], repoint_step(report)["detail"]
    assert f"{other}: rebuilt: was at " in detail and " past the fork point " in detail, detail
    assert "streaming on timeline 2" in detail
    assert not seen["mark"].exists()               # a copy of the leader now
    status = follows(env, other, report["new_leader"])
    assert status["role"] == "standby" and status["timeline"] == 2, status
