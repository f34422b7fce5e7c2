"""Both failovers through PgBouncer (``--switch pooler``, issue #12), against real PostgreSQL and a real
PgBouncer: no dyno restart at the switch, clients held rather than refused, and the faults the issue names -
the pooler down, a transaction that holds PAUSE, a wrong admin password - with the ledger counting every
acknowledged write."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time

import psycopg
import pytest

from runbook import pooler as pooler_mod
from runbook.errors import ConfigError, DatabaseError, StepError
from runbook.failover import aurora as aurora_plan
from runbook.failover import ec2
from runbook.failover.run import failover_aurora
from runbook.journal import Journal
from runbook.replication.setup import replicate_aurora
from tests.conftest import make_root
from tests.functional.test_failover_ec2 import Env, assert_nothing_lost

pytestmark = pytest.mark.functional

BOOT = 4.0   # the dynos' boot after a config-var change: a url switch would show it, the pooler must not


@pytest.fixture
def env():
    root = make_root()
    e = Env(root, pooler=True)
    # the runs where `invoke ... --stack local` (e.invoke) keeps them too: <state_dir>/local
    e.settings = dataclasses.replace(e.settings, switch_mode="pooler", pause_timeout=3.0,
                                     state_dir=root / "state" / "local")
    e.sb.app().set_boot_seconds(BOOT)
    e.restore()
    yield e
    e.sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


def pooler_target(e: Env) -> str:
    return str(pooler_mod.current_target(e.outputs.pooler))


def test_both_hops_through_the_pooler_hold_clients_and_restart_nothing(env):
    e = env
    report = e.failover()
    assert report["outcome"] == "completed", report.get("reason")
    assert [s["name"] for s in report["steps"]] == ec2.POOLER_STEP_NAMES and report["switch_mode"] == "pooler"
    p = e.outputs.pooler
    leader = e.outputs.replica(report["new_leader"])
    assert pooler_mod.points_at_pooler(p, e.app_url())                  # DATABASE_URL names the pooler, once
    assert pooler_target(e) == f"{leader.host}:{leader.port}/app"
    w, d = report["write_unavailability"], report["database_unavailability"]
    # the switch restarted nothing (counted from the dynos' logs, not timed: a loaded machine stretches any gap):
    # the one restart is pooler_in's, before the window; and the clients were held, not refused
    assert w["seconds"] is not None, w
    assert len([ln for ln in _app_logs(e, "web.1") if "booting (restart)" in ln]) == 1
    assert d["seconds"] is not None and d["seconds"] <= w["seconds"] + 0.5, (d, w)
    assert report["client_errors"] == 0 and report["longest_held_query_seconds"] > 0.05, report
    assert report["missing_on_target"] == 0
    from runbook.status import gather            # invoke status shows the pooler: its target, pools, waiting clients

    shown = gather(e.outputs, timeout=5, sample_seconds=0.2)["pooler"]
    assert shown["app_uses_it"] is True and shown["nodes"][0]["target"] == f"{leader.host}:{leader.port}/app"
    assert shown["nodes"][0]["paused"] is False and shown["nodes"][0]["clients_waiting"] == 0
    # the sandbox's pooler admitted tern_admin only, as on AWS: pooler_auth put the app role's verifier (read on
    # a replica) in its auth file, and nothing tern keeps holds it
    auth = next(s for s in report["steps"] if s["name"] == "pooler_auth")
    assert auth["outcome"] == "done" and "pooler-a: app's verifier written in" in auth["detail"], auth
    secret = e.sb.node("source").query_one("SELECT rolpassword AS v FROM pg_authid WHERE rolname = 'app'")["v"]
    assert f'"app" "{secret}"' in open(p.nodes[0].auth_file).read()
    # running failover-ec2 again: the completed pooler-mode hop 1 is recognised (not run against the sealed source)
    again = e.invoke("failover-ec2", "--yes", "--json")
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr[-1500:]
    assert json.loads(again.stdout[again.stdout.index("{"):])["run_id"] == report["run_id"]
    for path in (e.root / "state").rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path

    time.sleep(1.0)
    setup = replicate_aurora(e.outputs, e.settings, replica_identity_full=True)
    assert setup["outcome"] == "completed"
    time.sleep(1.5)
    hop2 = failover_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert hop2["outcome"] == "completed", hop2.get("reason")
    assert [s["name"] for s in hop2["steps"]] == aurora_plan.POOLER_STEP_NAMES
    a = e.outputs.aurora
    assert pooler_target(e) == f"{a.writer_endpoint}:{a.port}/{a.database}"
    assert pooler_mod.points_at_pooler(p, e.app_url())                  # no config-var change at hop 2
    w2 = hop2["write_unavailability"]
    assert w2["seconds"] is not None and hop2["client_errors"] == 0, hop2
    # no restart at hop 2: no config-var change, so no dyno booted again after hop 1's pooler_in
    # and back: rollback-aurora through the pooler too, to the EC2 leader failover-aurora's journal names
    from runbook.failover import rollback as rollback_plan
    from runbook.failover.run import rollback_aurora

    time.sleep(1.5)
    back = rollback_aurora(e.outputs, e.settings, confirm=lambda q: True)
    assert back["outcome"] == "completed", back.get("reason")
    assert [s["name"] for s in back["steps"]] == rollback_plan.POOLER_STEP_NAMES
    assert pooler_target(e) == f"{leader.host}:{leader.port}/app" and pooler_mod.points_at_pooler(p, e.app_url())
    assert back["client_errors"] == 0 and back["write_unavailability"]["seconds"] is not None, back
    restarts = [ln for ln in _app_logs(e, "web.1") if "booting (restart)" in ln]
    assert len(restarts) == 1, restarts         # once, at pooler_in (hop 1, before the window), never at a switch
    assert_nothing_lost(e, back)


def _app_logs(e: Env, dyno: str) -> list[str]:
    with open(os.path.join(e.outputs.app.state_dir, "logs", f"{dyno}.log"), errors="replace") as fh:
        return fh.read().splitlines()


def test_a_transaction_that_holds_pause_past_its_bound_falls_back_and_loses_nothing(env):
    e = env
    held = {}

    def open_a_transaction(ctx):
        conn = psycopg.connect(pooler_mod.app_url(e.outputs.pooler, ctx.source_url()), autocommit=False,
                               prepare_threshold=None)
        conn.execute("INSERT INTO warehouses (code, name, region) VALUES ('HOLD', 'held', 'x')")
        held["conn"] = conn                      # BEGIN ... still open: PAUSE waits for it

    t0 = time.monotonic()
    with pytest.raises(StepError, match="PAUSE app did not finish within 3s") as caught:
        e.failover(hooks={"before:pause": open_a_transaction})
    assert time.monotonic() - t0 < 120
    report = caught.value.context["report"]
    assert report["outcome"] == "fell_back"
    held["conn"].commit()                        # the pooler was resumed: it commits, on the source
    # the held client still used the pooler as the app's role when the fallback ran: the role's line stayed
    # (cutting a live client off is worse than a harmless line), and the journal says so
    kept = [ev["context"]["pooler_auth_kept"] for ev in Journal.load(e.settings.state_dir, report["run_id"]).events
            if "pooler_auth_kept" in (ev.get("context") or {})]
    assert kept and "line kept" in kept[-1], kept
    held["conn"].close()
    source = e.sb.node("source")
    assert pooler_target(e) == f"127.0.0.1:{source.port}/app"          # still the source
    assert source.query("SELECT 1 FROM warehouses WHERE code = 'HOLD'", database="app")
    assert not any(a.paused("app") for a in pooler_mod.admins(e.outputs.pooler, 5))
    # pooler_in reverted: the app writes on the source directly (through the pooler its role still logs in:
    # the kept line, see above; test_pooler.py covers the line's removal once no client is left)
    source_url = e.app_url()
    assert not pooler_mod.points_at_pooler(e.outputs.pooler, source_url)
    pooler_mod.check_app_login(e.outputs.pooler, pooler_mod.app_url(e.outputs.pooler, source_url), timeout=5)
    time.sleep(1.5)                             # the app writes again, on the source
    assert_nothing_lost(e)


def test_a_wrong_admin_password_changes_nothing_and_the_pooler_down_before_the_point_of_no_return_falls_back(
        env, monkeypatch):
    """One sandbox for both (each sandbox costs half a minute): a wrong admin password is refused at preflight
    with nothing changed; then the pooler dies just before PAUSE: the run falls back."""
    e = env
    monkeypatch.setenv("TERN_TEST_WRONG_ADMIN", "not-the-password")
    wrong = e.outputs.model_copy(update={"pooler": e.outputs.pooler.model_copy(
        update={"admin_password": "env:TERN_TEST_WRONG_ADMIN"})})
    before = e.app_url()
    from runbook.failover.run import failover_ec2

    with pytest.raises(StepError, match="admin console") as caught:
        failover_ec2(wrong, e.settings, confirm=lambda q: True)
    assert "not-the-password" not in str(caught.value)
    journal = Journal.load(e.settings.state_dir, Journal.latest(e.settings.state_dir))
    assert [s.name for s in journal.steps() if s.outcome == "done"] == []
    assert e.app_url() == before                  # the app was not moved onto the pooler

    def pooler_dies(ctx):
        e.sb.stop_pooler(timeout=0)

    with pytest.raises(StepError) as caught:
        e.failover(hooks={"before:pause": pooler_dies})
    report = caught.value.context["report"]
    assert report["outcome"] == "fell_back", report.get("reason")
    assert "admin console" in report["reason"]
    e.sb.start_pooler()                          # the operator brings it back: the app writes on the source again
    time.sleep(BOOT / 2)
    assert_nothing_lost(e)


def test_asking_for_the_pooler_without_one_is_bad_input(tmp_root):
    from runbook.failover.pooler_switch import choose
    from runbook.settings import Settings

    e = Env(tmp_root)                            # no pooler in this sandbox
    try:
        with pytest.raises(ConfigError, match="declare no pooler"):
            choose(Settings(switch_mode="pooler"), e.outputs)
        assert choose(Settings(), e.outputs) == "url"
    finally:
        e.sb.down(check_ledger=False)


def test_the_pooler_down_after_the_point_of_no_return_stops_with_a_clear_message_and_resumes(env):
    e = env

    def pooler_dies(ctx):
        e.sb.stop_pooler(timeout=0)

    with pytest.raises(StepError, match="after the point of no return") as caught:
        e.failover(hooks={"before:switch": pooler_dies})
    assert "admin console" in str(caught.value)
    e.sb.start_pooler()                          # the operator brings the pooler back and runs the same command
    report = e.failover()
    assert report["outcome"] == "completed", report.get("reason")
    leader = e.outputs.replica(report["new_leader"])
    assert pooler_target(e) == f"{leader.host}:{leader.port}/app"
    time.sleep(1.0)
    assert_nothing_lost(e, report)
