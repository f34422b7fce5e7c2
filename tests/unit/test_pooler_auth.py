"""The app role's line in a PgBouncer auth_file, as tern writes it through a node's command channel
(runbook.pooler.put_auth / remove_auth): sealed on the way, the other lines kept, replaced atomically.
No PgBouncer here (tests/functional/test_pooler.py drives a real one): the node-side scripts and openssl."""

from __future__ import annotations

import os
import pwd
import shutil
import stat

import pytest

from runbook import pooler as pl
from runbook.adapters.local_host import LocalHost, effective_os_user
from runbook.errors import CommandError
from runbook.pg import scram_verifier

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")

OS_USER = "postgres"


@pytest.fixture
def node(tmp_root):
    """A directory and auth_file owned by the OS user the command channel runs as (as PgBouncer's are)."""
    d = tmp_root / "pooler"
    d.mkdir()
    auth = d / "userlist.txt"
    auth.write_text('"tern_admin" "SCRAM-SHA-256$4096:YWRtaW4=$a2V5:a2V5"\n"other" "md5abcdef"\n')
    os.chmod(auth, 0o640)
    if os.geteuid() == 0:
        pw = pwd.getpwnam(OS_USER)
        for path in (d, auth):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    return LocalHost("pooler-x", OS_USER), auth


def test_put_then_remove_keeps_every_other_line_and_leaves_nothing_behind(node):
    host, auth = node
    before = auth.read_text()
    role = 'app "quoted"'
    secret = scram_verifier("Pa55-word")
    assert pl.put_auth(host, str(auth), role, secret, timeout=60) == "written"
    line = f'"app ""quoted""" "{secret}"\n'
    assert auth.read_text() == before + line
    st = auth.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == pwd.getpwnam(effective_os_user(OS_USER)).pw_uid
    assert sorted(p.name for p in auth.parent.iterdir()) == ["userlist.txt"]   # no key, no temporary file
    newer = scram_verifier("An0ther-word")
    assert pl.put_auth(host, str(auth), role, newer, timeout=60) == "written"
    assert auth.read_text() == before + f'"app ""quoted""" "{newer}"\n'       # replaced, not added
    assert pl.remove_auth(host, str(auth), role, timeout=60) == "removed"
    assert auth.read_text() == before
    assert pl.remove_auth(host, str(auth), role, timeout=60) == "unchanged"


def test_what_is_not_a_scram_verifier_is_refused_and_nothing_written(node):
    host, auth = node
    before = auth.read_text()
    for bad in ("md5" + "0" * 32, "SCRAM-SHA-256$4096:x$y:z\"\n\"evil\" \"x"):
        with pytest.raises(CommandError, match="not a SCRAM-SHA-256 verifier") as exc:
            pl.put_auth(host, str(auth), "app", bad, timeout=60)
        assert bad not in str(exc.value)
        assert auth.read_text() == before
    assert sorted(p.name for p in auth.parent.iterdir()) == ["userlist.txt"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user owns")
def test_an_auth_file_someone_else_owns_is_not_replaced(node):
    host, auth = node
    os.chown(auth, 0, 0)
    os.chmod(auth, 0o644)
    before = auth.read_text()
    with pytest.raises(CommandError, match="belongs to another user, not to this user"):
        pl.put_auth(host, str(auth), "app", scram_verifier("Pa55-word"), timeout=60)
    assert auth.read_text() == before and auth.stat().st_uid == 0


def test_a_missing_key_is_an_error_saying_run_again(node):
    host, auth = node
    with pytest.raises(CommandError, match="no key at .*run again"):
        host.run(["sh", "-c", pl.AUTH_SH, "sh", str(auth), "app", "put", pl.AUTH_PY], input="AAAA\n", timeout=60)


class _LeaderHost:
    """An EC2 leader's host as tern reaches it over SSM (no socket of its own): every command it would carry
    is recorded, and refused - SSM keeps each command and its output."""

    local_socket = False
    name = "ec2-leader"

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, argv, **kw):
        self.commands.append(" ".join(map(str, argv)))
        raise AssertionError("the app role's verifier went through the command channel")


class _Aurora:
    """What copy_role sends to Aurora: each statement, rendered."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def execute(self, query, params=None):
        from types import SimpleNamespace

        text = query if isinstance(query, str) else query.as_string(None)
        self.statements.append(text)
        row = ("app",) if "current_database" in text else None
        return SimpleNamespace(fetchone=lambda: row)


def test_copy_role_reads_the_verifier_over_tls_or_not_at_all_never_through_the_command_channel(monkeypatch):
    from runbook.errors import DatabaseError
    from runbook.postgres import PgHost
    from runbook.redact import redact
    from runbook.replication.schema import copy_role

    host, aurora = _LeaderHost(), _Aurora()
    leader = PgHost(host, bin_dir="/usr/lib/postgresql/16/bin", data_dir="/d", socket_dir="/s", port=5432,
                    superuser="postgres")
    # no TLS to the leader (no client certificate): refused, nothing carried, nothing sent to Aurora
    with pytest.raises(DatabaseError, match="may not go through the host's command channel"):
        copy_role(leader, "app", aurora, "app", "tern_master")
    assert host.commands == [] and aurora.statements == []
    # over TLS: the verifier arrives, Aurora gets it, the command channel still carried nothing
    secret = scram_verifier("Leader-pw-" + os.urandom(4).hex())
    asked: list[str] = []

    def over_tls(self, statement, database, timeout):
        asked.append(statement)
        return '[{"v": "%s"}]' % secret

    monkeypatch.setattr(PgHost, "over_tls", property(lambda self: True))
    monkeypatch.setattr(PgHost, "_psql_tls", over_tls)
    done = copy_role(leader, "app", aurora, "app", "tern_master")
    assert host.commands == [] and len(asked) == 1 and "pg_authid" in asked[0]
    assert done == "role app created on Aurora (same password verifier), owns app"
    assert any(s.startswith('CREATE ROLE "app" LOGIN PASSWORD ') and secret in s for s in aurora.statements)
    assert secret not in done and redact(f"x {secret} y") == "x *** y"   # registered: no message shows it
