"""A loopback TCP proxy that a drill puts between two parties, to drop, delay and cut their traffic.

The sandbox's servers all listen on 127.0.0.1: there is no network to break. A drill that wants a
partition starts a :class:`Proxy` in front of a server and points one party at it (tern's URL of the
source, Aurora's subscription), then at a random moment:

* :meth:`Proxy.drop` - packets lost: nothing is forwarded any more, in either direction, and a new
  connection is accepted but gets no answer. What was sent meanwhile is held, not discarded: when the
  partition heals TCP's retransmissions would deliver it, so :meth:`Proxy.heal` delivers it (discarding
  bytes would corrupt the stream, which a real partition never does - it stalls it);
* :meth:`Proxy.cut` - connections reset: every open connection is closed with a RST on both sides and
  new ones are refused the same way until :meth:`Proxy.heal` (a firewall rule that rejects, a host
  that rebooted);
* :meth:`Proxy.delay` - latency: every chunk is forwarded ``seconds`` after it arrived, in order.

The proxy runs an asyncio loop in a daemon thread; every control method may be called from any thread.
It is a test instrument for the sandbox only (plain TCP, no TLS of its own: TLS passes through it).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

PASS, DROP, CUT = "pass", "drop", "cut"
CHUNK = 65536


@dataclass
class Stats:
    accepted: int = 0        # connections accepted
    refused: int = 0         # connections reset on arrival (cut)
    reset: int = 0           # open connections reset by a cut
    forwarded: int = 0       # bytes delivered
    held: int = 0            # bytes held back by a drop, delivered on heal
    upstream_errors: int = 0  # the target refused or failed


@dataclass(eq=False)   # hashed by identity: kept in a set
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a RST (SO_LINGER 0), as a rejecting firewall or a rebooted host does."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class Proxy:
    """``127.0.0.1:<port>`` forwarding to ``target_host:target_port``. Use as a context manager, or
    :meth:`start` / :meth:`close`."""

    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0, name: str = "proxy") -> None:
        self.target = (target_host, int(target_port))
        self.name = name
        self._listen_port = listen_port
        self.port = 0
        self.mode = PASS
        self.latency = 0.0
        self.stats = Stats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Conn] = set()
        self._healed: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> "Proxy":
        self._thread = threading.Thread(target=self._run, name=f"tern-drill-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise OSError(f"the drill's proxy {self.name} did not start: {self._error}")
        return self

    def __enter__(self) -> "Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
            self._ready.set()
            loop.run_forever()
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()
        finally:
            for conn in list(self._conns):
                self._close(conn, reset=False)
            if self._server is not None:
                self._server.close()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        self._healed = asyncio.Event()
        self._healed.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._listen_port)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop the proxy: every connection closed, the port released. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    # -- faults (any thread) -------------------------------------------------------------
    def _call(self, fn, *args) -> None:
        if self._loop is None:
            raise RuntimeError(f"the proxy {self.name} is not running")
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    def drop(self) -> None:
        """Packets lost: stop forwarding (what is sent is held) and leave new connections unanswered."""
        self._call(self._set_mode, DROP)

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`heal`."""
        self._call(self._set_mode, CUT)

    def heal(self) -> None:
        """Forward again (what a drop held is delivered now); new connections are served."""
        self._call(self._set_mode, PASS)

    def delay(self, seconds: float) -> None:
        """Forward every chunk ``seconds`` after it arrived (0: no latency)."""
        self.latency = max(0.0, float(seconds))

    def _set_mode(self, mode: str) -> None:
        self.mode = mode
        if mode == PASS:
            self._healed.set()
            return
        self._healed.clear()
        if mode == CUT:
            for conn in list(self._conns):
                self.stats.reset += 1
                self._close(conn, reset=True)

    # -- forwarding (the loop's thread) --------------------------------------------------
    def _close(self, conn: _Conn, *, reset: bool) -> None:
        self._conns.discard(conn)
        try:
            me = asyncio.current_task()
        except RuntimeError:   # the loop has stopped (close): no task runs
            me = None
        for t in conn.tasks:
            if t is not me:
                t.cancel()
        for w in (conn.client, conn.upstream):
            if w is None:
                continue
            if reset:
                _reset(w)
            else:
                w.transport.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == CUT:
            self.stats.refused += 1
            _reset(writer)
            return
        self.stats.accepted += 1
        conn = _Conn(writer)
        self._conns.add(conn)
        try:
            await self._healed.wait()          # a drop leaves the connection unanswered
            if conn not in self._conns:        # cut meanwhile
                return
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                self.stats.upstream_errors += 1
                self._close(conn, reset=True)
                return
            conn.upstream = up_writer
            if conn not in self._conns:
                _reset(up_writer)
                return
            queue_up: asyncio.Queue = asyncio.Queue()
            queue_down: asyncio.Queue = asyncio.Queue()
            conn.tasks = [asyncio.ensure_future(self._read(reader, queue_up)),
                          asyncio.ensure_future(self._write(conn, queue_up, up_writer)),
                          asyncio.ensure_future(self._read(up_reader, queue_down)),
                          asyncio.ensure_future(self._write(conn, queue_down, writer))]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass   # the proxy is closing (asyncio's stream callback would log a cancelled handler as an error)
        finally:
            if conn in self._conns:
                self._close(conn, reset=False)

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((time.monotonic() + self.latency, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((time.monotonic(), b""))

    async def _write(self, conn: _Conn, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            if not self._healed.is_set():
                self.stats.held += len(data)
                await self._healed.wait()      # held while dropped; a cut cancels this task
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:                       # the other side closed: close both
                self._close(conn, reset=False)
                return
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                self._close(conn, reset=False)
                return
            self.stats.forwarded += len(data)
