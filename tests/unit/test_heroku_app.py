"""The Heroku adapter against the Heroku stand-in (runbook/standins/heroku.py), as strict as Heroku's docs."""

from __future__ import annotations

import logging
import signal
import time

import pytest

from runbook.adapters.heroku_app import HerokuApiError, HerokuApp
from runbook.contract import parse
from runbook.errors import ConfigError, RunbookError, TimeoutExpired, VerificationError
from runbook.failover.context import Context
from runbook.failover.ec2 import plan
from runbook.settings import Settings
from runbook.standins.heroku import HerokuStandIn, MemoryBackend, endpoint

SOURCE_URL = "postgres://u:heroku-db-secret@ec2-1.compute-1.amazonaws.com:5432/d"
LEADER_URL = "postgres://u:heroku-db-secret@10.0.1.10:5432/d?sslmode=require"   # replicas take TLS only
KEY = "heroku-api-key-123456"


def make_standin(*, ignore_sigterm=(), crash_on_boot=(), **kw) -> HerokuStandIn:
    backend = MemoryBackend({"LANG": "en_US.UTF-8", "DATABASE_URL": SOURCE_URL}, {"web": 2, "worker": 3},
                            ignore_sigterm=ignore_sigterm, crash_on_boot=crash_on_boot)
    kw.setdefault("boot_seconds", 0.05)
    kw.setdefault("grace_seconds", 0.3)
    return HerokuStandIn(backend, key=KEY, attachments=("DATABASE", "HEROKU_POSTGRESQL_RED"), **kw)


@pytest.fixture
def stub(monkeypatch):
    with make_standin() as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.key)
        yield s


def app_for(stub, **kw) -> HerokuApp:
    """The adapter told the stand-in's grace; its sleeps are recorded (and slept, capped: tests stay fast)."""
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        time.sleep(min(seconds, 0.02))

    kw.setdefault("read_back", stub.backend.read_back)
    kw.setdefault("stop_grace", stub.grace_seconds)
    kw.setdefault("stop_margin", 0.5)
    kw.setdefault("poll_interval", 0.02)
    kw.setdefault("sleep", sleep)
    app = HerokuApp(stub.app, api_key_ref="env:HEROKU_API_KEY", base_url=stub.url, **kw)
    app.sleeps = sleeps
    return app


def wait_for(probe, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_config_vars_and_database_url_swap_keeps_the_addon_attached(stub):
    app = app_for(stub)
    old = app.config_var("DATABASE_URL")
    assert old.startswith("postgres://")
    app.set_config_vars({"DATABASE_URL": "postgresql://app:new@10.0.1.10:5432/app", "TERN_SOURCE_DATABASE_URL": old,
                         "OBSOLETE": None})
    assert app.config_var("DATABASE_URL") == "postgresql://app:new@10.0.1.10:5432/app"
    assert app.config_var("TERN_SOURCE_DATABASE_URL") == old
    names = [a["name"] for a in stub.attachments]
    assert "DATABASE" not in names and "HEROKU_POSTGRESQL_RED" in names   # the add-on is never orphaned
    app.set_config_vars({"DATABASE_URL": "postgresql://app:new2@10.0.1.11:5432/app"})   # idempotent detach
    assert app.config_var("DATABASE_URL").endswith("10.0.1.11:5432/app")
    assert stub.refused == []


def test_attaches_under_another_name_when_database_is_the_only_attachment(stub):
    stub.detach([a for a in stub.attachments if a["name"] == "HEROKU_POSTGRESQL_RED"][0])
    app = app_for(stub)
    app.set_config_vars({"DATABASE_URL": "postgresql://x:y@h:5432/d", "TERN_SOURCE_DATABASE_URL": SOURCE_URL})
    assert [a["name"] for a in stub.attachments] == ["TERN_HEROKU_SOURCE"]
    assert stub.config["TERN_HEROKU_SOURCE_URL"] == SOURCE_URL
    assert app.config_var("TERN_SOURCE_DATABASE_URL") == SOURCE_URL and stub.refused == []


def test_stub_refuses_every_attachment_owned_var_as_heroku_does(stub):
    app = app_for(stub)
    patch = f"/apps/{stub.app}/config-vars"
    with pytest.raises(HerokuApiError, match="Cannot overwrite attachment values HEROKU_POSTGRESQL_RED_URL") as exc:
        app.request("PATCH", patch, {"HEROKU_POSTGRESQL_RED_URL": "postgres://x:y@h/d", "OTHER": "1"})
    assert exc.value.status == 422 and "OTHER" not in stub.config   # refused as a whole
    with pytest.raises(HerokuApiError, match="422"):
        app.request("PATCH", patch, {"DATABASE_URL": None})                # deleting is writing too
    # re-attaching moves ownership: the new name's var is owned, the old one's is free once detached
    created = app.request("POST", "/addon-attachments", {"addon": stub.addon, "app": stub.app,
                                                         "name": "TERN_SOURCE_DATABASE", "confirm": stub.app})
    with pytest.raises(HerokuApiError, match="TERN_SOURCE_DATABASE_URL"):
        app.request("PATCH", patch, {"TERN_SOURCE_DATABASE_URL": "postgres://x:y@h/d"})
    app.request("DELETE", f"/addon-attachments/{created['id']}")
    app.request("PATCH", patch, {"TERN_SOURCE_DATABASE_URL": "postgres://x:y@h/d"})
    assert stub.refused == [["HEROKU_POSTGRESQL_RED_URL"], ["DATABASE_URL"], ["TERN_SOURCE_DATABASE_URL"]]
    assert stub.restarts == 3   # attach, detach, one effective PATCH; refused PATCHes restart nothing


# -- the switch, as the failover plan runs it after the promotion --------------------------
OUTPUTS = {
    "schema_version": 1, "stack": "dev", "rehearsal": True, "region": "us-east-1",
    "source": {"heroku_app": "shop", "archive": {"kind": "s3", "location": "s3://bucket/wal"}, "pg_major": 15},
    "app": {"kind": "heroku", "name": "shop", "api_key": "env:HEROKU_API_KEY"},
    "replicas": [
        {"name": "ec2-a", "availability_zone": "us-east-1a", "host": "10.0.1.10", "database": "d",
         "data_dir": "/var/lib/postgresql/15/main", "bin_dir": "/usr/lib/postgresql/15/bin",
         "socket_dir": "/var/run/postgresql", "commands": {"kind": "ssm", "instance_id": "i-123"}},
    ],
    "aurora": {"writer_endpoint": "w", "reader_endpoint": "r", "database": "d", "master_user": "m",
               "master_password": "aws-secretsmanager:arn:aws:secretsmanager:us-east-1:1:secret:x"},
    "credentials": {"replication_password": "aws-secretsmanager:arn:x#replication"},
}


def failover_ctx(app: HerokuApp) -> Context:
    return Context(outputs=parse(OUTPUTS), settings=Settings(), app=app, journal=None,
                   data={"candidate": "ec2-a", "formation": app.formation()})


def run_steps(ctx: Context, *names: str) -> dict[str, dict]:
    """The plan's own steps, as the runner runs them: act unless the check says done, then verify."""
    steps = {s.name: s for s in plan()}
    results = {}
    for name in names:
        step = steps[name]
        if step.check is not None and step.check(ctx):
            continue
        results[name] = step.act(ctx) or {}
        if step.verify:
            step.verify(ctx)
        ctx.data.update(results[name])
    return results


def assert_switched(stub, ctx) -> None:
    config = stub.config
    assert config["DATABASE_URL"] == LEADER_URL
    assert config["TERN_SOURCE_DATABASE_URL"] == SOURCE_URL      # the rollback URL, under a name no attachment owns
    assert "TERN_SOURCE_DATABASE_URL" not in stub.owned()
    assert stub.owned() and all(config[var] == SOURCE_URL for var in stub.owned())   # still attached
    assert "DATABASE" not in [a["name"] for a in stub.attachments]
    assert stub.refused == []                                # no write hit an attachment-owned var
    assert ctx.source_url() == SOURCE_URL                          # status and resumes still find the source


@pytest.mark.parametrize("only_database", [False, True], ids=["other-attachment", "database-only"])
def test_switch_start_and_smoke_test_against_heroku_semantics(stub, monkeypatch, only_database):
    if only_database:
        stub.detach([a for a in stub.attachments if a["name"] == "HEROKU_POSTGRESQL_RED"][0])
    monkeypatch.setenv("TERN_SMOKE_URL", f"{stub.url}/smoke?key=smoke-secret-1234")
    app = app_for(stub)
    ctx = failover_ctx(app)
    run_steps(ctx, "stop_workers", "maintenance_on")
    restarts = stub.restarts
    results = run_steps(ctx, "switch", "start_app", "smoke_test")
    assert_switched(stub, ctx)
    kept = [a["name"] for a in stub.attachments]
    assert kept == (["TERN_HEROKU_SOURCE"] if only_database else ["HEROKU_POSTGRESQL_RED"])
    assert stub.restarts > restarts                      # the dynos restarted onto the new URL
    assert not stub.maintenance and stub.formation == {"web": 2, "worker": 3}
    assert "read back from 10.0.1.10:5432" in results["smoke_test"]["smoke_test"]
    assert "smoke-secret-1234" not in results["smoke_test"]["smoke_test"]
    assert stub.backend.databases.get(endpoint(SOURCE_URL)) is None    # nothing written to the old database
    assert run_steps(ctx, "switch") == {}                       # resumed: the check says done


def test_switch_resumes_after_dying_between_its_calls(stub):
    app = app_for(stub)
    real = app._request

    def dies_before_the_last_write(method, path, body=None):
        if method == "PATCH" and path.endswith("/config-vars") and "DATABASE_URL" in (body or {}):
            raise RunbookError("killed")
        return real(method, path, body)

    app._request = dies_before_the_last_write
    with pytest.raises(RunbookError, match="killed"):
        run_steps(failover_ctx(app), "switch")
    assert "DATABASE_URL" not in stub.config                 # the attachment is gone, the URL not yet set
    assert stub.config["TERN_SOURCE_DATABASE_URL"] == SOURCE_URL   # but the source URL was kept first
    ctx = failover_ctx(app_for(stub))
    run_steps(ctx, "switch")
    assert_switched(stub, ctx)


def test_switch_resumes_a_run_the_old_adapter_left_attached_as_tern_source_database(stub):
    # tern before this fix: DATABASE moved to TERN_SOURCE_DATABASE, then the switch's write was refused
    for a in list(stub.attachments):
        stub.detach(a)
    stub.attach(stub.addon, "TERN_SOURCE_DATABASE")
    ctx = failover_ctx(app_for(stub))
    run_steps(ctx, "switch")
    assert_switched(stub, ctx)
    assert [a["name"] for a in stub.attachments] == ["TERN_HEROKU_SOURCE"]


# -- smoke test: the write must land on the new leader --------------------------------------
@pytest.fixture
def switched_app(stub, monkeypatch):
    monkeypatch.setenv("TERN_SMOKE_URL", f"{stub.url}/smoke")
    app = app_for(stub)
    app.set_config_vars({"DATABASE_URL": LEADER_URL, "TERN_SOURCE_DATABASE_URL": SOURCE_URL})
    return app


def test_smoke_test_posts_a_token_and_reads_its_row_back_on_the_leader(stub, switched_app):
    # the switch restarted the dynos (503 until a web dyno is up), and the app fails twice more: retried
    stub.smoke_unavailable = 2
    what = switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=5)
    posts = [r for r in stub.requests if r[1].startswith("/smoke")]
    assert len(posts) >= 3 and all(r[0] == "POST" and r[3] == "" for r in posts)   # no Heroku key to the app
    tokens = [r[2]["token"] for r in posts]
    assert len(set(tokens)) == len(posts) and stub.backend.databases == {("10.0.1.10", 5432): {tokens[-1]}}
    assert tokens[-1] in what and len(switched_app.sleeps) == len(posts) - 1


def test_smoke_test_fails_on_a_2xx_that_does_not_echo_the_token(stub, switched_app):
    stub.smoke_mode = "no_token"
    with pytest.raises(ConfigError, match="without echoing the token"):
        switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=5)


def test_smoke_test_fails_when_the_write_went_to_the_old_database(stub, switched_app):
    stub.smoke_mode = "old"
    with pytest.raises(VerificationError, match="not on the new leader 10.0.1.10:5432"):
        switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=5)
    assert stub.backend.databases[endpoint(SOURCE_URL)]                  # it did write, elsewhere


def test_smoke_test_fails_when_the_app_is_not_on_the_leader(stub, switched_app):
    with pytest.raises(VerificationError, match="points at 10.0.1.10:5432, not the new leader 10.0.1.11:5432"):
        switched_app.smoke_test("10.0.1.11", 5432, since=0, timeout=5)
    assert not [r for r in stub.requests if r[1].startswith("/smoke")]


def test_smoke_test_times_out_and_needs_its_configuration(stub, switched_app, monkeypatch):
    stub.smoke_unavailable = 10 ** 6
    with pytest.raises(TimeoutExpired, match="HTTP 503"):
        switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=0.2)
    monkeypatch.setenv("TERN_SMOKE_SQL", "SELECT 1 FROM tern_smoke")
    with pytest.raises(ConfigError, match=r"%\(token\)s"):
        switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=1)
    monkeypatch.delenv("TERN_SMOKE_URL")
    with pytest.raises(ConfigError, match="set TERN_SMOKE_URL"):
        switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=1)


def test_maintenance_and_formation(stub):
    app = app_for(stub)
    assert app.maintenance() is False
    app.set_maintenance(True)
    assert app.maintenance() is True and stub.maintenance is True
    before = app.formation()
    assert before == {"web": 2, "worker": 3}
    previous = app.scale({"worker": 0}, timeout=5)
    assert previous == {"worker": 3}
    assert app.running() == {"web": 2}
    app.scale(previous, timeout=5)
    assert app.running() == {"web": 2, "worker": 3}
    patch = [r for r in stub.requests if r[0] == "PATCH" and r[1].endswith("/formation")][0]
    assert patch[2] == {"updates": [{"type": "worker", "quantity": 0}]}


def test_rate_limit_and_5xx_are_retried_with_backoff(stub):
    app = app_for(stub)
    stub.throttle = 3
    stub.fail_5xx = 1
    assert app.maintenance() is False
    assert len(app.sleeps) == 4 and app.sleeps == sorted(app.sleeps)


def test_retries_are_bounded(stub):
    app = app_for(stub, attempts=3)
    stub.throttle = 10
    with pytest.raises(RunbookError, match="429"):
        app.formation()


def test_clear_errors_and_no_key_in_logs(stub, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = HerokuApp("nope", api_key_ref="env:HEROKU_API_KEY", base_url=stub.url, sleep=lambda s: None)
    with pytest.raises(RunbookError, match="is the app name 'nope' right"):
        wrong.formation()
    monkeypatch.setenv("HEROKU_API_KEY", "wrong-key-999999")
    with pytest.raises(RunbookError, match="rejected the API key") as exc:
        app_for(stub).formation()
    assert "wrong-key-999999" not in str(exc.value)
    assert stub.key not in caplog.text and "wrong-key-999999" not in caplog.text
    monkeypatch.delenv("HEROKU_API_KEY")
    with pytest.raises(ConfigError, match="HEROKU_API_KEY is not set"):
        app_for(stub).formation()
    with pytest.raises(ConfigError, match="cannot be scaled"):
        app_for(stub).scale({"web": -1}, timeout=1)


# -- what the documentation says will break ------------------------------------------------
def test_a_write_heroku_refuses_as_attachment_owned_is_a_clear_error_without_values(stub):
    app = app_for(stub)
    app.attachments = lambda: []     # a stale view: tern believes no attachment owns DATABASE_URL
    with pytest.raises(HerokuApiError) as exc:
        app.set_config_vars({"DATABASE_URL": LEADER_URL, "TERN_SOURCE_DATABASE_URL": SOURCE_URL})
    message = str(exc.value)
    assert exc.value.status == 422
    assert "Cannot overwrite attachment values DATABASE_URL" in message and "attachment NAME owns NAME_URL" in message
    assert "heroku-db-secret" not in message and "10.0.1.10" not in message      # names, never values
    assert stub.config["DATABASE_URL"] == SOURCE_URL and stub.refused == [["DATABASE_URL"]]
    assert "TERN_SOURCE_DATABASE_URL" not in stub.config and stub.restarts == 0   # refused as a whole


@pytest.mark.parametrize("caller_timeout", [0.5, 10.0])
def test_stopping_workers_that_ignore_sigterm_waits_for_the_grace(monkeypatch, caller_timeout):
    # Heroku: SIGTERM, SIGKILL 30 s later; here a 2 s grace. The step's timeout may be shorter than the grace.
    with make_standin(ignore_sigterm=("worker",), grace_seconds=2.0) as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.key)
        app = app_for(s, stop_margin=1.0, sleep=time.sleep)
        workers = s.backend.live("worker")
        assert len(workers) == 3
        t0 = time.monotonic()
        assert app.scale({"worker": 0}, timeout=caller_timeout) == {"worker": 3}
        took = time.monotonic() - t0
        assert took >= 1.9, f"reported stopped after {took:.2f}s, inside the SIGTERM grace"
        assert s.backend.live("worker") == []                    # really gone when the adapter said so
        assert all(p.signals == [signal.SIGTERM, signal.SIGKILL] for p in workers)
        assert app.running() == {"web": 2} and s.formation["worker"] == 0


def test_a_dyno_being_stopped_counts_as_running_until_gone(monkeypatch):
    with make_standin(ignore_sigterm=("worker",), grace_seconds=1.0) as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.key)
        app = app_for(s, stop_margin=0.5)
        app.request("PATCH", f"/apps/{s.app}/formation", {"updates": [{"type": "worker", "quantity": 0}]})
        assert {d["state"] for d in app.dynos() if d["type"] == "worker"} == {"down"}
        assert app.running() == {"web": 2, "worker": 3}          # down, inside the grace: processes still run
        wait_for(lambda: not s.dynos_of("worker"), timeout=3)
        assert app.running() == {"web": 2}


def test_a_crashed_dyno_is_not_running(stub):
    app = app_for(stub)
    stub.crash("worker.2")
    wait_for(lambda: any(d.state == "crashed" for d in stub.dynos_of("worker")))
    assert {d["name"]: d["state"] for d in app.dynos()}["worker.2"] == "crashed"
    assert app.running() == {"web": 2, "worker": 2}
    with pytest.raises(TimeoutExpired, match=r"not up: worker\.2 crashed"):
        app.scale({"worker": 3}, timeout=0.3)                   # bounded: a crashed dyno never comes up
    app.scale({"worker": 0}, timeout=5)                        # a crashed dyno has nothing to stop
    assert app.running() == {"web": 2} and stub.dynos_of("worker") == []


def test_a_dyno_that_crashes_at_boot_fails_the_scale(monkeypatch):
    with make_standin(crash_on_boot=("worker",)) as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.key)
        app = app_for(s)
        with pytest.raises(TimeoutExpired, match=r"worker\.4 (starting|crashed)"):
            app.scale({"worker": 4}, timeout=0.5)
        assert s.dynos_of("worker")[-1].state == "crashed"


def test_rate_limit_remaining_paces_the_calls_and_429_backs_off(monkeypatch):
    # a small bucket refilled at 10 tokens/s: one token's refill is 0.1 s
    with make_standin(rate_limit=4, refill_per_second=10.0) as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.key)
        paced = app_for(s, token_seconds=0.1, rate_limit_reserve=2, sleep=time.sleep)
        for _ in range(12):
            assert paced.maintenance() is False
        assert s.limited == 0                                   # RateLimit-Remaining honoured: never refused
        assert paced.rate_limit_remaining is not None and paced.rate_limit_remaining <= 2

        time.sleep(0.5)                                         # the bucket refills, then refills slower
        s.refill_per_second = 5.0
        sleeps = []
        blind = app_for(s, token_seconds=0.1, rate_limit_reserve=-1,
                        sleep=lambda x: (sleeps.append(x), time.sleep(x)))
        for _ in range(12):                                     # as fast as it can: the bucket runs dry
            assert blind.formation() == {"web": 2, "worker": 3}
        assert s.limited >= 1                                   # some answered 429 ...
        assert len(sleeps) >= s.limited and all(x >= 0.1 for x in sleeps)   # ... each waited a refill, then passed


def test_a_config_var_change_restarts_every_dyno(monkeypatch):
    with make_standin(boot_seconds=1.0) as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.key)
        app = app_for(s)
        before = {d["name"]: (d["id"], d["created_at"]) for d in app.dynos()}
        app.set_config_vars({"FEATURE_FLAG": "on"})
        booting = app.dynos()                                    # the old ones got SIGTERM: down, then gone
        assert sorted(d["name"] for d in booting if d["state"] == "starting") == sorted(before)
        assert {d["state"] for d in booting} <= {"starting", "down"}
        wait_for(lambda: all(d.state == "starting" for d in s.dynos), timeout=0.5)
        assert app.running() == {"web": 2, "worker": 3}           # starting dynos run a process
        wait_for(lambda: all(d.state == "up" for d in s.dynos))
        after = {d["name"]: (d["id"], d["created_at"]) for d in app.dynos()}
        assert after.keys() == before.keys()
        assert all(after[n][0] != before[n][0] and after[n][1] > before[n][1] for n in before)
        assert all(d.env["FEATURE_FLAG"] == "on" for d in s.dynos)  # the new dynos booted with the change
        assert s.restarts == 1
        app.set_config_vars({"FEATURE_FLAG": "on"})                # no change, no release
        assert s.restarts == 1 and {d["name"]: (d["id"], d["created_at"]) for d in app.dynos()} == after


def test_the_night_sequence_against_heroku_behaviour(monkeypatch):
    """stop_workers -> maintenance -> (promotion) -> switch -> start_app -> smoke test, through the plan's own
    steps, with workers that ignore SIGTERM, dynos that take time to boot and a restart on every config change."""
    with make_standin(ignore_sigterm=("worker", "web"), grace_seconds=1.0, boot_seconds=0.3) as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.key)
        monkeypatch.setenv("TERN_SMOKE_URL", f"{s.url}/smoke?key=smoke-secret-1234")
        app = app_for(s, stop_margin=0.5, sleep=time.sleep)
        ctx = failover_ctx(app)
        old_workers = s.backend.live("worker")
        run_steps(ctx, "stop_workers")
        assert s.backend.live("worker") == [] and all(signal.SIGKILL in p.signals for p in old_workers)
        run_steps(ctx, "maintenance_on")
        old_web = {d.id for d in s.dynos_of("web")}
        results = run_steps(ctx, "switch", "start_app", "smoke_test")
        assert_switched(s, ctx)
        web = s.dynos_of("web")
        assert {d.id for d in web if d.state == "up"}.isdisjoint(old_web)          # restarted onto the new URL
        assert all(d.env["DATABASE_URL"] == LEADER_URL for d in web if d.state == "up")
        assert not s.maintenance and s.formation == {"web": 2, "worker": 3}
        assert [d.state for d in s.dynos_of("worker")] == ["up"] * 3
        assert all(d.env["DATABASE_URL"] == LEADER_URL for d in s.dynos_of("worker"))
        assert "read back from 10.0.1.10:5432" in results["smoke_test"]["smoke_test"]
        assert endpoint(SOURCE_URL) not in s.backend.databases                     # nothing written to the old one
        assert run_steps(ctx, "switch") == {}                                     # resumed: the check says done
