"""The sandbox's pooler (issue #12): a real PgBouncer in front of the source, driven by runbook.pooler."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import stat
import struct
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest

from runbook import pooler as pl
from runbook.adapters.local_host import LocalHost
from runbook.contract import Pooler, load_file
from runbook.errors import ConfigError, DatabaseError, PreflightError
from runbook.failover import pooler_switch
from runbook.settings import Settings
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
        # the sandbox's pooler admits only tern_admin, as on AWS: the app's role goes in the way the failover's
        # pooler_auth step puts it there (its verifier, read in pg_authid, sealed through the command channel)
        p = load_file(sandbox.outputs_file).pooler
        done, written = pl.ensure_app_auth(p, pl.app_url(p, source_url(sandbox)), lambda: verifier(sandbox),
                                           timeout=TIMEOUT)
        assert written == ["pooler-a"], done
        yield sandbox
    finally:
        teardown()


def verifier(sb) -> str:
    return pl.read_verifier(sb.node("source"), "app", database="app")


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
    assert node.auth_file == str(d / "userlist.txt")
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


# -- two nodes, the app role's auth file, bounds -------------------------------------------------------------
@pytest.fixture(scope="module")
def two(sb):
    """The sandbox's pooler plus a second real PgBouncer, ``pooler-b``: pooler-a's configuration with its own
    port and files, serving the source and admitting tern_admin only (as a new node on AWS does). Yields the
    contract's Pooler with both nodes (its ``host:port``, the load balancer, stays pooler-a's)."""
    first = load_file(sb.outputs_file).pooler
    a, b = sb.root / "nodes" / "pooler", sb.root / "nodes" / "pooler-b"
    port = build._free_ports(1)[0]
    (b / "run").mkdir(parents=True)
    shutil.copytree(a / "tls", b / "tls")
    ini = re.sub(r"(?m)^listen_port = \d+$", f"listen_port = {port}", (a / "pgbouncer.ini").read_text().replace(str(a), str(b)))
    (b / "pgbouncer.ini").write_text(ini)
    admin_line = next(ln for ln in (a / "userlist.txt").read_text().splitlines() if ln.startswith('"tern_admin" '))
    (b / "userlist.txt").write_text(admin_line + "\n")
    shutil.copy(a / "databases.ini", b / "databases.ini")
    for path in (b, b / "run", b / "tls", b / "userlist.txt"):
        os.chmod(path, 0o700 if path.is_dir() else 0o600)
    sb._chown(b)
    LocalHost("pooler-b", sb.os_user).run([build.pgbouncer_binary(), "-d", "-q", str(b / "pgbouncer.ini")], timeout=60)
    node_b = {**first.nodes[0].model_dump(), "name": "pooler-b", "admin_port": port,
              "databases_file": str(b / "databases.ini"), "auth_file": str(b / "userlist.txt")}
    pooler = Pooler(**{**first.model_dump(), "nodes": [first.nodes[0].model_dump(), node_b]})
    pidfile = b / "run" / "pgbouncer.pid"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                pl.Admin(pooler, pooler.nodes[1], timeout=TIMEOUT).check()
                break
            except DatabaseError:
                assert time.monotonic() < deadline, (b / "pgbouncer.log").read_text()[-2000:]
                time.sleep(0.1)
        yield pooler
    finally:
        pid = int(pidfile.read_text())
        for sig in (signal.SIGCONT, signal.SIGINT):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while build._pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if build._pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def pgbouncer_pid(node) -> int:
    return int((Path(node.auth_file).parent / "run" / "pgbouncer.pid").read_text())


def fake_ctx(sb, pooler: Pooler, *, app_url: str | None = None, timeout: float = TIMEOUT):
    """What pooler_switch's functions read from a failover's context: the outputs (with ``pooler``), the
    settings, the app (whose DATABASE_URL is ``app_url``, the source's by default) and the source's URL."""
    outputs = load_file(sb.outputs_file).model_copy(update={"pooler": pooler})
    url = app_url or source_url(sb)
    return SimpleNamespace(outputs=outputs, settings=Settings(connect_timeout=timeout),
                           app=SimpleNamespace(config_var=lambda name: url), source_url=lambda: source_url(sb))


def test_the_app_role_gets_into_a_new_node_through_its_sealed_verifier_and_a_reload(sb, two, monkeypatch):
    a, b = two.nodes
    url = pooled_url(sb, two)
    through_b = pl.app_url(two, source_url(sb), b)
    secret = verifier(sb)
    assert secret.startswith("SCRAM-SHA-256$4096:")
    with pytest.raises(DatabaseError, match="pooler node pooler-b .* does not let the app's role through"):
        pl.check_app_login(two, through_b, timeout=TIMEOUT, node=b)
    # tern killed between writing pooler-b's auth file and its RELOAD: the file holds the verifier, the running
    # PgBouncer does not (it reads the file only when reloaded)
    assert pl.put_auth(LocalHost(b.name, sb.os_user), b.auth_file, "app", secret, timeout=60) == "written"
    with pytest.raises(DatabaseError, match="does not let the app's role through"):
        pl.check_app_login(two, through_b, timeout=TIMEOUT, node=b)
    # the resumed step judges the node by a login through it, not by its file: it reloads it. What the command
    # channel carries (argv and stdin) never holds the verifier: only a public key and what it sealed.
    carried: list[str] = []
    real_run = LocalHost.run

    def recording(self, argv, **kw):
        carried.append(" ".join(map(str, argv)) + "\n" + (kw.get("input") or ""))
        return real_run(self, argv, **kw)

    monkeypatch.setattr(LocalHost, "run", recording)
    done, written = pl.ensure_app_auth(two, url, lambda: secret, timeout=TIMEOUT)
    assert written == ["pooler-b"]
    assert done == ["pooler-a: admits app already",
                    f"pooler-b: app's verifier unchanged in {b.auth_file}, reloaded, admits app"]
    assert len(carried) == 2 and "BEGIN PUBLIC KEY" not in carried[0] and "openssl genpkey" in carried[0]
    for text in carried:
        assert secret not in text and base64.b64encode(secret.encode()).decode() not in text
    monkeypatch.undo()
    with connect(through_b, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "app"
    # the file: the admin's line kept, the app's once, 0600, PgBouncer's OS user's; no key or temporary file left
    text = Path(b.auth_file).read_text()
    assert text.startswith('"tern_admin" ') and text.count('"app" ') == 1 and f'"app" "{secret}"\n' in text
    st = os.stat(b.auth_file)
    import pwd

    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == pwd.getpwnam(build.effective_os_user(sb.os_user)).pw_uid
    assert sorted(p.name for p in Path(b.auth_file).parent.iterdir() if ".tern-" in p.name) == []
    # idempotent: every node admits the role, the verifier is not even read, no file is touched
    mtime = os.stat(b.auth_file).st_mtime_ns
    assert pl.ensure_app_auth(two, url, lambda: pytest.fail("the verifier was read again"), timeout=TIMEOUT)[1] == []
    assert os.stat(b.auth_file).st_mtime_ns == mtime
    # the revert: the app's line out of the nodes tern wrote (pooler-b only), reloaded: refused there again
    assert pl.drop_app_auth(two, "app", ["pooler-b"], timeout=TIMEOUT) == ["pooler-a: untouched",
                                                                          "pooler-b: app removed, reloaded"]
    with pytest.raises(DatabaseError, match="does not let the app's role through"):
        pl.check_app_login(two, through_b, timeout=TIMEOUT, node=b)
    pl.check_app_login(two, pl.app_url(two, source_url(sb), a), timeout=TIMEOUT, node=a)
    assert Path(b.auth_file).read_text() == text.replace(f'"app" "{secret}"\n', "")


def test_an_md5_password_is_refused_and_never_shown(sb):
    src = sb.node("source")
    src.psql("SET password_encryption = 'md5';\nCREATE ROLE tern_md5_probe LOGIN PASSWORD 'md5-probe-Pw1';",
             database="app")
    try:
        stored = src.query_one("SELECT rolpassword AS v FROM pg_authid WHERE rolname = 'tern_md5_probe'")["v"]
        assert stored.startswith("md5")
        with pytest.raises(PreflightError, match="tern_md5_probe has an MD5 password") as exc:
            pl.read_verifier(src, "tern_md5_probe", database="app")
        assert stored not in str(exc.value)
        with pytest.raises(PreflightError, match="has no password"):
            pl.read_verifier(src, "tern_no_such_role", database="app")
    finally:
        src.psql("DROP ROLE tern_md5_probe;")


def test_point_and_switched_to_judge_every_node_by_what_its_pgbouncer_serves(sb, two):
    a, b = two.nodes
    port = sb.state()["nodes"]["source"]["port"]
    src, other = pl.Target("127.0.0.1", port, "app"), pl.Target("localhost", port, "app")
    src_url = source_url(sb)
    other_url = src_url.replace("@127.0.0.1:", "@localhost:")
    assert pl.current_target(two) == src
    ctx = fake_ctx(sb, two)
    assert pooler_switch.switched_to(ctx, src_url) and not pooler_switch.switched_to(ctx, other_url)
    only_b = Pooler(**{**two.model_dump(), "nodes": [b.model_dump()]})
    try:
        # node 1 (pooler-b) serves another database: the pooler as a whole serves nothing agreed
        assert pl.point(only_b, other, timeout=TIMEOUT) == [f"pooler-b -> {other}"]
        with pytest.raises(DatabaseError, match=re.escape(f"serve different databases: pooler-a -> {src}; "
                                                          f"pooler-b -> {other}")):
            pl.current_target(two)
        assert not pooler_switch.switched_to(ctx, src_url) and not pooler_switch.switched_to(ctx, other_url)
        assert not pooler_switch.auth_done(ctx)
        on_pooler = fake_ctx(sb, two, app_url=pooled_url(sb, two))
        assert not pooler_switch.pooler_in_done(on_pooler)
        # hop 2's preflight refuses, naming the nodes; hop 1 refuses to move a node the app's writes went through
        with pytest.raises(PreflightError, match=re.escape(f"pooler-b -> {other}")):
            pooler_switch.check(on_pooler)
        with pytest.raises(PreflightError, match=re.escape(f"node(s) pooler-b -> {other} serve another database")):
            pooler_switch.pooler_in(on_pooler)
        # tern killed between writing pooler-a's file and its RELOAD: the file names `other`, PgBouncer serves src
        LocalHost(a.name, sb.os_user).write_file(a.databases_file, pl.databases_text("app", other))
        assert pl.file_target(two, a) == other and pl.current_target(two, a) == src
        assert pl.status(two, TIMEOUT)[0]["file_target"] == str(other)
        # the resumed point reloads it (a point that trusted the file skipped it), and leaves pooler-b as it is
        assert pl.point(two, other, timeout=TIMEOUT) == [f"pooler-a -> {other}", f"pooler-b already -> {other}"]
        assert pl.current_target(two) == other and "file_target" not in pl.status(two, TIMEOUT)[0]
        assert pooler_switch.switched_to(ctx, other_url)
    finally:
        pl.point(two, src, timeout=TIMEOUT)
    assert pl.current_target(two) == src


def test_pause_all_pauses_every_node_at_once_and_resumes_every_node_on_failure(sb, two):
    url_a, url_b = (pl.app_url(two, source_url(sb), n) for n in two.nodes)
    done, written = pl.ensure_app_auth(two, pooled_url(sb, two), lambda: verifier(sb), timeout=TIMEOUT)
    ha, hb = connect(url_a), connect(url_b)          # not autocommit: each SELECT opens a transaction
    try:
        ha.execute("SELECT 1")
        hb.execute("SELECT 1")
        th, out = in_thread(lambda: pl.pause_all(two, timeout=30, connect_timeout=TIMEOUT))
        # both PAUSEs are in flight together: each node is paused while both transactions still hold it (one
        # after the other, pooler-b would not be asked before pooler-a's transaction ended)
        deadline = time.monotonic() + 10
        while [pl.Admin(two, n, timeout=TIMEOUT).paused("app") for n in two.nodes] != [True, True]:
            assert th.is_alive(), out
            assert time.monotonic() < deadline, "the two nodes were never paused at the same time"
            time.sleep(0.05)
        assert th.is_alive(), out                        # still waiting for both transactions
        ha.rollback()
        hb.rollback()
        th.join(TIMEOUT * 2)
        assert not th.is_alive() and "error" not in out, out
        assert pl.resume_all(two, connect_timeout=TIMEOUT) == []
        # pooler-a's transaction outlives the bound: every node is resumed, pooler-b (which paused) too
        ha.execute("SELECT 1")
        with pytest.raises(pl.PauseTimeout, match="pooler pooler-a: PAUSE app did not finish within 1.5s"):
            pl.pause_all(two, timeout=1.5, connect_timeout=TIMEOUT)
        assert [row["paused"] for row in pl.status(two, TIMEOUT)] == [False, False]
        assert query_soon(url_b, "SELECT 9") == 9
        ha.rollback()
    finally:
        pl.resume_all(two, connect_timeout=TIMEOUT)
        ha.close()
        hb.close()
        pl.drop_app_auth(two, "app", written, timeout=TIMEOUT)


class SilentConsole:
    """A TCP server that completes PostgreSQL's start-up (TLS with ``cert``/``key``, no password asked) and then
    never answers a query: an admin console that accepts the connection but never answers, as a client sees it."""

    def __init__(self, cert: Path, key: Path) -> None:
        import ssl

        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(str(cert), str(key))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._start_up, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _start_up(self, conn: socket.socket) -> None:
        try:
            while True:
                body = self._read(conn, struct.unpack("!I", self._read(conn, 4))[0] - 4)
                code = struct.unpack("!I", body[:4])[0]
                if code == 80877103:                                             # SSLRequest: yes
                    conn.sendall(b"S")
                    conn = self.tls.wrap_socket(conn, server_side=True)
                    self.conns.append(conn)
                    continue
                if code == 80877104:                                             # GSSENCRequest: no
                    conn.sendall(b"N")
                    continue
                break
            out = [b"R" + struct.pack("!II", 8, 0)]                            # AuthenticationOk
            for key, value in ((b"client_encoding", b"UTF8"), (b"server_version", b"1.18.0")):
                payload = key + b"\0" + value + b"\0"
                out.append(b"S" + struct.pack("!I", 4 + len(payload)) + payload)
            out.append(b"K" + struct.pack("!III", 12, 1, 2) + b"Z" + struct.pack("!I", 5) + b"I")
            conn.sendall(b"".join(out))
            while conn.recv(4096):                                               # every query read, none answered
                pass
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_admin_commands_are_bounded_when_a_console_never_answers(sb, two, tmp_path):
    tls = sb.root / "nodes" / "pooler" / "tls"
    hung = SilentConsole(tls / "server.crt", tls / "server.key")
    try:
        node = {**two.nodes[1].model_dump(), "name": "pooler-hung", "admin_port": hung.port,
                "databases_file": str(tmp_path / "databases.ini"), "auth_file": str(tmp_path / "userlist.txt")}
        three = Pooler(**{**two.model_dump(), "nodes": [*two.model_dump()["nodes"], node]})
        admin = pl.Admin(three, three.nodes[2], timeout=1.0)
        for what, call in (("RELOAD", lambda: admin.command("RELOAD")),
                           ("SHOW DATABASES", lambda: admin.show("DATABASES")), ("SHOW VERSION", admin.check)):
            th, out = in_thread(call)
            th.join(20)
            assert not th.is_alive(), f"{what} on a console that never answers still waited after 20s"
            assert isinstance(out.get("error"), DatabaseError), out
            assert f"pooler pooler-hung: {what} got no answer within 1s" in str(out["error"])
        # PAUSE goes to every node at once; the hung one fails it, and the two real nodes (which paused) are resumed
        th, out = in_thread(lambda: pl.pause_all(three, timeout=1.0, connect_timeout=1.0))
        th.join(60)
        assert not th.is_alive(), "pause_all with a hung node did not return"
        assert isinstance(out.get("error"), DatabaseError) and "pooler-hung" in str(out["error"]), out
        assert [pl.Admin(two, n, timeout=TIMEOUT).paused("app") for n in two.nodes] == [False, False]
        # a node that cannot say what it serves is never taken for one that agrees
        with pytest.raises(DatabaseError, match="pooler-hung"):
            pl.current_target(three, timeout=1.0)
        assert not pooler_switch.switched_to(fake_ctx(sb, three, timeout=1.0), source_url(sb))
    finally:
        hung.close()
    # a real PgBouncer stopped (SIGSTOP): the kernel still accepts its connections, nothing answers them
    pid = pgbouncer_pid(two.nodes[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        th, out = in_thread(lambda: pl.Admin(two, two.nodes[1], timeout=2.0).check())
        th.join(30)
        assert not th.is_alive(), "the admin console of a stopped PgBouncer held tern"
        assert "pooler pooler-b: cannot reach its admin console" in str(out.get("error")), out
    finally:
        os.kill(pid, signal.SIGCONT)
    pl.Admin(two, two.nodes[1], timeout=TIMEOUT).check()


def start_pgbouncer(sb, node) -> None:
    """Start the node's PgBouncer again (as its service would) and wait until its console answers."""
    ini = str(Path(node.auth_file).parent / "pgbouncer.ini")
    LocalHost(node.name, sb.os_user).run([build.pgbouncer_binary(), "-d", "-q", ini], timeout=60)


def stop_pgbouncer(node) -> None:
    pid = pgbouncer_pid(node)
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 10
    while build._pid_alive(pid):
        assert time.monotonic() < deadline, f"{node.name}'s PgBouncer did not stop"
        time.sleep(0.05)


def test_a_node_down_during_the_switch_comes_back_serving_the_new_database(sb, two):
    a, b = two.nodes
    port = sb.state()["nodes"]["source"]["port"]
    src, other = pl.Target("127.0.0.1", port, "app"), pl.Target("localhost", port, "app")
    stop_pgbouncer(b)
    try:
        # its console does not answer: its file is rewritten through its command channel all the same
        done = pl.point(two, other, timeout=TIMEOUT)
        assert done[0] == f"pooler-a -> {other}" and done[1].startswith(f"pooler-b not running: {b.databases_file} "
                                                                        f"names {other}")
        assert pl.file_target(two, b) == other
        start_pgbouncer(sb, b)
        deadline = time.monotonic() + 30
        while True:
            try:
                served = pl.current_target(two, b)
                break
            except DatabaseError:
                assert time.monotonic() < deadline, "pooler-b did not come back"
                time.sleep(0.1)
        assert served == other and pl.current_target(two) == other
        # already serving, but its file names another database (edited, never reloaded): outside the window
        # point() rewrites it, so that a restart keeps serving what it serves now; inside it leaves the file
        LocalHost(b.name, sb.os_user).write_file(b.databases_file, pl.databases_text("app", src))
        assert pl.point(two, other, timeout=TIMEOUT)[1] == f"pooler-b already -> {other}"
        assert pl.file_target(two, b) == src
        assert pl.point(two, other, timeout=TIMEOUT, check_files=True) == [
            f"pooler-a already -> {other}", f"pooler-b already -> {other} (its file named another database: rewritten)"]
        assert pl.file_target(two, b) == other and pl.current_target(two, b) == other
    finally:
        if not build._pid_alive(pgbouncer_pid(b)):
            start_pgbouncer(sb, b)
        deadline = time.monotonic() + 30
        while True:
            try:
                pl.point(two, src, timeout=TIMEOUT)
                break
            except DatabaseError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    assert pl.current_target(two) == src


def fallback_ctx(sb, pooler: Pooler, *, app_url: str, **data):
    """A fake ctx for the fallback's reverts: records the config-var changes and the checkpoints (as the
    runner journals them), and a smoke test that proves a write through the app's URL if it names the source."""
    from runbook.failover.state import RunState

    ctx = fake_ctx(sb, pooler, app_url=app_url)
    urls = {"DATABASE_URL": app_url}
    changes, said = [], []
    state = RunState.from_context(data)

    def smoke_test(host, port, *, since, timeout):
        assert url_endpoint(urls["DATABASE_URL"])[:2] == (host, port)
        with psycopg.connect(urls["DATABASE_URL"], connect_timeout=int(TIMEOUT)) as conn:
            conn.execute("SELECT 1")
        return f"wrote through {host}:{port}"

    ctx.app = SimpleNamespace(config_var=lambda name: urls.get(name), smoke_test=smoke_test,
                              set_config_vars=lambda c: (changes.append(dict(c)), urls.update(c)))
    ctx.settings = Settings(connect_timeout=TIMEOUT, smoke_timeout=1.0, stop_app_timeout=1.0)
    ctx.data, ctx.changes, ctx.said = state, changes, said
    ctx.checkpoint = lambda **f: state.update(f)
    ctx.say = said.append
    ctx.source_endpoint = lambda: tuple(url_endpoint(source_url(sb))[:2])
    return ctx


def test_a_fallback_leaves_an_app_already_on_the_pooler_and_removes_the_role_only_once_unused(sb, two):
    b = two.nodes[1]
    through_b = pl.app_url(two, source_url(sb), b)
    _, written = pl.ensure_app_auth(two, pooled_url(sb, two), lambda: verifier(sb), timeout=TIMEOUT)
    assert written == ["pooler-b"]
    try:
        # the app wrote through the pooler before the run: pooler_in did nothing, the fallback moves nothing
        before = fallback_ctx(sb, two, app_url=pooled_url(sb, two), pooler_auth_written=["pooler-b"])
        pooler_switch.pooler_out(before)
        pooler_switch.auth_out(before)
        assert before.changes == [] and "the app writes through the pooler" in before.data.pooler_auth_kept
        pl.check_app_login(two, through_b, timeout=TIMEOUT, node=b)
        # this run moved it: back to the source, but a client of the role still on pooler-b (an old dyno the
        # preboot keeps serving) keeps its line there, and the journal says why
        moved = fallback_ctx(sb, two, app_url=pooled_url(sb, two), pooler_in_at=time.time() - 5,
                             pooler_auth_written=["pooler-b"])
        with connect(through_b, autocommit=True, application_name="old-dyno") as old_dyno:
            old_dyno.execute("SELECT 1")
            pooler_switch.pooler_out(moved)
            assert moved.changes == [{"DATABASE_URL": source_url(sb)}] and moved.data.pooler_out_at
            pooler_switch.auth_out(moved)
            assert "still on the pooler after 2s: pooler-b: " in moved.data.pooler_auth_kept, moved.data
            assert moved.said and '"app" ' in Path(b.auth_file).read_text()
            assert old_dyno.execute("SELECT 2").fetchone()[0] == 2          # not cut off
        # that process gone: the revert (run again) removes the line this run wrote, from pooler-b only
        moved.data.pooler_auth_kept = None
        pooler_switch.pooler_out(moved)
        assert len(moved.changes) == 1                                    # the app is on the source already
        pooler_switch.auth_out(moved)
        assert moved.data.pooler_auth_kept is None
        assert '"app" ' not in Path(b.auth_file).read_text()
        with pytest.raises(DatabaseError, match="does not let the app's role through"):
            pl.check_app_login(two, through_b, timeout=TIMEOUT, node=b)
        pl.check_app_login(two, pl.app_url(two, source_url(sb), two.nodes[0]), timeout=TIMEOUT, node=two.nodes[0])
    finally:
        pl.drop_app_auth(two, "app", ["pooler-b"], timeout=TIMEOUT)
