"""Fresh sandboxes for drills, each a copy of a pristine one built once.

A failover is one-way: every drill run needs a sandbox that has not failed over yet. Building one
(initdb, data, base backup, restore of the replicas) costs 15-30 s on 2 cores; copying a stopped one
and starting it costs a few seconds. So the lab builds a *pristine* sandbox once per hop - hop 1:
restored replicas following the archive; hop 2: hop 1 done and ``replicate-aurora`` streaming - stops
it, and gives each run a copy at the same path (a sandbox names its own paths everywhere: data
directories, archive and restore commands, the app's state, the journals).

The pristine sandbox has no pooler (the url switch: every drill's app restart is a config-var change)
and one difference from ``invoke sandbox.up``'s: the replicas read the archive through a directory of
symbolic links (``archive-view/``) instead of the archive itself - their route to the source's WAL,
which a drill can break without touching the source's own ``archive_command`` (see
:meth:`Box.archive_reachable`). The source still archives into ``archive/``.

While a pristine sandbox is stopped its TCP ports are held by this process (bound, not listening), so
another sandbox built meanwhile on this machine cannot take them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..contract import Outputs, load
from ..sandbox import Sandbox
from ..settings import Settings

ARCHIVE_VIEW = "archive-view"
UNREACHABLE = ".unreachable"   # an empty directory the view's wal link points at while it is cut


def node(sb: Sandbox, name: str, state: dict[str, Any] | None = None):
    """A sandbox server, logging where its first start put it: a restored replica logs to the file its
    marker names (``invoke restore`` starts it so, and the repoint reads PostgreSQL's own verdicts there);
    ``Sandbox.node`` would start it logging elsewhere."""
    pg = sb.node(name, state)
    try:
        logged = pg.read_marker().get("log_file")
    except Exception:  # noqa: BLE001 - no marker: the sandbox's own log
        logged = None
    if logged:
        pg.log_file = logged
    return pg


@dataclass
class Box:
    """One drill run's sandbox: a fresh copy of the pristine one, running, with the app writing."""

    hop: int
    root: Path                  # the lab's work directory: sandbox/ and state/
    sb: Sandbox
    settings: Settings          # the run's: its sandbox and its state directory (<root>/state/local)

    @property
    def outputs(self) -> Outputs:
        return load("local", self.sb.root)

    def node(self, name: str):
        """A server of this sandbox (see :func:`node`)."""
        return node(self.sb, name)

    @property
    def state_root(self) -> Path:
        """What ``INVOKE_TERN_STATE_DIR`` names for a CLI run on this box (runs live in its ``local/``)."""
        return self.root / "state"

    def cli_env(self) -> dict[str, str]:
        """Environment for ``invoke`` on this box: its sandbox and state, and every setting the drill
        changed from tern's defaults."""
        env = {"INVOKE_TERN_SANDBOX_DIR": str(self.sb.root), "INVOKE_TERN_STATE_DIR": str(self.state_root)}
        default = Settings()
        for f in dataclasses.fields(Settings):
            if f.name in ("sandbox_dir", "state_dir"):
                continue
            value = getattr(self.settings, f.name)
            if value != getattr(default, f.name) and value is not None:
                env[f"INVOKE_TERN_{f.name.upper()}"] = str(value)
        return env

    def archive_reachable(self, reachable: bool) -> None:
        """The replicas' route to the WAL archive: cut (their ``restore_command`` finds nothing, as when
        EC2 cannot reach S3) or restored. Atomic: a new link renamed over the old one."""
        view = self.sb.root / ARCHIVE_VIEW
        target = UNREACHABLE if not reachable else os.path.relpath(self.sb.archive / "wal", view)
        tmp = view / ".wal.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, view / "wal")


def parallel(calls: list[Callable[[], Any]]) -> None:
    """Run ``calls`` at once (servers start and stop in seconds each: not one after the other); the first
    error is raised once all are done."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        for f in [pool.submit(c) for c in calls]:
            f.result()


def _stop_now(pg) -> None:
    try:
        pg.stop(mode="immediate", timeout=30)
    except Exception:  # noqa: BLE001 - a server that will not stop is killed
        pg.kill()


def default_root() -> Path:
    """Where a lab lives: in memory (``/dev/shm``) when there is room - copying and removing a sandbox a
    run there costs no disk I/O, and a crash drill kills processes, never the machine, so nothing it checks
    depends on the disk - else the system's temporary directory."""
    import tempfile

    shm = Path("/dev/shm")
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 4 * 2**30:
            base = shm
        else:
            base = Path(tempfile.gettempdir())
    except OSError:
        base = Path(tempfile.gettempdir())
    root = Path(tempfile.mkdtemp(prefix="tern-drills-", dir=base))
    os.chmod(root, 0o755)
    return root


class Lab:
    """Builds the pristine sandboxes under ``root`` and hands out fresh copies of them."""

    def __init__(self, root: Path, settings: Settings, *, scale: int = 1, replicas: int = 2, rate: float = 100.0,
                 dataset: str = "inventory", progress: Callable[[str], None] | None = None) -> None:
        self.root = Path(root).absolute()
        self.base = settings
        self.shape = {"scale": scale, "replicas": replicas, "rate": rate, "dataset": dataset}
        self.say = progress or (lambda m: None)
        self.work = self.root / "work"
        self._held: dict[int, socket.socket] = {}
        self.build_seconds: dict[int, float] = {}

    def pristine_dir(self, hop: int) -> Path:
        return self.root / f"pristine-hop{hop}"

    # -- the pristine sandboxes ------------------------------------------------------------
    def prepare(self, hop: int) -> None:
        """Build the pristine sandbox of ``hop`` (and of hop 1 first, for hop 2) unless it exists."""
        if (self.pristine_dir(hop) / "sandbox" / "outputs.json").exists():
            return
        t0 = time.monotonic()
        if hop == 1:
            self._build_hop1()
        else:
            self.prepare(1)
            self._build_hop2()
        self.build_seconds[hop] = round(time.monotonic() - t0, 1)

    def _settings(self) -> Settings:
        return self.base.replace(sandbox_dir=self.work / "sandbox", state_dir=self.work / "state" / "local",
                                 switch_mode="url")

    def _build_hop1(self) -> None:
        from ..restore import restore_all

        self._clear_work()
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.root, self.work):
            d.mkdir(exist_ok=True)
            os.chmod(d, 0o755)
        sb = Sandbox(self.work / "sandbox", pg_bindir=self.base.pg_bindir)
        self.say(f"drill lab: building the pristine sandbox (scale {self.shape['scale']}, "
                 f"{self.shape['replicas']} replicas)")
        sb.up(replicas=self.shape["replicas"], scale=self.shape["scale"], rate=self.shape["rate"],
              dataset=self.shape["dataset"], start_app=False, pooler=False)
        self._archive_view(sb)
        s = self._settings()
        restore_all(load("local", sb.root), timeout=s.restore_timeout, connect_timeout=s.connect_timeout,
                    state_dir=s.state_dir)
        self._stop(sb)
        self.work.rename(self.pristine_dir(1))
        self._hold_ports(self.pristine_dir(1))

    @staticmethod
    def _archive_view(sb: Sandbox) -> None:
        """``archive-view/``: links to the archive's ``wal`` and ``basebackups``; the outputs name it as
        the archive, so the replicas' restore_command reads through it (the source writes to ``archive/``)."""
        view = sb.root / ARCHIVE_VIEW
        view.mkdir()
        (view / UNREACHABLE).mkdir()
        for sub in ("wal", "basebackups"):
            os.symlink(os.path.relpath(sb.archive / sub, view), view / sub)
        for d in (view, view / UNREACHABLE):
            os.chmod(d, 0o755)
        data = json.loads(sb.outputs_file.read_text())
        data["source"]["archive"]["location"] = str(view)
        sb.outputs_file.write_text(json.dumps(data, indent=1))

    def _build_hop2(self) -> None:
        from ..failover.run import failover_ec2
        from ..replication.setup import replicate_aurora

        self.say("drill lab: building the pristine hop-2 sandbox (hop 1 done, replicate-aurora streaming)")
        box = self.fresh(1)
        try:
            time.sleep(1.0)
            failover_ec2(box.outputs, box.settings, confirm=lambda q: True)
            time.sleep(0.5)
            replicate_aurora(box.outputs, box.settings, replica_identity_full=True)
            time.sleep(1.0)
            self._stop(box.sb)
        except BaseException:
            self.discard(box)
            raise
        self.work.rename(self.pristine_dir(2))
        self._hold_ports(self.pristine_dir(2))

    @staticmethod
    def _stop(sb: Sandbox) -> None:
        """The app, then every server, stopped cleanly; nothing removed."""
        sb.app().stop_all(timeout=15)
        for name in sb.state()["nodes"]:
            sb.node(name).stop(mode="fast", timeout=60)

    # -- a run's sandbox --------------------------------------------------------------------
    def fresh(self, hop: int) -> Box:
        """A copy of the pristine sandbox of ``hop`` at the work path, every server and the app running."""
        self.prepare(hop)
        self._clear_work()
        self.work.mkdir()
        os.chmod(self.work, 0o755)
        pristine = self.pristine_dir(hop)
        for entry in pristine.iterdir():
            self._copy(entry, self.work / entry.name)
        self._release_ports()                  # just before the servers bind them
        sb = Sandbox(self.work / "sandbox", pg_bindir=self.base.pg_bindir)
        state = sb.state()
        parallel([lambda n=n: node(sb, n, state).start(timeout=60) for n in state["nodes"]])
        app = sb.app()
        app.scale(app.formation(), timeout=30)
        if hop == 2:
            self._caught_up(sb)
        return Box(hop, self.work, sb, self._settings())

    @staticmethod
    def _caught_up(sb: Sandbox, timeout: float = 60.0, within: int = 256 * 1024) -> None:
        """Hop 2: until Aurora's subscription streams again and is within ``within`` bytes of the leader (its
        servers all started at once: Aurora's apply worker may have retried before the leader was up, and
        failover-aurora's preflight refuses a backlog it does not see shrinking fast enough)."""
        import psycopg

        state = sb.state()
        for name, info in state["nodes"].items():
            if info["kind"] != "ec2":
                continue
            pg = sb.node(name, state)
            url = f"postgresql://{pg._user()}@/app?host={pg.socket_dir}&port={pg.port}"
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    continue
                deadline = time.monotonic() + timeout
                while True:
                    row = conn.execute("SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                                       "FROM pg_replication_slots WHERE slot_type = 'logical' AND "
                                       "slot_name NOT LIKE 'tern_rollback%' ORDER BY slot_name LIMIT 1").fetchone()
                    if row is None or (row[0] and row[1] is not None and row[1] < within):
                        return
                    if time.monotonic() > deadline:
                        return      # the run's preflight will say what is wrong
                    time.sleep(0.2)

    @staticmethod
    def _copy(src: Path, dst: Path) -> None:
        """A data copy; inside the sandbox the WAL archive is hard-linked (an archived segment is never
        rewritten, and 16 MB a segment adds up)."""
        if src.name == "sandbox":
            dst.mkdir()
            os.chmod(dst, 0o755)
            for entry in src.iterdir():
                flags = "-al" if entry.name == "archive" else "-a"
                subprocess.run(["cp", flags, str(entry), str(dst / entry.name)], check=True)
            return
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)

    def discard(self, box: Box | None = None) -> None:
        """Stop and remove the work sandbox (whatever a run left running in it)."""
        self._clear_work()
        if (self.pristine_dir(1)).exists():
            self._hold_ports(self.pristine_dir(1))

    def _clear_work(self) -> None:
        """The work sandbox's app and servers stopped at once (``immediate``: it is thrown away), removed
        (with whatever a drill mounted in it and did not unmount)."""
        sandbox = self.work / "sandbox"
        try:
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        except OSError:
            mounts = []
        for m in mounts:
            if m.startswith(str(self.work) + "/"):
                subprocess.run(["umount", "-l", m], capture_output=True, timeout=30)
        if (sandbox / "sandbox.json").exists():
            sb = Sandbox(sandbox, pg_bindir=self.base.pg_bindir)
            if (sb.app_dir / "state.json").exists():
                sb.app().stop_all(timeout=15)
            state = sb.state()
            parallel([lambda n=n: _stop_now(sb.node(n, state)) for n in state["nodes"]])
        if self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)
        from ..sandbox import build

        if hasattr(build, "release_ports"):
            build.release_ports(sandbox)      # its port claims (this process holds the pristine's ports itself)

    def close(self) -> None:
        """Remove everything the lab built."""
        self._clear_work()
        self._release_ports()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- ports -----------------------------------------------------------------------------
    def _hold_ports(self, pristine: Path) -> None:
        """Bind (not listen on) the pristine sandbox's ports, without SO_REUSEADDR: nobody else can
        bind them until a run starts the servers. Best effort (a port in TIME_WAIT stays unheld)."""
        try:
            state = json.loads((pristine / "sandbox" / "sandbox.json").read_text())
        except (OSError, ValueError):
            return
        for info in state.get("nodes", {}).values():
            port = int(info["port"])
            if port in self._held:
                continue
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
                self._held[port] = s
            except OSError:
                s.close()

    def _release_ports(self) -> None:
        for s in self._held.values():
            s.close()
        self._held.clear()

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), **self.shape, "build_seconds": self.build_seconds}
