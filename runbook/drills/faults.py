"""The faults drills inject that need more than one call: a rogue client, a full disk.

Servers crash with :meth:`runbook.postgres.PgHost.kill` (SIGKILL of the postmaster, as the fault tests
do), stop with ``pg_ctl -m immediate``, and come back with ``pg_ctl start``; the network breaks in
:mod:`.proxy`; the app surges through its own load settings. What is here keeps state between the
moment it starts and the moment it is healed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psycopg

from ..errors import CommandError, TimeoutExpired
from ..pg import url_endpoint
from ..workload.ledger import LedgerWriter, error_message


class UnreachableHost:
    """A host whose instance crashed: every command tern sends it fails (as SSM fails to reach a stopped
    instance), until the run that holds it ends. Wraps the :class:`~runbook.adapters.HostCommands` of one
    node in a failover's context; a resumed run builds its own (the instance is back by then)."""

    def __init__(self, host) -> None:
        self._host = host
        self.name = host.name

    def __getattr__(self, attr: str):
        value = getattr(self._host, attr)
        if not callable(value):
            return value

        def unreachable(*args, **kwargs):
            raise CommandError(f"{self.name}: the instance does not answer (it crashed)")

        return unreachable


def wait_gone(pg, timeout: float = 60.0) -> None:
    """Until a killed server's postmaster is gone: until its parent reaps it, a zombie still looks alive to
    ``pg_ctl status`` and to a new postmaster, which would refuse to start."""
    deadline = time.monotonic() + timeout
    while pg.is_running():
        if time.monotonic() > deadline:
            raise TimeoutExpired(f"{pg.host.name}: its killed postmaster is still there after {timeout:.0f}s")
        time.sleep(0.1)


class RogueClient(threading.Thread):
    """A client of the app's role that the runbook does not control: it writes orders as fast as it
    can, turns ``default_transaction_read_only`` off (``set_off``) or opens ``BEGIN READ WRITE``
    transactions (``begin_rw``), and reconnects ``backoff`` seconds after each failure, forever.

    Every write goes through the app's ledger as the process ``rogue.1`` (intent before COMMIT, ack
    after), so the drill's ledger check counts its acknowledged writes like the app's: one that is not
    on the database the app ends on is lost; one the old leader accepted after the fence is a leak."""

    def __init__(self, url: str, ledger_dir: Path, *, mode: str, backoff: float, name: str = "rogue.1") -> None:
        super().__init__(daemon=True, name=f"tern-drill-{name}")
        if mode not in ("set_off", "begin_rw"):
            raise ValueError(f"unknown rogue mode {mode!r}")
        self.url, self.mode, self.backoff = url, mode, backoff
        self.ledger = LedgerWriter(ledger_dir, name)
        host, port, _ = url_endpoint(url)
        self.endpoint = f"{host}:{port}"
        self.acked = 0
        self.refused = 0
        self.halt = threading.Event()

    def _write(self, conn: psycopg.Connection) -> None:
        ref = str(uuid.uuid4())
        began = time.time()
        if self.mode == "set_off":
            conn.execute("SET default_transaction_read_only = off")
        conn.execute("INSERT INTO orders (order_ref, channel, customer_email, status, total_cents, notes) "
                     "VALUES (%s, 'web', 'rogue@example.com', 'paid', 0, 'a rogue client')", (ref,))
        self.ledger.intent(time.time(), "orders", ref, self.endpoint, began=began)
        conn.commit()
        self.ledger.ack(time.time(), "orders", ref, self.endpoint)
        self.acked += 1

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                with psycopg.connect(self.url, autocommit=False, connect_timeout=2, prepare_threshold=None,
                                     application_name="tern-drill:rogue") as conn:
                    if self.mode == "begin_rw":
                        conn.read_only = False          # every transaction: BEGIN READ WRITE
                    while not self.halt.is_set():
                        self._write(conn)
                        self.halt.wait(0.01)
            except psycopg.Error as exc:
                self.refused += 1
                self.ledger.error(time.time(), "orders", self.endpoint, error_message(exc))
                self.halt.wait(self.backoff or 0.02)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=15)
        self.ledger.close()


class FullDisk:
    """The journal's disk fills up, then is freed.

    Honest where it can be: as root with the right to mount (CAP_SYS_ADMIN), the run's state
    directory (journals, reports) is put on its own small tmpfs and :meth:`fill` writes a file until
    the filesystem returns ENOSPC - every write tern makes there fails as on a real full disk, and
    nothing else on the machine is touched. Without that right (an unprivileged container),
    :meth:`fill` turns the run's journal file into a link to ``/dev/full`` (every write to it fails
    with ENOSPC; the kernel's own full device): only the journal is full then, not the reports - the
    drill says which it used (``how``)."""

    SIZE = "16m"

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.how = ""
        self.mounted = False
        self._filler: Path | None = None
        self._journal: Path | None = None

    def mount(self) -> str:
        """Put ``state_dir`` on its own tmpfs (its contents carried over); returns how the disk fills."""
        if os.geteuid() == 0 and shutil.which("mount"):
            held = self.state_dir.with_name(self.state_dir.name + ".before-tmpfs")
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.state_dir.rename(held)
            self.state_dir.mkdir()
            res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.SIZE},mode=0755", "tern-drill",
                                  str(self.state_dir)], capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                self.mounted = True
                subprocess.run(["cp", "-a", f"{held}/.", str(self.state_dir)], check=True, timeout=60)
                shutil.rmtree(held, ignore_errors=True)
                self.how = f"the state directory on its own {self.SIZE} tmpfs, filled to ENOSPC"
                return self.how
            self.state_dir.rmdir()
            held.rename(self.state_dir)
        self.how = "the run's journal linked to /dev/full (no right to mount a small filesystem here)"
        return self.how

    def fill(self, journal_path: Path | None, *, pad: bool = False) -> None:
        """Fill the disk. A full filesystem still lets a file grow into the free end of its last block: the
        journal takes a few more records before a write fails, unless ``pad`` fills that end with blank lines
        (which the journal's reader skips) so that the very next record fails."""
        if self.mounted:
            self._filler = self.state_dir / ".drill-filler"
            block = b"\0" * (1 << 20)
            with open(self._filler, "wb", buffering=0) as fh:
                try:
                    while True:
                        fh.write(block)
                except OSError:
                    pass
                try:
                    while True:         # the last partial block
                        fh.write(b"\0" * 4096)
                except OSError:
                    pass
            if pad and journal_path is not None and journal_path.exists():
                fd = os.open(journal_path, os.O_WRONLY | os.O_APPEND)
                try:
                    while True:
                        os.write(fd, b"\n" * 64)
                except OSError:
                    pass
                finally:
                    os.close(fd)
            return
        if journal_path is not None and journal_path.exists() and not journal_path.is_symlink():
            self._journal = journal_path
            journal_path.rename(journal_path.with_name(journal_path.name + ".drill-held"))
            os.symlink("/dev/full", journal_path)

    def free(self) -> None:
        if self._filler is not None:
            self._filler.unlink(missing_ok=True)
            self._filler = None
        if self._journal is not None:
            self._journal.unlink(missing_ok=True)
            self._journal.with_name(self._journal.name + ".drill-held").rename(self._journal)
            self._journal = None

    def unmount(self) -> None:
        """Back to an ordinary directory (its contents kept), so the lab can remove it."""
        self.free()
        if not self.mounted:
            return
        held = self.state_dir.with_name(self.state_dir.name + ".tmpfs-copy")
        subprocess.run(["cp", "-a", str(self.state_dir), str(held)], check=False, timeout=60)
        res = subprocess.run(["umount", str(self.state_dir)], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(self.state_dir)], capture_output=True, text=True, timeout=30)
        self.mounted = False
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if held.exists():
            held.rename(self.state_dir)
