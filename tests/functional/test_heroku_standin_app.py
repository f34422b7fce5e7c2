"""Hop 1's app control rehearsed: HerokuApp -> the Heroku stand-in -> the sandbox's real dyno processes."""

from __future__ import annotations

import shutil
import time

import pytest

from runbook.adapters.heroku_app import HerokuApp
from runbook.adapters.local_app import LocalApp
from runbook.pg import url_endpoint
from runbook.sandbox import Sandbox
from runbook.standins.heroku import LOCAL_SMOKE_SQL, HerokuStandIn, LocalAppBackend
from runbook.workload import ledger
from tests.conftest import make_root

pytestmark = pytest.mark.functional


def wait_for(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.05)


def test_heroku_app_scales_restarts_and_smoke_tests_the_sandbox_app(monkeypatch):
    root = make_root()
    sb = Sandbox(root / "sandbox")
    try:
        sb.up(replicas=2, scale=1, rate=50)
        local = LocalApp(sb.app_dir)
        with HerokuStandIn(LocalAppBackend(sb.app_dir), app="tern-sandbox-app", boot_seconds=0.5,
                           grace_seconds=5.0) as standin:
            monkeypatch.setenv("HEROKU_API_KEY", standin.key)
            app = HerokuApp(standin.app, api_key_ref="env:HEROKU_API_KEY", base_url=standin.url,
                            stop_grace=5.0, stop_margin=2.0, poll_interval=0.1)
            assert app.running() == {"web": 1, "worker": 1}

            # scale the web up: a second real process that writes
            since = time.time()
            assert app.scale({"web": 2}, timeout=30) == {"web": 1}
            web2 = local.pids()["web.2"]
            wait_for(lambda: any(e.ev == "ack" and e.dyno == "web.2" and e.ts >= since
                                 for e in ledger.read(sb.app_dir)), 20, "web.2 acknowledged no write")

            # a config var change restarts every process (new pids) after the boot delay
            before = local.pids()
            app.set_config_vars({"TERN_REHEARSAL": "1"})
            assert app.scale({"web": 2, "worker": 1}, timeout=30) == {"web": 2, "worker": 1}
            after = local.pids()
            assert after.keys() == before.keys() and set(after.values()).isdisjoint(before.values())
            assert local.config_var("TERN_REHEARSAL") == "1"

            # the smoke test: a token written through the web dyno's DATABASE_URL, read back there
            monkeypatch.setenv("TERN_SMOKE_URL", f"{standin.url}/smoke")
            monkeypatch.setenv("TERN_SMOKE_SQL", LOCAL_SMOKE_SQL)
            host, port, _ = url_endpoint(local.config_var("DATABASE_URL"))
            assert "read back from" in app.smoke_test(host, port, since=since, timeout=20)

            # and down again: the process is gone when the adapter says so
            assert app.scale({"web": 1}, timeout=30) == {"web": 2}
            assert "web.2" not in local.pids() and not LocalApp._alive(web2)
            assert local.formation()["web"] == 1
        checked = sb.down(check_ledger=True)
        assert checked["ok"] and checked["acknowledged"] > 0, checked
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)
