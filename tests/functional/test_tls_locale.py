"""The EC2 replicas are TLS only after restore; the sandbox's source has a real glibc collation.

One sandbox for the module, in file order: restore, TLS checks, the collation check (with a
faked recorded version, undone afterwards), then hop 1 with the app reaching the new leader over TLS.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import time
from pathlib import Path

import psycopg
import pytest

from runbook.adapters import app_for
from runbook.adapters.local_host import LocalHost, effective_os_user
from runbook.contract import Replica, load
from runbook.errors import PreflightError
from runbook.failover import ec2
from runbook.failover.context import Context
from runbook.failover.run import failover_ec2
from runbook.journal import Journal
from runbook.pg import with_endpoint
from runbook.postgres import literal
from runbook.restore import ensure_certificate, restore_all, tls_paths, tls_url
from runbook.sandbox import Sandbox
from runbook.sandbox.build import LOCALE, have_locale
from runbook.settings import Settings
from tests.conftest import make_root

pytestmark = pytest.mark.functional


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sb = Sandbox(root / "sandbox")
        self.sb.up(replicas=2, scale=1, rate=50)
        self.outputs = load("local", self.sb.root)
        self.settings = Settings(sandbox_dir=self.sb.root, state_dir=root / "state", catchup_timeout=30,
                                 repoint_timeout=30)
        # with the state directory: tern's client certificate is made there and trusted by each replica
        restore_all(self.outputs, timeout=120, connect_timeout=5, state_dir=self.settings.state_dir)
        time.sleep(1.5)

    def app_url(self) -> str:
        return self.sb.app().config_var("TERN_SOURCE_DATABASE_URL") or self.sb.app().config_var("DATABASE_URL")

    def url_to(self, name: str) -> str:
        r = self.outputs.replica(name)
        return with_endpoint(self.app_url(), r.host, r.port)

    def context(self) -> Context:
        journal = Journal(Path("/dev/null"), "dry-run", ec2.KIND)   # as run.py's dry run builds it
        return Context(self.outputs, self.settings, app_for(self.outputs.app), journal, data={})


@pytest.fixture(scope="module")
def env():
    root = make_root()
    e = Env(root)
    yield e
    e.sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


def _os_uid() -> int:
    return pwd.getpwnam(effective_os_user("postgres")).pw_uid


def test_restored_replicas_take_tcp_only_over_tls(env):
    for r in env.outputs.replicas:
        # without TLS: no pg_hba.conf line matches, refused
        with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry .*no encryption"):
            psycopg.connect(env.url_to(r.name), sslmode="disable", connect_timeout=5).close()
        # over TLS (require: the certificate is self-signed, nothing can verify it)
        with psycopg.connect(tls_url(env.url_to(r.name)), connect_timeout=5) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()[0] is True
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0] is True
        # the server reads the hba beside its certificate; it and the data directory's copy are TLS only
        pg = env.sb.node(r.name)
        hba_file = pg.query_one("SELECT current_setting('hba_file') AS f")["f"]
        assert hba_file == tls_paths(r).hba
        for path in (hba_file, f"{r.data_dir}/pg_hba.conf"):
            lines = [ln.split() for ln in Path(path).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            assert lines and not [ln for ln in lines if ln[0] not in ("local", "hostssl")], path
            # SCRAM over TLS; the superuser only with tern's client certificate (runbook/client_tls.py)
            assert all(ln[-1] == "scram-sha-256" or (ln[2] == "postgres" and ln[-1] == "cert")
                       for ln in lines if ln[0] == "hostssl"), path
            assert {ln[2] for ln in lines if ln[0] == "local"} == {"postgres"}, path
        rules = pg.query("SELECT type, user_name, auth_method FROM pg_hba_file_rules")
        assert {x["type"] for x in rules} == {"local", "hostssl"}
        assert all(x["user_name"] == ["postgres"] for x in rules if x["type"] == "local")
        settings = pg.query_one("SELECT current_setting('ssl') AS ssl, current_setting('ssl_key_file') AS key, "
                                "current_setting('unix_socket_permissions') AS perms")
        assert settings["ssl"] == "on" and settings["perms"] == "0700"
        # the key: 0600, the server's OS user's; the socket directory: 0700, the server's OS user's
        key = os.stat(settings["key"])
        assert settings["key"] == tls_paths(r).key and stat.S_IMODE(key.st_mode) == 0o600 and key.st_uid == _os_uid()
        sock = os.stat(r.socket_dir)
        assert stat.S_IMODE(sock.st_mode) == 0o700 and sock.st_uid == _os_uid()
    # the app on the source is untouched: still plain TCP there (Heroku's stand-in)
    with psycopg.connect(env.app_url(), connect_timeout=5) as conn:
        conn.execute("SELECT 1")


def test_certificate_without_cryptography_is_made_with_openssl():
    root = make_root()
    if os.geteuid() == 0:
        os.chown(root, _os_uid(), -1)
    try:
        fake = Replica(name="ec2-z", availability_zone="us-east-1a", host="127.0.0.1", port=5432, database="app",
                       data_dir=str(root / "data"), bin_dir="/usr/bin", socket_dir=str(root / "run"),
                       commands={"kind": "local", "os_user": "postgres"})
        host = LocalHost("ec2-z", "postgres")
        assert ensure_certificate(fake, host, use_cryptography=False) == "made (openssl)"
        key = os.stat(tls_paths(fake).key)
        assert stat.S_IMODE(key.st_mode) == 0o600 and key.st_uid == _os_uid()
        assert "BEGIN CERTIFICATE" in Path(tls_paths(fake).cert).read_text()
        assert ensure_certificate(fake, host) == "kept"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _wait_replayed(env, name: str, want: str | None, timeout: float = 60) -> None:
    pg = env.sb.node(name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = pg.query_one("SELECT datcollversion AS v FROM pg_database WHERE datname = 'app'")
        if row["v"] == want:
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} did not replay datcollversion {want!r}: {row}")


class RemoteHost(LocalHost):
    """A host whose socket tern cannot reach (as over SSM): SQL must go over TLS with the certificate.
    Counts the host commands, so the test sees which way the SQL went."""

    local_socket = False

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.commands: list[str] = []

    def run(self, argv, **kw):
        self.commands.append(" ".join(argv)[:80])
        return super().run(argv, **kw)


def _remote_pg(env, name: str, port: int | None = None):
    from runbook import client_tls
    from runbook.status import replica_host

    r = env.outputs.replica(name)
    pg = replica_host(r)
    pg.host = RemoteHost(name)
    pg.client, pg.tcp_host = client_tls.existing(env.settings.state_dir), r.host
    if port is not None:
        pg.port = port
    return pg


def test_the_superuser_comes_in_over_tls_with_terns_certificate_only(env):
    from runbook import client_tls

    client = client_tls.existing(env.settings.state_dir)
    assert client is not None and oct(client.key.stat().st_mode & 0o777) == "0o600"
    r = env.outputs.replicas[0]
    with psycopg.connect(client.conninfo(r.host, r.port, r.database, server=r.name), connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user, rolsuper, ssl FROM pg_roles, pg_stat_ssl "
                           "WHERE rolname = current_user AND pid = pg_backend_pid()").fetchone()
    assert row == (client.user, True, True)
    # the superuser with a password, or with another certificate of the same name: refused
    with pytest.raises(psycopg.OperationalError, match="certificate"):
        psycopg.connect(host=r.host, port=r.port, dbname=r.database, user=client.user, password="guess",
                        sslmode="require", connect_timeout=5).close()
    other = client_tls.ensure(env.root / "someone-else", client.user)
    client_tls.pin_server(env.root / "someone-else", r.name, client_tls.server_ca(env.settings.state_dir, r.name)
                          .read_text())
    with pytest.raises(psycopg.OperationalError, match="unknown ca|certificate"):
        psycopg.connect(other.conninfo(r.host, r.port, r.database, server=r.name), connect_timeout=5).close()
    # no TLS at all: refused as before
    with pytest.raises(psycopg.OperationalError, match="no pg_hba.conf entry"):
        psycopg.connect(host=r.host, port=r.port, dbname=r.database, user=client.user, sslmode="disable",
                        connect_timeout=5).close()


def test_sql_for_a_host_without_a_reachable_socket_goes_over_tls_and_falls_back_to_the_host(env):
    name = env.outputs.replicas[0].name
    pg = _remote_pg(env, name)
    assert pg.over_tls
    row = pg.query_one("SELECT application_name AS app, pg_is_in_recovery() AS r FROM pg_stat_activity "
                       "WHERE pid = pg_backend_pid()")
    assert row == {"app": "tern:superuser", "r": True} and pg.host.commands == []
    with pytest.raises(Exception, match="SQL failed"):
        pg.psql("SELECT 1/0;")                    # an error is an error, never retried through the host
    assert pg.host.commands == []
    # TLS cannot reach the server (a port nobody listens on): through the host's commands instead
    cut = _remote_pg(env, name)
    cut.tcp_host = "127.0.0.2" if cut.tcp_host != "127.0.0.2" else "127.0.0.3"
    assert cut.query_one("SELECT pg_is_in_recovery() AS r") == {"r": True}
    assert any("psql" in c for c in cut.host.commands)


def _eventually_refused(url: str, match: str) -> None:
    """A connection refused (``match``) once the server has reloaded its hba (a signal: not instant)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(url, connect_timeout=5).close()
        except psycopg.OperationalError as exc:
            assert re.search(match, str(exc)), exc
            return
        assert time.monotonic() < deadline, f"still admitted: {url}"
        time.sleep(0.1)


def test_terns_certificate_is_trusted_only_from_where_tern_runs(env):
    import ipaddress

    from runbook import client_tls
    from runbook.restore import install_client_cert

    client = client_tls.existing(env.settings.state_dir)
    r = env.outputs.replicas[0]
    pg = env.sb.node(r.name)
    # restore wrote one certificate line per network the contract names (the sandbox: loopback), none other
    rules = pg.query("SELECT address, netmask FROM pg_hba_file_rules WHERE auth_method = 'cert'")
    networks = {str(ipaddress.ip_network((x["address"], bin(int(ipaddress.ip_address(x["netmask"]))).count("1"))))
                for x in rules}
    assert env.outputs.admin_cidrs and networks == set(env.outputs.admin_cidrs)
    url = client.conninfo(r.host, r.port, r.database, server=r.name)
    try:
        # tern elsewhere (the contract names another network): its certificate no longer lets it in from here
        install_client_cert(pg, r, client.user, client, ["127.0.0.2/32"])
        _eventually_refused(url, "password")     # the SCRAM line matches instead, and no password was given
    finally:
        install_client_cert(pg, r, client.user, client, env.outputs.admin_cidrs)
    deadline = time.monotonic() + 10
    while True:
        try:
            psycopg.connect(url, connect_timeout=5).close()
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_tern_verifies_each_replica_against_the_certificate_it_read_from_it(env, caplog):
    from runbook import client_tls
    from runbook.adapters.local_host import LocalHost
    from runbook.restore import pin_server_certificate

    client = client_tls.existing(env.settings.state_dir)
    r = env.outputs.replicas[0]
    pinned = client_tls.server_ca(env.settings.state_dir, r.name)
    # restore read each replica's certificate: the very one the server presents
    assert pinned.read_text().strip() == Path(tls_paths(r).cert).read_text().strip()
    assert client_tls.server_ca(env.settings.state_dir, env.outputs.replicas[1].name) is not None
    try:
        # another server's certificate where tern expects this replica's (as a host in the middle would present)
        client_tls.pin_server(env.settings.state_dir, r.name,
                              Path(tls_paths(env.outputs.replicas[1]).cert).read_text())
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(client.conninfo(r.host, r.port, r.database, server=r.name), connect_timeout=5).close()
        # tern's SQL then never goes over that TLS: through the host's commands, with a warning
        pg = _remote_pg(env, r.name)
        assert pg.over_tls
        with caplog.at_level("WARNING", logger="runbook.postgres"):
            assert pg.query_one("SELECT pg_is_in_recovery() AS r") == {"r": True}
        assert any("psql" in c for c in pg.host.commands)
        assert "did not verify" in caplog.text
    finally:
        pin_server_certificate(r, LocalHost(r.name, r.commands.os_user), env.settings.state_dir)
    assert client_tls.server_ca(env.settings.state_dir, r.name).read_text() == pinned.read_text()


def test_collation_check_sees_a_real_version_and_refuses_a_recorded_one_that_differs(env):
    assert have_locale(LOCALE), "run ./dev setup: it generates the en_US.UTF-8 locale"
    source = env.sb.node("source")
    row = source.query_one("SELECT datcollate, pg_database_collation_actual_version(oid) AS v, datcollversion AS rec "
                           "FROM pg_database WHERE datname = 'app'")
    assert row["datcollate"] == LOCALE and row["v"], row
    real = row["v"]
    # preflight (as the dry run shows it) names that version
    dry = failover_ec2(env.outputs, env.settings, dry_run=True, confirm=lambda q: True)
    detail = dry["preflight"].get("detail", dry["preflight"])
    assert f"collation version {real} matches" in str(detail), dry
    assert "None" not in str(detail)
    # a candidate whose recorded collation version differs from the library's is refused
    candidate = dry["candidate"]
    source.psql("UPDATE pg_database SET datcollversion = '0.0' WHERE datname = 'app'; SELECT pg_switch_wal();")
    try:
        for r in env.outputs.replicas:
            _wait_replayed(env, r.name, "0.0")
        with pytest.raises(PreflightError, match=r"recorded 0\.0"):
            ec2.check_collation(env.context(), candidate)
    finally:
        source.psql(f"UPDATE pg_database SET datcollversion = {literal(row['rec'])} WHERE datname = 'app'; "
                    "SELECT pg_switch_wal();")
        for r in env.outputs.replicas:
            _wait_replayed(env, r.name, row["rec"])
    assert re.match(rf"collation version {re.escape(real)} matches", ec2.check_collation(env.context(), candidate))


def test_hop1_app_reaches_the_new_leader_over_tls(env):
    report = failover_ec2(env.outputs, env.settings, confirm=lambda q: True)
    assert report["outcome"] == "completed", report
    leader = env.outputs.replica(report["new_leader"])
    url = env.sb.app().config_var("DATABASE_URL")
    assert f":{leader.port}/" in url
    pg = env.sb.node(leader.name)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = pg.query("SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                        "WHERE a.usename = 'app' AND a.client_addr IS NOT NULL")
        if rows:
            break
        time.sleep(0.2)
    assert rows and all(x["ssl"] for x in rows), rows
    # no TCP session of anyone on the leader is without TLS (replication from the other replica included)
    plain = pg.query("SELECT a.usename, a.application_name FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
                     "WHERE a.client_addr IS NOT NULL AND NOT s.ssl")
    assert plain == []
    result = env.sb.check_ledger_after_stop()
    assert result["acknowledged"] > 0 and result["missing"] == 0, result
