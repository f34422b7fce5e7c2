"""Hop 1 (Heroku -> EC2) against real PostgreSQL: the happy path, faults and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest

from runbook.contract import load
from runbook.errors import ContractError, StepError
from runbook.failover import ec2
from runbook.failover.run import failover_ec2
from runbook.journal import Journal
from runbook.restore import restore_all
from runbook.sandbox import Sandbox
from runbook.settings import Settings
from runbook.steps import FAULT_KILL_AFTER
from tests.conftest import make_root, run_invoke, subset

pytestmark = pytest.mark.functional


class Env:
    def __init__(self, root: Path, rate: float = 100, pooler: bool = False) -> None:
        self.root = root
        self.sb = Sandbox(root / "sandbox")
        self.sb.up(replicas=2, scale=1, rate=rate, pooler=pooler)
        self.outputs = load("local", self.sb.root)
        self.settings = Settings(sandbox_dir=self.sb.root, state_dir=root / "state", catchup_timeout=30,
                                 repoint_timeout=30)

    def restore(self):
        restore_all(self.outputs, timeout=120, connect_timeout=5)
        time.sleep(1.5)

    def failover(self, **kw):
        kw.setdefault("confirm", lambda q: True)
        return failover_ec2(self.outputs, self.settings, **kw)

    def invoke(self, *args, env=None):
        return run_invoke(*args, sandbox_dir=self.sb.root, state_dir=self.root / "state")

    def app_url(self):
        return self.sb.app().config_var("DATABASE_URL")


@pytest.fixture
def env():
    root = make_root()
    e = Env(root)
    e.restore()
    yield e
    e.sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


def assert_nothing_lost(e: Env, report: dict | None = None):
    result = e.sb.check_ledger_after_stop()
    assert result["acknowledged"] > 0
    assert result["missing"] == 0, result
    assert result["unexplained"] == 0, result
    if report is not None:
        assert report["missing_on_target"] == 0


def test_failover_end_to_end_and_stale_connection_cannot_write(env):
    stale = psycopg.connect(env.app_url(), autocommit=True)
    stale.execute("SELECT 1")
    source_url = env.app_url()
    res = env.invoke("failover-ec2", "--yes", "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout[res.stdout.index("{"):])
    assert report["outcome"] == "completed"
    assert [s["name"] for s in report["steps"]] == ec2.STEP_NAMES
    assert all(s["outcome"] in ("done", "skipped") for s in report["steps"])
    assert report["missing_on_target"] == 0 and report["acknowledged_writes"] > 0
    assert report["write_unavailability"]["seconds"] is not None
    assert report["verification"]["ok"] is True
    leader = env.outputs.replica(report["new_leader"])
    assert env.app_url() != source_url and f":{leader.port}/" in env.app_url()
    # the stale pooled connection was terminated by the fence; a new one is refused (the source is sealed)
    with pytest.raises(psycopg.OperationalError):
        stale.execute("INSERT INTO audit_events (actor, payload) VALUES ('stale', '{}')")
    with pytest.raises(psycopg.OperationalError, match="too many connections"):
        psycopg.connect(source_url, autocommit=True)
    # the other replica follows the new leader on the new timeline
    status = json.loads(env.invoke("status", "--json").stdout)
    source = next(n for n in status["nodes"] if n["kind"] == "source")
    assert source["fenced"] is True and source["current_app_target"] is False
    other = next(n for n in status["nodes"] if n["kind"] == "ec2" and n["name"] != report["new_leader"])
    assert other["role"] == "standby" and other["timeline"] == 2
    assert other["upstream"] == f"{leader.host}:{leader.port}"
    # running it again is a no-op on a completed migration
    again = env.invoke("failover-ec2", "--yes", "--json")
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr[-1500:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["run_id"] == report["run_id"]
    assert_nothing_lost(env, report)
    # no secret anywhere in the journal or report
    secrets = json.loads(env.sb.secrets_file.read_text()).values()
    for path in (env.root / "state").rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert not any(s in text for s in secrets), path


def test_candidate_killed_during_catch_up_picks_the_other(env):
    killed = {}

    def kill_candidate(ctx):
        name = ctx.data["candidate"]
        killed["name"] = name
        ctx.pg(name).kill()

    report = env.failover(hooks={"before:flush": kill_candidate})
    assert report["outcome"] == "completed"
    assert report["new_leader"] != killed["name"]
    assert_nothing_lost(env, report)


def test_burst_just_before_the_freeze_loses_nothing(env):
    def burst(ctx):
        env.sb.app().set_load(burst_factor=5, burst_seconds=3)
        time.sleep(1.0)

    report = env.failover(hooks={"before:stop_workers": burst})
    assert report["outcome"] == "completed"
    assert_nothing_lost(env, report)


@pytest.mark.parametrize("step", ["fence", "flush"])
def test_source_unreachable_falls_back_to_the_source(env, step):
    source = env.sb.node("source")

    def outage(ctx):
        source.stop(mode="immediate")
        threading.Timer(4.0, lambda: source.start(timeout=60)).start()

    source_url = env.app_url()
    with pytest.raises(StepError, match="fell back"):
        env.failover(hooks={f"before:{step}": outage})
    journal = Journal.load(env.settings.state_dir, Journal.latest(env.settings.state_dir))
    assert journal.outcome()[0] == "fell_back"
    source.wait_ready(timeout=60)
    app = env.sb.app()
    assert app.config_var("DATABASE_URL") == source_url and not app.maintenance()
    assert app.running() == {"web": 1, "worker": 1}
    t0 = time.time()
    deadline = time.monotonic() + 20
    from runbook.workload import ledger

    while not [e for e in ledger.read(env.sb.app_dir) if e.ev == "ack" and e.ts > t0 and e.dyno.startswith("web")]:
        assert time.monotonic() < deadline, "the app did not write on the source again"
        time.sleep(0.1)
    assert_nothing_lost(env)


def test_bad_input_changes_nothing(env):
    before = env.sb.app().config_var("DATABASE_URL")
    with pytest.raises(ContractError, match="unknown replica 'ec2-z'"):
        env.failover(candidate="ec2-z")
    res = env.invoke("failover-ec2", "--candidate", "ec2-z", "--yes")
    assert res.returncode == 2 and "unknown replica 'ec2-z'" in res.stderr
    tight = Settings(sandbox_dir=env.sb.root, state_dir=env.root / "state2", max_lag_bytes=-1)
    with pytest.raises(StepError, match="no replica is ready"):
        failover_ec2(env.outputs, tight, confirm=lambda q: True)
    app = env.sb.app()
    assert app.config_var("DATABASE_URL") == before and not app.maintenance()
    assert app.running() == {"web": 1, "worker": 1}
    # without --yes and without a terminal, the point of no return is refused - and it falls back
    res = env.invoke("failover-ec2")
    assert res.returncode != 0 and "needs confirmation" in res.stderr
    assert app.config_var("DATABASE_URL") == before and not app.maintenance()
    assert_nothing_lost(env)


def test_restore_refuses_missing_archive_and_version_mismatch(tmp_root):
    e = Env(tmp_root)
    try:
        wal = e.sb.archive / "wal"
        wal.rename(e.sb.archive / "wal.moved")
        res = e.invoke("restore")
        assert res.returncode != 0 and "WAL archive" in res.stderr and "missing" in res.stderr
        assert not any((e.sb.root / "nodes" / r.name / "data" / "PG_VERSION").exists() for r in e.outputs.replicas)
        (e.sb.archive / "wal.moved").rename(wal)
        data = json.loads(e.sb.outputs_file.read_text())
        data["source"]["pg_major"] = 14
        e.sb.outputs_file.write_text(json.dumps(data))
        res = e.invoke("restore")
        assert res.returncode != 0 and "major versions differ" in res.stderr
        data["source"]["pg_major"] = e.sb.state()["pg_major"]
        e.sb.outputs_file.write_text(json.dumps(data))
        res = e.invoke("restore")
        assert res.returncode == 0, res.stderr
        res = e.invoke("restore")  # idempotent
        assert res.returncode == 0 and "already restored and running" in res.stderr
        dry = e.invoke("failover-ec2", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        plan = json.loads(dry.stdout)
        assert [r["step"] for r in plan["plan"]] == ec2.STEP_NAMES and plan["candidate"] in ("ec2-a", "ec2-b")
        assert not (tmp_root / "state" / "runs").exists()
    finally:
        e.sb.down(check_ledger=False)


@pytest.mark.parametrize("step", subset(ec2.STEP_NAMES, {"promote"}))
def test_killed_after_each_step_resumes_and_loses_nothing(env, step):
    env_vars = dict(os.environ, **{FAULT_KILL_AFTER: step})
    import subprocess
    import sys

    invoke = str(Path(sys.executable).with_name("invoke"))
    env_vars["INVOKE_TERN_SANDBOX_DIR"] = str(env.sb.root)
    env_vars["INVOKE_TERN_STATE_DIR"] = str(env.root / "state")
    first = subprocess.run([invoke, "failover-ec2", "--yes"], cwd=Path(__file__).resolve().parents[2],
                           env=env_vars, capture_output=True, text=True, timeout=300)
    assert first.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), first.stderr[-2000:]
    second = env.invoke("failover-ec2", "--yes", "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming run" in second.stderr
    report = json.loads(second.stdout[second.stdout.index("{"):])
    assert report["outcome"] == "completed"
    assert_nothing_lost(env, report)


@pytest.mark.parametrize("delay", [0.5, 1.2, 2.0])
def test_killed_at_an_arbitrary_moment_resumes_and_loses_nothing(env, delay):
    """Not at a step boundary: SIGKILL the whole process group after ``delay`` seconds, wherever it is."""
    import subprocess
    import sys

    env_vars = dict(os.environ, INVOKE_TERN_SANDBOX_DIR=str(env.sb.root), INVOKE_TERN_STATE_DIR=str(env.root / "state"))
    invoke = str(Path(sys.executable).with_name("invoke"))
    proc = subprocess.Popen([invoke, "failover-ec2", "--yes"], cwd=Path(__file__).resolve().parents[2], env=env_vars,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    second = env.invoke("failover-ec2", "--yes", "--json")
    if second.returncode != 0 and "no replica is ready" in second.stderr:
        pytest.fail(f"the first run had finished or left no resumable run: {second.stderr[-1500:]}")
    assert second.returncode == 0, second.stderr[-3000:]
    report = json.loads(second.stdout[second.stdout.index("{"):])
    assert report["outcome"] == "completed"
    assert_nothing_lost(env, report)


def test_crash_inside_promote_resumes_with_the_leaders_context(env):
    """The server was promoted but the run died before journaling it: the resumed run must still
    record the new leader (a regression found by the arbitrary-kill test)."""
    first = {}

    def promote_then_die(ctx):
        ctx.journal.record("promote", "start")
        first.update(ec2.promote(ctx))   # the whole act ran ...
        time.sleep(0.5)                   # (a resumed run is later: its own moment would differ)
        raise KeyboardInterrupt          # ... and the process died before journaling it

    with pytest.raises(KeyboardInterrupt):
        env.failover(hooks={"before:promote": promote_then_die})
    report = env.failover()
    assert report["outcome"] == "completed" and report["new_leader"]
    assert not report["repoint_failures"]
    # the moment of the promotion is the first run's, not the resumed run's (windows and reports use it)
    assert report["database_unavailability"]["writable_at"] == first["promoted_at"]
    assert_nothing_lost(env, report)
