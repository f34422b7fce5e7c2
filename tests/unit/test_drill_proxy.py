"""The drills' loopback proxy on real sockets: it forwards, delays, holds what a drop sends, resets on a cut."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from runbook.drills.proxy import Proxy


class Echo:
    """A TCP echo server on 127.0.0.1 (one thread per connection)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def client(proxy: Proxy, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(proxy.address, timeout=timeout)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_forwards_both_ways_intact(echo):
    payload = bytes(range(256)) * 4096          # 1 MiB: many chunks, in order
    with Proxy("127.0.0.1", echo.port) as proxy, client(proxy) as s:
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(s, len(payload)) == payload
        sender.join()
    assert proxy.stats.accepted == 1 and proxy.stats.forwarded >= 2 * len(payload)


def test_delay_holds_each_chunk_at_least_that_long(echo):
    with Proxy("127.0.0.1", echo.port) as proxy, client(proxy) as s:
        s.sendall(b"warm")
        assert recv_exactly(s, 4) == b"warm"
        proxy.delay(0.3)
        t0 = time.monotonic()
        s.sendall(b"late")
        assert recv_exactly(s, 4) == b"late"
        assert time.monotonic() - t0 >= 0.6       # once on the way there, once on the way back
        proxy.delay(0)


def test_drop_holds_traffic_and_heal_delivers_it(echo):
    with Proxy("127.0.0.1", echo.port) as proxy, client(proxy) as s:
        s.sendall(b"before")
        assert recv_exactly(s, 6) == b"before"
        proxy.drop()
        s.sendall(b"during")
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recv(16)                            # nothing gets through a partition
        # a new connection is accepted at TCP level but never answered
        with client(proxy, timeout=0.5) as fresh:
            fresh.sendall(b"knock")
            with pytest.raises(socket.timeout):
                fresh.recv(16)
            proxy.heal()                          # the partition heals: held bytes are delivered, in order
            fresh.settimeout(5)
            assert recv_exactly(fresh, 5) == b"knock"
        s.settimeout(5)
        assert recv_exactly(s, 6) == b"during"
    assert proxy.stats.held >= len(b"during")


def test_cut_resets_open_connections_and_refuses_new_ones(echo):
    with Proxy("127.0.0.1", echo.port) as proxy:
        s = client(proxy)
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        proxy.cut()
        with pytest.raises((ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            for _ in range(50):                   # the RST arrives: the next read or write fails
                s.sendall(b"x")
                if not s.recv(16):
                    raise ConnectionResetError("closed")
                time.sleep(0.02)
        s.close()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            with client(proxy) as refused:        # reset on arrival (maybe before connect() returns)
                refused.sendall(b"hello")
                if not refused.recv(16):
                    raise ConnectionResetError("closed")
        proxy.heal()
        with client(proxy) as again:
            again.sendall(b"back")
            assert recv_exactly(again, 4) == b"back"
    assert proxy.stats.reset >= 1 and proxy.stats.refused >= 1


def test_target_down_resets_the_client_and_close_releases_the_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]       # bound, never listening: connections are refused
        proxy = Proxy("127.0.0.1", dead_port).start()
        try:
            try:   # the reset may come back before connect() returns
                with client(proxy) as s:
                    s.settimeout(5)
                    assert s.recv(16) == b""
            except ConnectionResetError:
                pass
            assert proxy.stats.upstream_errors == 1
        finally:
            port = proxy.port
            proxy.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
