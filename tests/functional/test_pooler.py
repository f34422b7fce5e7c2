"""The sandbox's pooler (issue #12): a real PgBouncer in front of the source, driven by runbook.pooler."""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
import uuid

import psycopg
import pytest

from runbook import pooler as pl
from runbook.contract import Pooler, load_file
from runbook.errors import ConfigError, DatabaseError
from runbook.pg import url_endpoint
from runbook.sandbox import Sandbox
from runbook.sandbox import build
from runbook.secrets import resolve
from tests.conftest import make_root

pytestmark = [pytest.mark.functional,
              pytest.mark.skipif(build.pgbouncer_binary() is None, reason="pgbouncer is not installed")]

TIMEOUT = 5.0


@pytest.fixture(scope="module")
def sb():
    root = make_root()
    sandbox = Sandbox(root / "sandbox")

    def teardown():
        sandbox.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)

    try:
        sandbox.up(replicas=2, scale=1, pooler=True)
        yield sandbox
    finally:
        teardown()


@pytest.fixture
def pooler(sb) -> Pooler:
    p = load_file(sb.outputs_file).pooler
    assert p is not None
    return p


def source_url(sb) -> str:
    return sb.app().config_var("DATABASE_URL")


def pooled_url(sb, pooler: Pooler) -> str:
    return pl.app_url(pooler, source_url(sb))


def connect(url: str, **kw) -> psycopg.Connection:
    # PgBouncer 1.18 in transaction pooling has no prepared statements: psycopg must not prepare
    return psycopg.connect(url, connect_timeout=int(TIMEOUT), prepare_threshold=None, **kw)


def in_thread(fn):
    """Run ``fn`` in a thread; returns (thread, result dict with value/error/seconds)."""
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            out["error"] = exc
        out["seconds"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def query_soon(url: str, statement: str, within: float = TIMEOUT):
    """A query through the pooler that must answer within ``within`` seconds (a held pool would not)."""
    def go():
        with connect(url, autocommit=True) as conn:
            return conn.execute(statement).fetchone()[0]

    th, out = in_thread(go)
    th.join(within)
    assert not th.is_alive(), f"{statement!r} through the pooler was still held after {within}s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_the_pooler_node_and_outputs(sb, pooler):
    state = sb.state()
    assert sb.pooler_running()
    assert pooler.kind == "pgbouncer" and pooler.host == "127.0.0.1" and pooler.port == state["pooler"]["port"]
    assert pooler.database == "app" and pooler.tls and pooler.admin_user == "tern_admin"
    assert pooler.admin_password == f"file:{sb.secrets_file}#pooler_admin_password"
    (node,) = pooler.nodes
    assert (node.name, node.availability_zone, node.admin_host, node.admin_port) == \
        ("pooler-a", "us-east-1a", "127.0.0.1", pooler.port)
    assert node.commands.kind == "local" and node.commands.os_user == sb.os_user
    d = sb.root / "nodes" / "pooler"
    assert node.databases_file == str(d / "databases.ini") and os.path.isabs(node.databases_file)
    # the databases file names the source; the app itself stays on the source until the failover moves it
    src_port = state["nodes"]["source"]["port"]
    assert pl.current_target(pooler) == pl.Target("127.0.0.1", src_port, "app")
    assert url_endpoint(source_url(sb))[:2] == ("127.0.0.1", src_port)
    # secrets by reference; files private to the OS user that runs pgbouncer
    assert resolve(pooler.admin_password)
    assert stat.S_IMODE((d / "userlist.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((d / "run").stat().st_mode) == 0o700
    owner = build.effective_os_user(sb.os_user)
    import pwd

    uid = pwd.getpwnam(owner).pw_uid
    for name in ("pgbouncer.ini", "userlist.txt", "databases.ini", "tls/server.key", "tls/server.crt", "run"):
        assert (d / name).stat().st_uid == uid, name
    ini = (d / "pgbouncer.ini").read_text()
    assert ini.rstrip().endswith(f"%include {d / 'databases.ini'}")
    for line in ("auth_type = scram-sha-256", "pool_mode = transaction", "admin_users = tern_admin",
                 "client_tls_sslmode = require", "server_tls_sslmode = prefer", "listen_addr = 127.0.0.1"):
        assert line in ini


def test_pooler_true_without_pgbouncer_is_one_clear_error(tmp_root, monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(build, "PGBOUNCER_FALLBACK", str(tmp_root / "no-pgbouncer"))
    with pytest.raises(ConfigError, match="pgbouncer") as exc:
        Sandbox(tmp_root / "sandbox").up(replicas=2, pooler=True)
    assert "\n" not in str(exc.value)
    assert not (tmp_root / "sandbox").exists()


def test_the_app_role_reaches_the_source_through_the_pooler_over_tls(sb, pooler):
    url = pooled_url(sb, pooler)
    host, port, db = url_endpoint(url)
    assert (host, int(port), db) == ("127.0.0.1", pooler.port, "app") and "sslmode=require" in url
    marker = uuid.uuid4().hex
    with connect(url, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        conn.execute("CREATE TABLE IF NOT EXISTS tern_pooler_probe (note text PRIMARY KEY)")
        conn.execute("INSERT INTO tern_pooler_probe VALUES (%s)", (marker,))
        assert conn.execute("SELECT current_user").fetchone()[0] == "app"
    with psycopg.connect(source_url(sb), autocommit=True) as direct:
        assert direct.execute("SELECT count(*) FROM tern_pooler_probe WHERE note = %s", (marker,)).fetchone()[0] == 1
    with pytest.raises(psycopg.OperationalError, match="SSL required"):
        connect(url.replace("sslmode=require", "sslmode=disable")).close()


def test_admin_console_checks_its_password(sb, pooler, monkeypatch):
    pl.Admin(pooler, pooler.nodes[0], timeout=TIMEOUT).check()
    wrong = "Wr0ng-" + uuid.uuid4().hex
    monkeypatch.setenv("TERN_TEST_POOLER_ADMIN", wrong)
    bad = Pooler(**{**pooler.model_dump(), "admin_password": "env:TERN_TEST_POOLER_ADMIN"})
    with pytest.raises(DatabaseError) as exc:
        pl.Admin(bad, bad.nodes[0], timeout=TIMEOUT).check()
    message = str(exc.value)
    assert "admin console" in message and "pooler-a" in message
    assert wrong not in message and resolve(pooler.admin_password) not in message


def test_point_rewrites_the_databases_file_and_reloads(sb, pooler):
    url = pooled_url(sb, pooler)
    src_port = sb.state()["nodes"]["source"]["port"]
    before = pl.Target("127.0.0.1", src_port, "app")
    after = pl.Target("localhost", src_port, "app")   # the same server under another name
    assert pl.current_target(pooler) == before
    with connect(url, autocommit=True) as held:       # a client connected across the switch
        assert held.execute("SELECT 1").fetchone()[0] == 1
        try:
            assert pl.point(pooler, after, timeout=TIMEOUT) == [f"pooler-a -> {after}"]
            assert pl.current_target(pooler) == after
            assert held.execute("SELECT 2").fetchone()[0] == 2
            assert query_soon(url, "SELECT 3") == 3
            mtime = os.stat(pooler.nodes[0].databases_file).st_mtime_ns
            assert pl.point(pooler, after, timeout=TIMEOUT) == [f"pooler-a already -> {after}"]
            assert os.stat(pooler.nodes[0].databases_file).st_mtime_ns == mtime
            status = pl.status(pooler, TIMEOUT)
            assert status[0]["target"] == str(after) and status[0]["paused"] is False
        finally:
            pl.point(pooler, before, timeout=TIMEOUT)
    assert pl.current_target(pooler) == before
    assert query_soon(url, "SELECT 4") == 4


def test_pause_with_a_transaction_open_times_out_and_resumes(sb, pooler):
    url = pooled_url(sb, pooler)
    holder = connect(url)                              # not autocommit: the SELECT opens a transaction
    try:
        holder.execute("SELECT 1")
        t0 = time.monotonic()
        with pytest.raises(pl.PauseTimeout, match="still in a transaction; resumed"):
            pl.pause_all(pooler, timeout=1.5, connect_timeout=TIMEOUT)
        elapsed = time.monotonic() - t0
        assert 1.5 <= elapsed < 3.0, f"the pause took {elapsed:.2f}s to give up (bound 1.5s)"
        assert query_soon(url, "SELECT 5") == 5         # resumed: a new client is not held
        assert [row["paused"] for row in pl.status(pooler, TIMEOUT)] == [False]
        assert holder.execute("SELECT 6").fetchone()[0] == 6
        holder.rollback()
    finally:
        pl.resume_all(pooler, connect_timeout=TIMEOUT)
        holder.close()


def test_pause_holds_queries_until_resume(sb, pooler):
    url = pooled_url(sb, pooler)
    client = connect(url, autocommit=True)
    try:
        assert client.execute("SELECT 1").fetchone()[0] == 1
        took = pl.pause_all(pooler, timeout=1.5, connect_timeout=TIMEOUT)
        assert took < 1.5
        assert [row["paused"] for row in pl.status(pooler, TIMEOUT)] == [True]
        th, out = in_thread(lambda: client.execute("SELECT 7").fetchone()[0])
        time.sleep(0.5)
        assert th.is_alive(), f"the query was not held by the pause: {out}"
        assert pl.resume_all(pooler, connect_timeout=TIMEOUT) == []
        th.join(TIMEOUT)
        assert not th.is_alive(), "the held query did not complete after RESUME"
        assert out.get("value") == 7, out
        assert out["seconds"] > 0.3
        assert [row["paused"] for row in pl.status(pooler, TIMEOUT)] == [False]
    finally:
        pl.resume_all(pooler, connect_timeout=TIMEOUT)
        client.close()


def test_stopped_pooler_is_a_clear_error_and_comes_back(sb, pooler):
    admin = pl.Admin(pooler, pooler.nodes[0], timeout=TIMEOUT)
    sb.stop_pooler()
    try:
        assert not sb.pooler_running()
        with pytest.raises(DatabaseError, match=r"pooler pooler-a: cannot reach its admin console at "
                                                rf"127\.0\.0\.1:{pooler.port}"):
            admin.check()
        sb.stop_pooler()                                 # idempotent
        # a stale pidfile naming another process (here: this one) is neither signalled nor in the way
        pidfile = sb.root / "nodes" / "pooler" / "run" / "pgbouncer.pid"
        pidfile.write_text(f"{os.getpid()}\n")
        assert not sb.pooler_running()
        sb.stop_pooler()
    finally:
        sb.start_pooler()
    assert sb.pooler_running()
    admin.check()
    assert query_soon(pooled_url(sb, pooler), "SELECT 8") == 8
    # ensure_running (sandbox up again) restarts a pooler that is down, on the same port
    sb.stop_pooler()
    sb.ensure_running(start_app=False)
    assert sb.pooler_running() and load_file(sb.outputs_file).pooler.port == pooler.port
    admin.check()
