"""tern's connection to a pooler's admin console (runbook/pooler.py): the admin password never crosses
in plain text to a pooler that offers TLS, even when something on the way answers "no TLS"."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from runbook.contract import Pooler
from runbook.errors import DatabaseError
from runbook.pooler import Admin

SSL_REQUEST, GSS_REQUEST = 80877103, 80877104


class NoTls:
    """A TCP listener that answers 'N' (no encryption) to every TLS or GSS request, as a downgrading
    middleman would, and records each startup message a client then sends in plain text."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.plain: list[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    while True:
                        head = conn.recv(8)
                        if len(head) < 8:
                            break
                        length, code = struct.unpack("!ii", head)
                        if length == 8 and code in (SSL_REQUEST, GSS_REQUEST):
                            conn.sendall(b"N")
                            continue
                        self.plain.append(head + conn.recv(length - 8))
                        break
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def middleman():
    m = NoTls()
    yield m
    m.close()


def pooler(port: int, tls: bool) -> Pooler:
    return Pooler(kind="pgbouncer", host="127.0.0.1", port=port, database="app", tls=tls, admin_user="tern_admin",
                  admin_password="env:TERN_TEST_POOLER_ADMIN",
                  nodes=[{"name": "pooler-a", "admin_host": "127.0.0.1", "admin_port": port,
                          "commands": {"kind": "local"}, "databases_file": "/nonexistent/databases.ini"}])


def test_a_pooler_with_tls_is_never_reached_in_plain_text(middleman, monkeypatch):
    monkeypatch.setenv("TERN_TEST_POOLER_ADMIN", "s3cret-admin")
    p = pooler(middleman.port, tls=True)
    with pytest.raises(DatabaseError, match="pooler pooler-a: cannot reach its admin console") as exc:
        Admin(p, p.nodes[0], timeout=3).check()
    assert "s3cret-admin" not in str(exc.value)
    assert middleman.plain == []          # not even the startup message (user tern_admin) went out in plain


def test_a_pooler_without_tls_is_reached_as_it_is(middleman, monkeypatch):
    """The contract says this pooler offers no TLS: tern connects without it (the same listener sees
    the startup message), so the test above would see one too if tern did not require TLS."""
    monkeypatch.setenv("TERN_TEST_POOLER_ADMIN", "s3cret-admin")
    p = pooler(middleman.port, tls=False)
    with pytest.raises(DatabaseError):
        Admin(p, p.nodes[0], timeout=3).check()
    assert middleman.plain and b"tern_admin" in middleman.plain[0]
