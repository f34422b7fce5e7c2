"""The sandbox and its app, against real PostgreSQL."""

from __future__ import annotations

import json
import time

import psycopg
import pytest

from runbook.pg import make_url, url_endpoint
from runbook.secrets import resolve
from runbook.workload import ledger
from tests.conftest import run_invoke

pytestmark = pytest.mark.functional


def app_url(sb):
    return sb.app().config_var("DATABASE_URL")


def acks(sb, since=0.0):
    return [e for e in ledger.read(sb.app_dir) if e.ev == "ack" and e.ts >= since]


def wait_for(predicate, timeout, message):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(message)


def test_status_shows_every_node(sandbox):
    res = run_invoke("status", "--json", sandbox_dir=sandbox.root)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    kinds = {n["name"]: (n["kind"], n["role"]) for n in data["nodes"]}
    assert kinds["source"] == ("source", "primary")
    assert kinds["aurora"] == ("aurora", "primary")
    ec2 = [n for n in data["nodes"] if n["kind"] == "ec2"]
    assert len(ec2) == 2 and len({n["availability_zone"] for n in ec2}) == 2
    assert data["app"]["running"] == {"web": 1, "worker": 1}
    # no secret in the output
    assert resolve(f"file:{sandbox.secrets_file}#app_password") not in res.stdout


def test_outputs_hold_references_only(sandbox):
    res = run_invoke("outputs", sandbox_dir=sandbox.root)
    assert res.returncode == 0, res.stderr
    secrets = json.loads(sandbox.secrets_file.read_text())
    for value in secrets.values():
        assert value not in res.stdout
    assert json.loads(res.stdout)["aurora"]["master_password"].startswith("file:")


def test_heroku_faithful_restrictions(sandbox):
    url = app_url(sandbox)
    with psycopg.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_switch_wal()")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE PUBLICATION tern_pub FOR ALL TABLES")
        row = conn.execute("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user").fetchone()
        assert row == (False, False)
        # an ordinary role may write WAL through a logical message (tern's flush relies on it)
        assert conn.execute("SELECT pg_logical_emit_message(false, 'tern', 'x')").fetchone()[0]
    with pytest.raises(psycopg.OperationalError, match="replication"):
        psycopg.connect(url + "?replication=database", autocommit=True).close()
    # WAL reaches the archive only through archive_command
    wal = list((sandbox.archive / "wal").iterdir())
    assert wal and all(len(p.name) >= 24 for p in wal)
    assert (sandbox.archive / "basebackups" / "LATEST").exists()


def test_maintenance_stops_writes_within_a_second_and_resumes(sandbox):
    app = sandbox.app()
    wait_for(lambda: any(e.dyno.startswith("web") for e in acks(sandbox, time.time() - 1)), 10, "web not writing")
    app.set_maintenance(True)
    t_on = time.time()
    time.sleep(1.5)
    late = [e for e in acks(sandbox, t_on + 1.0) if e.dyno.startswith("web")]
    assert late == [], f"web wrote {len(late)} times more than 1 s into maintenance"
    # workers are not stopped by maintenance mode (Heroku semantics)
    assert any(e.dyno.startswith("worker") for e in acks(sandbox, t_on + 0.5))
    app.set_maintenance(False)
    t_off = time.time()
    wait_for(lambda: any(e.dyno.startswith("web") for e in acks(sandbox, t_off)), 5, "web did not resume")


def test_formation_scale_to_zero_stops_workers(sandbox):
    app = sandbox.app()
    assert app.scale({"worker": 0}, timeout=10) == {"worker": 1}
    assert app.running()["worker"] == 0
    t0 = time.time()
    time.sleep(0.5)
    assert not [e for e in acks(sandbox, t0) if e.dyno.startswith("worker")]
    app.scale({"worker": 1}, timeout=10)
    assert app.running()["worker"] == 1


def test_crash_of_a_process_loses_nothing_acknowledged(sandbox):
    app = sandbox.app()
    time.sleep(1)
    app.kill("web.1")
    app.kill("worker.1")
    time.sleep(0.3)
    assert app.running() == {"web": 0, "worker": 0}
    app.scale(app.formation(), timeout=10)  # restart, as Heroku restarts crashed dynos
    time.sleep(1)
    result = sandbox.check_ledger_after_stop()
    assert result["acknowledged"] > 100
    assert result["missing"] == 0 and result["unexplained"] == 0, result
    app.scale({"web": 1, "worker": 1}, timeout=10)


def test_ledger_equals_rows_committed_and_detects_a_loss(sandbox):
    time.sleep(1)
    result = sandbox.check_ledger_after_stop()
    assert result["ok"] and result["acknowledged"] > 0
    # delete one acknowledged order: the check must now name it
    victim = next(e for e in ledger.read(sandbox.app_dir) if e.ev == "ack" and e.table == "orders")
    with psycopg.connect(app_url(sandbox), autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE order_ref = %s", (victim.key,))
    result = sandbox.check_ledger()
    assert result["missing"] == 1 and victim.key in result["missing_keys"]["orders"]
    # put an unexplained app row in: also caught
    with psycopg.connect(app_url(sandbox), autocommit=True) as conn:
        conn.execute("INSERT INTO orders (order_ref, channel, customer_email, status, total_cents) "
                     "VALUES (%s, 'web', 'x@example.com', 'paid', 0)", (victim.key,))
        conn.execute("INSERT INTO orders (order_ref, channel, customer_email, status, total_cents) "
                     "VALUES (gen_random_uuid(), 'web', 'x@example.com', 'paid', 0)")
    result = sandbox.check_ledger()
    assert result["missing"] == 0 and result["unexplained"] == 1
    with psycopg.connect(app_url(sandbox), autocommit=True) as conn:
        conn.execute("DELETE FROM orders WHERE channel = 'web' AND customer_email = 'x@example.com' "
                     "AND order_ref <> %s", (victim.key,))
    sandbox.app().scale({"web": 1, "worker": 1}, timeout=10)


def test_up_twice_is_fine(sandbox):
    before = sandbox.outputs()
    sandbox.up(replicas=2)
    assert sandbox.outputs() == before
    assert sandbox.app().running() == {"web": 1, "worker": 1}


def aurora_master_url(a):
    return make_url(a.writer_endpoint, a.port, a.master_user, resolve(a.master_password), a.database)


def test_aurora_master_is_rds_superuser_like_and_subscriptions_go_through_the_api(sandbox):
    from runbook.adapters.aurora import aurora_api_for
    from runbook.contract import parse
    from runbook.errors import ConfigError, RunbookError

    a = parse(sandbox.outputs()).aurora
    assert a.api is not None and a.api.kind == "local"
    probe = ("CREATE SUBSCRIPTION tern_probe CONNECTION 'host=127.0.0.1 port=1 dbname=app user=x "
             "password=probe-Pw-0c1d2e' PUBLICATION tern_pub WITH (connect = false)")
    with psycopg.connect(aurora_master_url(a), autocommit=True) as conn:
        row = conn.execute("SELECT rolsuper, rolreplication, rolcreaterole, rolcreatedb FROM pg_roles "
                           "WHERE rolname = current_user").fetchone()
        # no superuser; REPLICATION stands in for rds_replication (Aurora grants it with rds.logical_replication)
        assert row == (False, True, True, True)
        assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
                            ).fetchone()[0] == a.master_user
        for role in ("rds_superuser", "pg_read_all_data", "pg_write_all_data", "pg_signal_backend", "pg_monitor"):
            assert conn.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", (role,)).fetchone()[0], role
        assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"
        # what PostgreSQL 15 keeps for a superuser: not the master's
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(probe)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER SYSTEM SET work_mem = '8MB'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CREATE EXTENSION amcheck")   # not trusted: Aurora's master may, through the allow-list
    api = aurora_api_for(a)
    with pytest.raises(ConfigError):
        api.subscription_statement(probe + "; DROP DATABASE app", a.database)
    api.subscription_statement(probe, a.database)
    try:
        rows = api.query("SELECT subname, subenabled, subconninfo FROM pg_subscription", a.database)
        assert [(r["subname"], r["subenabled"]) for r in rows] == [("tern_probe", False)]
        with psycopg.connect(aurora_master_url(a), autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM pg_subscription").fetchone()[0] == 1
        with pytest.raises(RunbookError, match="already exists") as exc:
            api.subscription_statement(probe, a.database)
        assert "probe-Pw-0c1d2e" not in str(exc.value)
    finally:
        api.subscription_statement("ALTER SUBSCRIPTION tern_probe SET (slot_name = NONE)", a.database)
        api.subscription_statement("DROP SUBSCRIPTION tern_probe", a.database)
    assert api.query("SELECT count(*) AS n FROM pg_subscription", a.database) == [{"n": 0}]
    api.create_extension("amcheck", a.database)
    assert api.query("SELECT extname FROM pg_extension WHERE extname = 'amcheck'", a.database) == [{"extname": "amcheck"}]


def test_aurora_stand_in_parameters_reboot_and_snapshot(sandbox):
    from runbook.adapters.aurora import aurora_api_for
    from runbook.contract import parse

    a = parse(sandbox.outputs()).aurora
    api = aurora_api_for(a)
    assert api.set_parameters({"max_logical_replication_workers": "6", "rds.logical_replication": "1"}) is True
    api.reboot(timeout=60)
    assert api.set_parameters({"max_logical_replication_workers": "6"}) is False
    assert api.query("SELECT current_setting('max_logical_replication_workers') AS n", "postgres") == [{"n": "6"}]
    with psycopg.connect(aurora_master_url(a), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert not api.snapshot_exists("before-hop2")
    path = api.snapshot("before-hop2", timeout=120)
    assert path == a.api.data_dir + ".snapshots/before-hop2" and api.snapshot_exists("before-hop2")


def test_bad_options_give_clear_errors(tmp_root):
    res = run_invoke("sandbox.up", "--replicas", "1", sandbox_dir=tmp_root / "sb")
    assert res.returncode == 2 and "replicas must be between 2" in res.stderr
    res = run_invoke("sandbox.up", "--dataset", "northwind", sandbox_dir=tmp_root / "sb")
    assert res.returncode == 2 and "unknown dataset 'northwind'" in res.stderr
    assert not (tmp_root / "sb").exists()
    res = run_invoke("status", "--stack", str(tmp_root / "missing.json"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_root / "bad.json").write_text('{"schema_version": 1}')
    res = run_invoke("status", "--stack", str(tmp_root / "bad.json"))
    assert res.returncode == 2 and "source: Field required" in res.stderr


def test_chinook_dataset_is_loaded_into_the_source(tmp_root):
    from runbook.errors import ConfigError
    from runbook.sandbox import Sandbox
    from runbook.sandbox.build import _chinook_sql

    try:
        _chinook_sql()
    except ConfigError as exc:
        pytest.skip(str(exc))   # shared/ is not beside this checkout
    sb = Sandbox(tmp_root / "chinook")
    try:
        sb.up(replicas=2, dataset="chinook", start_app=False)
        with psycopg.connect(sb.source_url(sb.state(), resolve(f"file:{sb.secrets_file}#app_password")),
                             autocommit=True) as conn:
            counts = dict(conn.execute("SELECT 'track', count(*) FROM track UNION ALL "
                                       "SELECT 'invoice_line', count(*) FROM invoice_line UNION ALL "
                                       "SELECT 'orders', count(*) FROM orders").fetchall())
            owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'track'").fetchone()[0]
        assert counts["track"] == 3503 and counts["invoice_line"] == 2240 and counts["orders"] > 0
        assert owner == "app"   # loaded as the app's role, as on Heroku
    finally:
        sb.down(check_ledger=False)


def test_down_on_nothing_is_fine(tmp_root):
    res = run_invoke("sandbox.down", sandbox_dir=tmp_root / "never-built")
    assert res.returncode == 0 and "no sandbox" in res.stderr


def test_url_change_is_followed(sandbox):
    """Point the app at another server holding the same database, and back."""
    app = sandbox.app()
    src = sandbox.node("source")
    # a copy of the app database on the same server, reached through a different database name
    old = app_url(sandbox)
    host, port, _ = url_endpoint(old)
    app.set_maintenance(True)
    app.scale({"worker": 0}, timeout=10)
    src.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'app' AND pid <> pg_backend_pid()")
    src.psql("DROP DATABASE IF EXISTS app_copy")
    src.psql("CREATE DATABASE app_copy TEMPLATE app OWNER app")
    password = resolve(f"file:{sandbox.secrets_file}#app_password")
    new = make_url(host, port, "app", password, "app_copy")
    app.set_config_vars({"DATABASE_URL": new})
    app.set_maintenance(False)
    app.scale({"worker": 1}, timeout=10)
    t0 = time.time()
    wait_for(lambda: len(acks(sandbox, t0)) >= 5, 10, "app did not write after the URL change")
    keys = [e.key for e in acks(sandbox, t0) if e.table == "orders"]
    with psycopg.connect(new, autocommit=True) as conn:
        n = conn.execute("SELECT count(*) FROM orders WHERE order_ref = ANY(%s::uuid[])", (keys,)).fetchone()[0]
    assert n == len(keys)
    with psycopg.connect(old, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM orders WHERE order_ref = ANY(%s::uuid[])", (keys,)).fetchone()[0] == 0
    # (last in this module: the ledger now spans two databases)
