"""The Heroku adapter against a local HTTP stub of the Platform API."""

from __future__ import annotations

import logging

import pytest

from runbook.adapters.heroku_app import HerokuApiError, HerokuApp
from runbook.contract import parse
from runbook.errors import ConfigError, RunbookError, TimeoutExpired, VerificationError
from runbook.failover.context import Context
from runbook.failover.ec2 import plan
from runbook.settings import Settings
from tests.unit.heroku_stub import SOURCE_URL, HerokuStub, endpoint

LEADER_URL = "postgres://u:heroku-db-secret@10.0.1.10:5432/d?sslmode=require"   # replicas take TLS only


@pytest.fixture
def stub(monkeypatch):
    with HerokuStub() as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.state.key)
        yield s


def app_for(stub, **kw) -> HerokuApp:
    sleeps = []
    kw.setdefault("read_back", stub.read_back)
    app = HerokuApp(stub.state.app, api_key_ref="env:HEROKU_API_KEY", base_url=stub.url, sleep=sleeps.append, **kw)
    app.sleeps = sleeps
    return app


def test_config_vars_and_database_url_swap_keeps_the_addon_attached(stub):
    app = app_for(stub)
    old = app.config_var("DATABASE_URL")
    assert old.startswith("postgres://")
    app.set_config_vars({"DATABASE_URL": "postgresql://app:new@10.0.1.10:5432/app", "TERN_SOURCE_DATABASE_URL": old,
                         "OBSOLETE": None})
    assert app.config_var("DATABASE_URL") == "postgresql://app:new@10.0.1.10:5432/app"
    assert app.config_var("TERN_SOURCE_DATABASE_URL") == old
    names = [a["name"] for a in stub.state.attachments]
    assert "DATABASE" not in names and "HEROKU_POSTGRESQL_RED" in names   # the add-on is never orphaned
    app.set_config_vars({"DATABASE_URL": "postgresql://app:new2@10.0.1.11:5432/app"})   # idempotent detach
    assert app.config_var("DATABASE_URL").endswith("10.0.1.11:5432/app")
    assert stub.state.refused == []


def test_attaches_under_another_name_when_database_is_the_only_attachment(stub):
    stub.state.attachments = [a for a in stub.state.attachments if a["name"] == "DATABASE"]
    app = app_for(stub)
    app.set_config_vars({"DATABASE_URL": "postgresql://x:y@h:5432/d", "TERN_SOURCE_DATABASE_URL": SOURCE_URL})
    assert [a["name"] for a in stub.state.attachments] == ["TERN_HEROKU_SOURCE"]
    assert stub.state.config["TERN_HEROKU_SOURCE_URL"] == SOURCE_URL
    assert app.config_var("TERN_SOURCE_DATABASE_URL") == SOURCE_URL and stub.state.refused == []


def test_stub_refuses_every_attachment_owned_var_as_heroku_does(stub):
    app = app_for(stub)
    patch = f"/apps/{stub.state.app}/config-vars"
    with pytest.raises(HerokuApiError, match="Cannot overwrite attachment values HEROKU_POSTGRESQL_RED_URL") as exc:
        app.request("PATCH", patch, {"HEROKU_POSTGRESQL_RED_URL": "postgres://x:y@h/d", "OTHER": "1"})
    assert exc.value.status == 422 and "OTHER" not in stub.state.config   # refused as a whole
    with pytest.raises(HerokuApiError, match="422"):
        app.request("PATCH", patch, {"DATABASE_URL": None})                # deleting is writing too
    # re-attaching moves ownership: the new name's var is owned, the old one's is free once detached
    created = app.request("POST", "/addon-attachments", {"addon": stub.state.addon, "app": stub.state.app,
                                                         "name": "TERN_SOURCE_DATABASE", "confirm": stub.state.app})
    with pytest.raises(HerokuApiError, match="TERN_SOURCE_DATABASE_URL"):
        app.request("PATCH", patch, {"TERN_SOURCE_DATABASE_URL": "postgres://x:y@h/d"})
    app.request("DELETE", f"/addon-attachments/{created['id']}")
    app.request("PATCH", patch, {"TERN_SOURCE_DATABASE_URL": "postgres://x:y@h/d"})
    assert stub.state.refused == [["HEROKU_POSTGRESQL_RED_URL"], ["DATABASE_URL"], ["TERN_SOURCE_DATABASE_URL"]]
    assert stub.state.restarts == 3   # attach, detach, one effective PATCH; refused PATCHes restart nothing


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
    config = stub.state.config
    assert config["DATABASE_URL"] == LEADER_URL
    assert config["TERN_SOURCE_DATABASE_URL"] == SOURCE_URL      # the rollback URL, under a name no attachment owns
    assert "TERN_SOURCE_DATABASE_URL" not in stub.state.owned()
    assert stub.state.owned() and all(config[var] == SOURCE_URL for var in stub.state.owned())   # still attached
    assert "DATABASE" not in [a["name"] for a in stub.state.attachments]
    assert stub.state.refused == []                                # no write hit an attachment-owned var
    assert ctx.source_url() == SOURCE_URL                          # status and resumes still find the source


@pytest.mark.parametrize("only_database", [False, True], ids=["other-attachment", "database-only"])
def test_switch_start_and_smoke_test_against_heroku_semantics(stub, monkeypatch, only_database):
    if only_database:
        stub.state.attachments = [a for a in stub.state.attachments if a["name"] == "DATABASE"]
        del stub.state.config["HEROKU_POSTGRESQL_RED_URL"]
    monkeypatch.setenv("TERN_SMOKE_URL", f"{stub.url}/smoke?key=smoke-secret-1234")
    app = app_for(stub)
    ctx = failover_ctx(app)
    run_steps(ctx, "stop_workers", "maintenance_on")
    restarts = stub.state.restarts
    results = run_steps(ctx, "switch", "start_app", "smoke_test")
    assert_switched(stub, ctx)
    kept = [a["name"] for a in stub.state.attachments]
    assert kept == (["TERN_HEROKU_SOURCE"] if only_database else ["HEROKU_POSTGRESQL_RED"])
    assert stub.state.restarts > restarts                      # the dynos restarted onto the new URL
    assert not stub.state.maintenance and stub.state.formation == {"web": 2, "worker": 3}
    assert "read back from 10.0.1.10:5432" in results["smoke_test"]["smoke_test"]
    assert "smoke-secret-1234" not in results["smoke_test"]["smoke_test"]
    assert stub.state.databases.get(endpoint(SOURCE_URL)) is None    # nothing written to the old database
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
    assert "DATABASE_URL" not in stub.state.config                 # the attachment is gone, the URL not yet set
    assert stub.state.config["TERN_SOURCE_DATABASE_URL"] == SOURCE_URL   # but the source URL was kept first
    ctx = failover_ctx(app_for(stub))
    run_steps(ctx, "switch")
    assert_switched(stub, ctx)


def test_switch_resumes_a_run_the_old_adapter_left_attached_as_tern_source_database(stub):
    # tern before this fix: DATABASE moved to TERN_SOURCE_DATABASE, then the switch's write was refused
    for a in list(stub.state.attachments):
        stub.state.detach(a)
    stub.state.attach(stub.state.addon, "TERN_SOURCE_DATABASE")
    ctx = failover_ctx(app_for(stub))
    run_steps(ctx, "switch")
    assert_switched(stub, ctx)
    assert [a["name"] for a in stub.state.attachments] == ["TERN_HEROKU_SOURCE"]


# -- smoke test: the write must land on the new leader --------------------------------------
@pytest.fixture
def switched_app(stub, monkeypatch):
    monkeypatch.setenv("TERN_SMOKE_URL", f"{stub.url}/smoke")
    app = app_for(stub)
    app.set_config_vars({"DATABASE_URL": LEADER_URL, "TERN_SOURCE_DATABASE_URL": SOURCE_URL})
    return app


def test_smoke_test_posts_a_token_and_reads_its_row_back_on_the_leader(stub, switched_app):
    stub.state.smoke_unavailable = 2                                  # dynos still booting: retried
    what = switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=5)
    posts = [r for r in stub.state.requests if r[1].startswith("/smoke")]
    assert len(posts) == 3 and all(r[0] == "POST" and r[3] == "" for r in posts)   # no Heroku key to the app
    tokens = [r[2]["token"] for r in posts]
    assert len(set(tokens)) == 3 and stub.state.databases[("10.0.1.10", 5432)] == {tokens[-1]}
    assert tokens[-1] in what and len(switched_app.sleeps) == 2


def test_smoke_test_fails_on_a_2xx_that_does_not_echo_the_token(stub, switched_app):
    stub.state.smoke_mode = "no_token"
    with pytest.raises(ConfigError, match="without echoing the token"):
        switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=5)


def test_smoke_test_fails_when_the_write_went_to_the_old_database(stub, switched_app):
    stub.state.smoke_mode = "old"
    with pytest.raises(VerificationError, match="not on the new leader 10.0.1.10:5432"):
        switched_app.smoke_test("10.0.1.10", 5432, since=0, timeout=5)
    assert stub.state.databases[endpoint(SOURCE_URL)]                  # it did write, elsewhere


def test_smoke_test_fails_when_the_app_is_not_on_the_leader(stub, switched_app):
    with pytest.raises(VerificationError, match="points at 10.0.1.10:5432, not the new leader 10.0.1.11:5432"):
        switched_app.smoke_test("10.0.1.11", 5432, since=0, timeout=5)
    assert not [r for r in stub.state.requests if r[1].startswith("/smoke")]


def test_smoke_test_times_out_and_needs_its_configuration(stub, switched_app, monkeypatch):
    stub.state.smoke_unavailable = 10 ** 6
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
    assert app.maintenance() is True and stub.state.maintenance is True
    before = app.formation()
    assert before == {"web": 2, "worker": 3}
    previous = app.scale({"worker": 0}, timeout=5)
    assert previous == {"worker": 3}
    assert app.running() == {"web": 2}
    app.scale(previous, timeout=5)
    assert app.running() == {"web": 2, "worker": 3}
    patch = [r for r in stub.state.requests if r[0] == "PATCH" and r[1].endswith("/formation")][0]
    assert patch[2] == {"updates": [{"type": "worker", "quantity": 0}]}


def test_rate_limit_and_5xx_are_retried_with_backoff(stub):
    app = app_for(stub)
    stub.state.throttle = 3
    stub.state.fail_5xx = 1
    assert app.maintenance() is False
    assert len(app.sleeps) == 4 and app.sleeps == sorted(app.sleeps)


def test_retries_are_bounded(stub):
    app = app_for(stub, attempts=3)
    stub.state.throttle = 10
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
    assert stub.state.key not in caplog.text and "wrong-key-999999" not in caplog.text
    monkeypatch.delenv("HEROKU_API_KEY")
    with pytest.raises(ConfigError, match="HEROKU_API_KEY is not set"):
        app_for(stub).formation()
    with pytest.raises(ConfigError, match="cannot be scaled"):
        app_for(stub).scale({"web": -1}, timeout=1)
