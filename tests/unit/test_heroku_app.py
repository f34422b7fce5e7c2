"""The Heroku adapter against a local HTTP stub of the Platform API."""

from __future__ import annotations

import logging

import pytest

from runbook.adapters.heroku_app import HerokuApp
from runbook.errors import ConfigError, RunbookError
from tests.unit.heroku_stub import HerokuStub


@pytest.fixture
def stub(monkeypatch):
    with HerokuStub() as s:
        monkeypatch.setenv("HEROKU_API_KEY", s.state.key)
        yield s


def app_for(stub, **kw) -> HerokuApp:
    sleeps = []
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


def test_attaches_under_another_name_when_database_is_the_only_attachment(stub):
    stub.state.attachments = [a for a in stub.state.attachments if a["name"] == "DATABASE"]
    app = app_for(stub)
    app.set_config_vars({"DATABASE_URL": "postgresql://x:y@h:5432/d"})
    assert [a["name"] for a in stub.state.attachments] == ["TERN_SOURCE_DATABASE"]


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
