"""The sandbox app restarts as a Heroku app does (issue #12): every config-var change restarts each dyno,
which then takes ``boot_seconds`` to boot; a boot wait still stops at once. Outcomes come from the ledger."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from runbook.pg import url_endpoint, with_endpoint
from runbook.secrets import resolve
from runbook.workload import ledger

pytestmark = pytest.mark.functional

DYNOS = ("web.1", "worker.1")


@pytest.fixture(scope="module")
def sb(request):
    from runbook.sandbox import Sandbox
    from tests.conftest import make_root

    root = make_root()
    sandbox = Sandbox(root / "sandbox")

    def teardown():
        try:
            sandbox.down(check_ledger=False)
        finally:
            shutil.rmtree(root, ignore_errors=True)

    request.addfinalizer(teardown)
    sandbox.up(replicas=2, scale=1, rate=50)
    return sandbox


def wait_for(predicate, timeout, message):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(message)


def acks(sb, since=0.0):
    return [e for e in ledger.read(sb.app_dir) if e.ev == "ack" and e.ts >= since]


def endpoint(url):
    host, port, _ = url_endpoint(url)
    return f"{host}:{port}"


def flip_host(url):
    """The same database through the other name of the loopback address."""
    host, port, _ = url_endpoint(url)
    return with_endpoint(url, "localhost" if host == "127.0.0.1" else "127.0.0.1", port)


def all_writing(sb, since, ep=None):
    seen = {e.dyno for e in acks(sb, since) if ep is None or e.endpoint == ep}
    return all(d in seen for d in DYNOS)


def log_text(sb, dyno):
    path = sb.app_dir / "logs" / f"{dyno}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def change_url_and_measure(sb):
    """Point DATABASE_URL at the same database under another host name; per dyno, from the ledger:
    (last ack on the old endpoint, first ack on the new one), and the moment of the change."""
    app = sb.app()
    old = app.config_var("DATABASE_URL")
    new = flip_host(old)
    old_ep, new_ep = endpoint(old), endpoint(new)
    wait_for(lambda: all_writing(sb, time.time() - 1, old_ep), 20, "the app is not writing on the old URL")
    t_change = time.time()
    app.set_config_vars({"DATABASE_URL": new})
    wait_for(lambda: all_writing(sb, t_change, new_ep), 30, f"the app did not resume on {new_ep}")
    time.sleep(0.5)
    entries = ledger.read(sb.app_dir)
    done = [e for e in entries if e.ev == "ack" and e.ts >= t_change - 5]
    per_dyno = {}
    for dyno in DYNOS:
        mine = [e for e in done if e.dyno == dyno]
        first_new = min(e.ts for e in mine if e.endpoint == new_ep and e.ts >= t_change)
        last_old = max(e.ts for e in mine if e.endpoint == old_ep)
        # the restart closes the old connection at once: at most the write in flight ends there
        late = [e.ts - t_change for e in mine if e.endpoint == old_ep and e.ts > t_change + 0.5]
        assert late == [], f"{dyno} kept writing on {old_ep} after the change: {late}"
        assert last_old < first_new, f"{dyno} wrote on {old_ep} after it resumed on {new_ep}"
        per_dyno[dyno] = (last_old, first_new)
    return entries, t_change, old_ep, new_ep, per_dyno


def test_boot_seconds_defaults_to_zero_and_is_settable(sb):
    import json

    from runbook.errors import ConfigError

    app = sb.app()
    assert app.boot_seconds() == 0.0
    # a state file written before the setting existed (the sandbox's own has it since: drop it)
    path = sb.app_dir / "state.json"
    data = json.loads(path.read_text())
    data.pop("boot_seconds", None)
    from runbook.workload.state import AppState, write_state

    write_state(sb.app_dir, AppState.from_json(data))
    assert app.boot_seconds() == 0.0
    app.set_boot_seconds(1.5)
    assert app.boot_seconds() == 1.5
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            app.set_boot_seconds(bad)
    assert app.boot_seconds() == 1.5
    app.set_boot_seconds(0)
    # changing it restarts nothing (not a config var): the app keeps writing
    t0 = time.time()
    wait_for(lambda: all_writing(sb, t0), 10, "the app stopped writing")


def test_a_config_change_restarts_every_dyno_after_its_boot_delay(sb):
    app = sb.app()
    app.set_boot_seconds(3)
    entries, t_change, old_ep, new_ep, per_dyno = change_url_and_measure(sb)
    for dyno, (last_old, first_new) in per_dyno.items():
        assert first_new - last_old >= 2.5, f"{dyno} did not wait for its boot: {first_new - last_old:.2f}s"
        assert first_new - t_change < 3 + 3, f"{dyno} took {first_new - t_change:.2f}s to come back"
    # app-wide: no write acknowledged for >= 2.5 s after the change (every dyno restarted)
    quiet_from = max(last_old for last_old, _ in per_dyno.values())
    during = [e for e in entries if e.ev == "ack" and quiet_from < e.ts < quiet_from + 2.5]
    assert during == [], f"{len(during)} writes acknowledged during the restart"
    # a restart is not an error, and no write was held across it (the one in flight finished first)
    assert ledger.errors(entries, since=t_change) == 0
    held = ledger.held_seconds(entries, since=t_change)
    assert held is not None and held < 2.5, held
    for dyno in DYNOS:
        assert "restarting: config vars changed (DATABASE_URL)" in log_text(sb, dyno)


def test_without_a_boot_delay_the_restart_is_short(sb):
    sb.app().set_boot_seconds(0)
    entries, t_change, old_ep, new_ep, per_dyno = change_url_and_measure(sb)
    for dyno, (last_old, first_new) in per_dyno.items():
        assert first_new - last_old < 1.5, f"{dyno}: {first_new - last_old:.2f}s without acknowledged writes"
    assert ledger.errors(entries, since=t_change) == 0


def test_any_config_var_restarts_but_maintenance_does_not(sb):
    app = sb.app()
    app.set_boot_seconds(2)
    try:
        # maintenance is not a config var: web stops writing, then resumes at once (no boot)
        wait_for(lambda: all_writing(sb, time.time() - 1), 20, "the app is not writing")
        app.set_maintenance(True)
        time.sleep(1.0)
        app.set_maintenance(False)
        t_off = time.time()
        wait_for(lambda: any(e.dyno == "web.1" for e in acks(sb, t_off)), 10, "web did not resume")
        first_web = min(e.ts for e in acks(sb, t_off) if e.dyno == "web.1")
        assert first_web - t_off < 1.0, f"web took {first_web - t_off:.2f}s after maintenance: a restart?"
        # another config var than DATABASE_URL: a restart, with the boot delay
        t_change = time.time()
        app.set_config_vars({"TERN_BOOT_PROBE": "1"})
        wait_for(lambda: all_writing(sb, t_change + 1.5), 20, "the app did not come back")
        mine = [e.ts for e in acks(sb, t_change - 1) if e.dyno == "worker.1"]
        gaps = [b - a for a, b in zip(mine, mine[1:])]
        assert max(gaps) >= 1.5, f"the worker did not restart: longest gap {max(gaps):.2f}s"
        assert "restarting: config vars changed (TERN_BOOT_PROBE)" in log_text(sb, "worker.1")
    finally:
        app.set_boot_seconds(0)
        app.set_config_vars({"TERN_BOOT_PROBE": None})
        t0 = time.time()
        wait_for(lambda: all_writing(sb, t0), 20, "the app did not come back")


def test_stopping_during_a_boot_wait_is_prompt(sb):
    app = sb.app()
    app.set_boot_seconds(30)
    try:
        # a restart's boot wait, cut short by a formation shrink
        sizes = {d: len(log_text(sb, d)) for d in DYNOS}
        t_change = time.time()
        app.set_config_vars({"TERN_BOOT_PROBE": "2"})
        wait_for(lambda: all("booting (restart)" in log_text(sb, d)[sizes[d]:] for d in DYNOS), 10,
                 "the dynos did not begin a restart")
        t0 = time.monotonic()
        app.scale({"web": 0, "worker": 0}, timeout=5)   # SIGTERM comes only after this timeout
        assert time.monotonic() - t0 < 5
        assert app.running() == {"web": 0, "worker": 0}
        for d in DYNOS:
            assert f"{d} stopped" in log_text(sb, d)[sizes[d]:], f"{d} did not exit on its own"
        assert [e for e in acks(sb, t_change + 0.5)] == [], "a booting dyno wrote"

        # a process start's boot wait, cut short by SIGTERM
        sizes = {d: len(log_text(sb, d)) for d in DYNOS}
        app.scale({"web": 1, "worker": 1}, timeout=10)
        wait_for(lambda: all("booting (start)" in log_text(sb, d)[sizes[d]:] for d in DYNOS), 10,
                 "the dynos did not begin to boot")
        pid = app.pids()["web.1"]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: "web.1" not in app.pids(), 2, "web.1 did not stop on SIGTERM while booting")
        assert time.monotonic() - t0 < 1.0
        assert "web.1 stopped" in log_text(sb, "web.1")[sizes["web.1"]:]
        t0 = time.monotonic()
        app.scale({"web": 0, "worker": 0}, timeout=5)
        assert time.monotonic() - t0 < 5
    finally:
        app.scale({"web": 0, "worker": 0}, timeout=10)
        app.set_boot_seconds(0)
        app.set_config_vars({"TERN_BOOT_PROBE": None})
        app.scale({"web": 1, "worker": 1}, timeout=10)
    t0 = time.time()
    wait_for(lambda: all_writing(sb, t0), 20, "the app did not come back")


def test_failed_writes_are_errors_and_the_check_ignores_them(sb):
    app = sb.app()
    ep = endpoint(app.config_var("DATABASE_URL"))
    wait_for(lambda: all_writing(sb, time.time() - 1), 20, "the app is not writing")
    t0 = time.time()
    # the app's pooled connections die under it (as a fence does): the next write on each fails
    sb.node("source").psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE application_name LIKE 'tern-app:%'")
    wait_for(lambda: ledger.errors(ledger.read(sb.app_dir), since=t0) >= 1, 10, "no error recorded")
    t1 = time.time()
    wait_for(lambda: all_writing(sb, t1), 20, "the app did not reconnect")
    entries = ledger.read(sb.app_dir)
    errs = [e for e in entries if e.ev == "error" and e.ts >= t0]
    assert errs and all(e.endpoint == ep and e.key == "" and e.message for e in errs)
    assert any("terminat" in e.message for e in errs), [e.message for e in errs]
    password = resolve(f"file:{sb.secrets_file}#app_password")
    assert all(password not in p.read_text() for p in (sb.app_dir / ledger.LEDGER_DIR).iterdir())
    result = sb.check_ledger_after_stop()
    assert result["ok"] and result["acknowledged"] > 0, result
    app.scale({"web": 1, "worker": 1}, timeout=10)
