"""Build and tear down the sandbox. See :mod:`runbook.sandbox`."""

from __future__ import annotations

import json
import logging
import os
import pwd
import secrets as pysecrets
import shutil
import signal
import socket
import subprocess
import time
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ..adapters.local_app import LocalApp
from ..adapters.local_host import LocalHost, effective_os_user
from ..errors import ConfigError, SandboxError
from ..pg import bindir as find_bindir, make_url, server_major
from ..postgres import PgHost
from ..secrets import write_secret_file
from ..workload.state import AppState, write_state

log = logging.getLogger(__name__)

ZONES = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d", "us-east-1e", "us-east-1f"]
APP_DB = "app"
APP_ROLE = "app"
SANDBOX_SUPERUSER = "postgres"   # Heroku's own operator role: the runbook never uses it on the source
AURORA_MASTER = "tern_master"
RDS_SUPERUSER = "rds_superuser"   # Aurora's role of its master user: no SUPERUSER
# With rds.logical_replication = 1 Aurora grants its master rds_replication: it may open replication
# connections (a subscription on EC2 reads Aurora's changes for the rollback). PostgreSQL 15 has no
# such role: the stand-in gives the master the REPLICATION attribute instead.
RDS_SUPERUSER_GRANTS = ("pg_read_all_data", "pg_write_all_data", "pg_signal_backend", "pg_monitor")
DATASETS = ("inventory", "chinook")
# Heroku's databases use en_US.UTF-8 (a glibc collation with a version the collation check compares);
# without it (a laptop that has not generated it) the sandbox falls back to C.UTF-8, which has none
LOCALE = "en_US.UTF-8"
FALLBACK_LOCALE = "C.UTF-8"

# The pooler (issue #12): one real PgBouncer in front of the database, as pooler-a on AWS
POOLER_DIR = "pooler"             # nodes/pooler
POOLER_NODE = "pooler-a"          # the contract's pooler.nodes[0].name
POOLER_ZONE = ZONES[0]
POOLER_ADMIN = "tern_admin"       # admin_users: the admin console is tern's
PGBOUNCER_FALLBACK = "/usr/sbin/pgbouncer"   # Debian's, off an ordinary user's PATH

ARCHIVE_COMMAND = (
    "d={arch}/wal; if [ -f $d/%f ]; then cmp -s %p $d/%f; "
    "else cp %p $d/.%f.tmp && sync $d/.%f.tmp && mv $d/.%f.tmp $d/%f; fi"
)


def have_locale(name: str) -> bool:
    """Whether ``locale -a`` lists ``name`` (en_US.UTF-8 is listed as en_US.utf8 by glibc)."""
    def norm(x: str) -> str:
        return x.strip().lower().replace("-", "")

    try:
        out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return norm(name) in {norm(line) for line in out.splitlines()}


def sandbox_locale() -> str:
    if have_locale(LOCALE):
        return LOCALE
    log.warning("the %s locale is missing (run ./dev setup, or generate it: Debian `locale-gen`): the sandbox uses %s, "
                "so the collation check sees no collation version", LOCALE, FALLBACK_LOCALE)
    return FALLBACK_LOCALE


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable, or None (the sandbox then runs without a pooler)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return PGBOUNCER_FALLBACK if os.access(PGBOUNCER_FALLBACK, os.X_OK) else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass   # someone else's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _port_open(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _claims_dir() -> Path:
    import tempfile

    d = Path(tempfile.gettempdir()) / f"tern-port-claims-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _claim(port: int, owner: Path) -> bool:
    """Claim ``port`` for the sandbox at ``owner`` until :func:`release_ports`.

    A port that is free now may belong to another sandbox whose server is stopped for a moment (a
    restart, a rebuild in a repoint); binding alone cannot see that, and two sandboxes on one machine
    (parallel tests, two operators) would then share a port and talk to each other's servers. A claim
    whose owner no longer exists is stale and taken over."""
    path = _claims_dir() / str(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                holder = Path(path.read_text().strip())
            except OSError:
                continue
            if holder == owner:
                return True
            if str(holder) and holder.exists():
                return False
            path.unlink(missing_ok=True)   # stale: its sandbox is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(owner))
        return True
    return False


def release_ports(owner: Path) -> None:
    """Drop every port claim held by the sandbox at ``owner``."""
    owner = Path(owner).absolute()
    for path in _claims_dir().iterdir():
        try:
            if Path(path.read_text().strip()) == owner:
                path.unlink(missing_ok=True)
        except OSError:
            pass


def _free_ports(count: int, start: int | None = None, *, owner: Path | None = None) -> list[int]:
    """Free loopback ports, claimed for ``owner`` (see :func:`_claim`); the scan starts at a random point."""
    import random

    ports: list[int] = []
    port = start if start is not None else 55432 + random.randrange(0, 4000)
    while len(ports) < count and port < 65000:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                free = True
            except OSError:
                free = False
        if free and (owner is None or _claim(port, owner)):
            ports.append(port)
        port += 1
    if len(ports) < count:
        raise SandboxError("no free loopback ports for the sandbox")
    return ports


class Sandbox:
    def __init__(self, root: Path, *, pg_bindir: str | None = None, os_user: str = "postgres") -> None:
        self.root = Path(root).absolute()
        self.pg_bindir = pg_bindir
        self.os_user = os_user
        self.state_file = self.root / "sandbox.json"
        self.secrets_file = self.root / "secrets.json"
        self.outputs_file = self.root / "outputs.json"
        self.archive = self.root / "archive"
        self.app_dir = self.root / "app"

    # -- helpers ----------------------------------------------------------------
    def exists(self) -> bool:
        return self.outputs_file.exists()

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())

    def node(self, name: str, state: dict[str, Any] | None = None) -> PgHost:
        state = state or self.state()
        info = state["nodes"][name]
        node_dir = self.root / "nodes" / name
        return PgHost(LocalHost(name, self.os_user), bin_dir=state["bin_dir"], data_dir=str(node_dir / "data"),
                      socket_dir=str(node_dir / "run"), port=info["port"], superuser=SANDBOX_SUPERUSER,
                      log_file=str(node_dir / "postgres.log"))

    def app(self) -> LocalApp:
        return LocalApp(self.app_dir)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(self.os_user)
            for dirpath, dirnames, filenames in os.walk(path):
                os.chown(dirpath, pw.pw_uid, pw.pw_gid)
                for f in filenames:
                    os.chown(os.path.join(dirpath, f), pw.pw_uid, pw.pw_gid)

    def _check_reachable(self) -> None:
        if os.geteuid() != 0:
            return
        probe = subprocess.run(["runuser", "-u", self.os_user, "--", "test", "-x", str(self.root)],
                               capture_output=True, check=False)
        if probe.returncode != 0:
            raise SandboxError(f"the {self.os_user} OS user cannot reach {self.root}: put the sandbox where it can "
                               "(every parent directory must be traversable), e.g. under /tmp")

    # -- up -----------------------------------------------------------------------
    def up(self, *, replicas: int = 2, scale: int = 1, dataset: str = "inventory", rate: float = 100.0,
           start_app: bool = True, progress=None, pooler: bool | None = False) -> dict[str, Any]:
        """Build the sandbox (or, when it is up, make sure every process runs). ``pooler``: a PgBouncer
        in front of the source (None: when a pgbouncer binary is found; the rehearsal asks for that).
        Without one, the failovers switch the app by DATABASE_URL (their ``auto`` switch mode)."""
        if dataset not in DATASETS:
            raise ConfigError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
        if not 2 <= replicas <= len(ZONES):
            raise ConfigError(f"replicas must be between 2 and {len(ZONES)} (one per availability zone), got {replicas}")
        if scale < 1 or scale > 1000:
            raise ConfigError(f"scale must be between 1 and 1000, got {scale}")
        if rate <= 0:
            raise ConfigError(f"rate must be positive, got {rate}")
        step = progress or (lambda msg: log.info(msg))
        pgbouncer = pgbouncer_binary()
        if pooler and pgbouncer is None:
            raise ConfigError("a pooler was asked for but no pgbouncer binary is found (on PATH or "
                              f"{PGBOUNCER_FALLBACK}): run ./dev setup, or install the pgbouncer package")
        if pooler is None:
            pooler = pgbouncer is not None
            if not pooler and not self.exists():
                log.info("no pgbouncer binary found: the sandbox runs without a pooler")
        if self.exists():
            if pooler and not self.has_pooler():
                raise ConfigError(f"the sandbox in {self.root} is up without a pooler: take it down "
                                  "(invoke sandbox.down) to build it again with one")
            step("sandbox already up: making sure every server runs")
            self.ensure_running(start_app=start_app)
            return self.outputs()
        if self.root.exists():
            step("removing a half-built sandbox")
            self.down(check_ledger=False)
        bin_dir = find_bindir(self.pg_bindir)
        major = server_major(bin_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._check_reachable()
        names = ["source", "aurora"] + [f"ec2-{chr(ord('a') + i)}" for i in range(replicas)]
        ports = _free_ports(len(names) + (1 if pooler else 0), owner=self.root)
        state = {
            "bin_dir": str(bin_dir), "pg_major": major, "dataset": dataset, "scale": scale,
            "locale": sandbox_locale(),
            "os_user": self.os_user, "created_at": time.time(),
            "nodes": {n: {"port": p, "kind": "source" if n == "source" else "aurora" if n == "aurora" else "ec2"}
                      for n, p in zip(names, ports)},
        }
        for i, n in enumerate(names[2:]):
            state["nodes"][n]["availability_zone"] = ZONES[i]
        if pooler:
            # not in "nodes" (those are PostgreSQL servers): the pooler is its own kind of process
            state["pooler"] = {"port": ports[len(names)], "binary": pgbouncer, "name": POOLER_NODE,
                               "availability_zone": POOLER_ZONE}
        for sub in ("nodes", "archive/wal", "archive/basebackups"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for n in names:
            (self.root / "nodes" / n / "run").mkdir(parents=True, exist_ok=True)
            os.chmod(self.root / "nodes" / n / "run", 0o700)
        self._chown(self.root / "nodes")
        self._chown(self.archive)
        self.state_file.write_text(json.dumps(state, indent=1))
        passwords = {k: pysecrets.token_urlsafe(18) for k in ("app_password", "aurora_master_password",
                                                               "replication_password")}
        if pooler:
            passwords["pooler_admin_password"] = pysecrets.token_urlsafe(18)
        write_secret_file(self.secrets_file, passwords)

        step("creating the Heroku stand-in (source)")
        self._init_source(state, passwords)
        step(f"loading the {dataset} dataset (scale {scale})")
        self._load_data(state, passwords, dataset, scale)
        step("taking the base backup into the archive")
        self.take_base_backup(state)
        step("creating the Aurora stand-in")
        self._init_aurora(state, passwords)
        if pooler:
            step("starting the pooler (PgBouncer) in front of the source")
            self._init_pooler(state, passwords)
        self._write_outputs(state)
        self.app_dir.mkdir(parents=True, exist_ok=True)
        write_state(self.app_dir, AppState(
            config_vars={"DATABASE_URL": self.source_url(state, passwords["app_password"])},
            formation={"web": 1, "worker": 1}, rate=rate))
        os.chmod(self.app_dir / "state.json", 0o600)
        if start_app:
            step("starting the app (web and worker)")
            self.app().scale({"web": 1, "worker": 1}, timeout=30)
        return self.outputs()

    def source_url(self, state: dict[str, Any], password: str) -> str:
        return make_url("127.0.0.1", state["nodes"]["source"]["port"], APP_ROLE, password, APP_DB)

    def _init_cluster(self, pg: PgHost, conf: dict[str, Any], hba: str, state: dict[str, Any]) -> None:
        pg.host.run([f"{pg.bin_dir}/initdb", "-D", pg.data_dir, "-U", SANDBOX_SUPERUSER, "-A", "trust",
                     "--encoding", "UTF8", "--locale", state.get("locale", FALLBACK_LOCALE), "--data-checksums"],
                    timeout=120)
        lines = [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in conf.items()]
        lines = [ln.replace('"', "'") for ln in lines]
        pg.host.run(["sh", "-c", 'cat >> "$1/postgresql.conf"', "sh", pg.data_dir],
                    input="\n# tern sandbox\n" + "\n".join(lines) + "\n", timeout=10)
        pg.host.write_file(f"{pg.data_dir}/pg_hba.conf", hba)
        self._start_new(pg, state)

    def _start_new(self, pg: PgHost, state: dict[str, Any], attempts: int = 5) -> None:
        """Start a new cluster; if another process took its port meanwhile, move to a free one."""
        from ..errors import CommandError

        for attempt in range(attempts):
            try:
                pg.start(timeout=60)
                return
            except CommandError:
                log_text = pg.host.read_file(pg.log_file or "") or ""
                if "already in use" not in log_text or attempt == attempts - 1:
                    raise
                pg.port = _free_ports(1, owner=self.root)[0]
                pg.host.run(["sh", "-c", 'echo "port = $2" >> "$1/postgresql.conf"', "sh", pg.data_dir,
                             str(pg.port)], timeout=10)
                state["nodes"][pg.host.name]["port"] = pg.port
                self.state_file.write_text(json.dumps(state, indent=1))

    @staticmethod
    def _base_conf(port: int, socket_dir: str) -> dict[str, Any]:
        return {"listen_addresses": "127.0.0.1", "port": port, "unix_socket_directories": socket_dir,
                "shared_buffers": "128MB", "max_connections": 100, "password_encryption": "scram-sha-256",
                "log_line_prefix": "%m [%p] %q%u@%d ", "log_min_messages": "warning"}

    def _init_source(self, state: dict[str, Any], passwords: dict[str, str]) -> None:
        pg = self.node("source", state)
        conf = self._base_conf(pg.port, pg.socket_dir)
        conf.update({
            "wal_level": "replica", "archive_mode": "on", "archive_timeout": 60,
            "archive_command": ARCHIVE_COMMAND.format(arch=self.archive),
            "max_wal_senders": 10, "wal_keep_size": "0",
        })
        hba = (f"local all {SANDBOX_SUPERUSER} trust\n"
               f"local replication {SANDBOX_SUPERUSER} trust\n"
               "host all all 127.0.0.1/32 scram-sha-256\n"
               "host replication all 127.0.0.1/32 scram-sha-256\n")
        self._init_cluster(pg, conf, hba, state)
        pg.psql(f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOCREATEROLE NOREPLICATION "
                f"PASSWORD {_literal(passwords['app_password'])}")
        pg.psql(f"CREATE DATABASE {APP_DB} OWNER {APP_ROLE}")
        pg.psql("CREATE EXTENSION IF NOT EXISTS amcheck", database=APP_DB)

    def _load_data(self, state: dict[str, Any], passwords: dict[str, str], dataset: str, scale: int) -> None:
        url = self.source_url(state, passwords["app_password"])
        schema = resources.files("runbook.workload").joinpath("schema.sql").read_text()
        seed = resources.files("runbook.workload").joinpath("seed.sql").read_text()
        with psycopg.connect(url, autocommit=True, application_name="tern:sandbox-load") as conn:
            conn.execute(schema)
            conn.execute(seed.replace("%(scale)s", str(int(scale))))
            if dataset == "chinook":
                conn.execute(_chinook_sql())

    def take_base_backup(self, state: dict[str, Any] | None = None) -> str:
        state = state or self.state()
        pg = self.node("source", state)
        name = time.strftime("base_%Y%m%dT%H%M%S", time.gmtime())
        target = self.archive / "basebackups" / name
        pg.host.run([f"{pg.bin_dir}/pg_basebackup", "-h", pg.socket_dir, "-p", str(pg.port), "-U", SANDBOX_SUPERUSER,
                     "-D", str(target), "-Ft", "-X", "none", "-c", "fast", "--no-password"], timeout=1800)
        info = pg.query_one("SELECT system_identifier::text AS system_identifier FROM pg_control_system()")
        sentinel = {"name": name, "pg_major": state["pg_major"], "system_identifier": info["system_identifier"],
                    "finished_at": time.time(), "format": "tar", "superuser": SANDBOX_SUPERUSER}
        pg.host.write_file(str(target / "backup_sentinel.json"), json.dumps(sentinel, indent=1))
        pg.host.write_file(str(self.archive / "basebackups" / "LATEST"), name + "\n")
        pg.host.run(["chmod", "-R", "go+rX", str(self.archive)], timeout=60)
        return name

    def _init_aurora(self, state: dict[str, Any], passwords: dict[str, str]) -> None:
        pg = self.node("aurora", state)
        conf = self._base_conf(pg.port, pg.socket_dir)
        conf.update({"wal_level": "logical", "max_replication_slots": 10, "max_logical_replication_workers": 8,
                     "max_worker_processes": 16})
        # the node's own superuser is reached only over its 0700 socket directory: that is the RDS
        # stand-in's privileged path (runbook/adapters/aurora.py), replication for its snapshots
        hba = (f"local all {SANDBOX_SUPERUSER} trust\n"
               f"local replication {SANDBOX_SUPERUSER} trust\n"
               "host all all 127.0.0.1/32 scram-sha-256\n")
        self._init_cluster(pg, conf, hba, state)
        # Aurora has no superuser: its master is a member of rds_superuser. What PostgreSQL 15 keeps for a
        # superuser and Aurora lets rds_superuser do (CREATE SUBSCRIPTION) goes through the stand-in.
        grants = [g for g in RDS_SUPERUSER_GRANTS if state["pg_major"] >= 14 or "_all_data" not in g]  # 14+ roles
        pg.psql(f"CREATE ROLE {RDS_SUPERUSER} NOLOGIN NOSUPERUSER NOREPLICATION CREATEROLE CREATEDB;\n"
                f"GRANT {', '.join(grants)} TO {RDS_SUPERUSER};\n"
                f"CREATE ROLE {AURORA_MASTER} LOGIN NOSUPERUSER REPLICATION CREATEROLE CREATEDB "
                f"IN ROLE {RDS_SUPERUSER} PASSWORD {_literal(passwords['aurora_master_password'])};")
        pg.psql(f"CREATE DATABASE {APP_DB} OWNER {AURORA_MASTER}")

    # -- pooler -------------------------------------------------------------------
    @property
    def pooler_dir(self) -> Path:
        return self.root / "nodes" / POOLER_DIR

    def _pooler_paths(self) -> dict[str, Path]:
        d = self.pooler_dir
        return {"ini": d / "pgbouncer.ini", "userlist": d / "userlist.txt", "databases": d / "databases.ini",
                "cert": d / "tls" / "server.crt", "key": d / "tls" / "server.key", "run": d / "run",
                "pidfile": d / "run" / "pgbouncer.pid", "logfile": d / "pgbouncer.log"}

    def _pooler_ini(self, port: int) -> str:
        p = self._pooler_paths()
        return (f"""# tern sandbox: PgBouncer in front of the database (issue #12)
; tern names the database in {p["databases"]} (point: rewrite, then RELOAD)
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {p["run"]}
auth_type = scram-sha-256
auth_file = {p["userlist"]}
admin_users = {POOLER_ADMIN}
pool_mode = transaction
max_client_conn = 500
default_pool_size = 20
client_tls_sslmode = require
client_tls_key_file = {p["key"]}
client_tls_cert_file = {p["cert"]}
; the EC2 replicas accept only TLS; the Heroku stand-in has none
server_tls_sslmode = prefer
ignore_startup_parameters = extra_float_digits,options
query_wait_timeout = 120
server_reset_query =
logfile = {p["logfile"]}
pidfile = {p["pidfile"]}

%include {p["databases"]}
""")

    def _init_pooler(self, state: dict[str, Any], passwords: dict[str, str]) -> None:
        """nodes/pooler: its configuration, the app role's and tern_admin's passwords, a self-signed
        certificate, the databases file naming the source; then PgBouncer, started."""
        from ..pooler import Target, databases_text

        info = state["pooler"]
        p = self._pooler_paths()
        self.pooler_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.pooler_dir, 0o700)
        p["run"].mkdir(exist_ok=True)
        os.chmod(p["run"], 0o700)
        p["cert"].parent.mkdir(exist_ok=True)
        os.chmod(p["cert"].parent, 0o700)
        self._chown(self.pooler_dir)
        host = LocalHost(POOLER_NODE, self.os_user)     # the files are the OS user's that runs pgbouncer
        # tern_admin only, as on AWS: the failover's pooler_auth step adds the app role's SCRAM verifier (read
        # on a restored replica) through the node's command channel, the same code as on AWS; the file is 0600
        host.write_file(str(p["userlist"]), f'"{POOLER_ADMIN}" "{passwords["pooler_admin_password"]}"\n')
        source = Target("127.0.0.1", int(state["nodes"]["source"]["port"]), APP_DB)
        host.write_file(str(p["databases"]), databases_text(APP_DB, source))
        if shutil.which("openssl") is None:
            raise ConfigError("openssl is not installed: the sandbox's pooler needs it for its certificate "
                              "(Debian: apt-get install openssl)")
        host.run(["sh", "-c", 'umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 '
                  '-nodes -days 3650 -sha256 -subj "/CN=127.0.0.1" -addext "subjectAltName=IP:127.0.0.1" '
                  '-keyout "$1" -out "$2" 2>&1', "sh", str(p["key"]), str(p["cert"])], timeout=120)
        host.write_file(str(p["ini"]), self._pooler_ini(info["port"]))
        self._start_pooler(state)

    def _start_pooler(self, state: dict[str, Any], *, attempts: int = 5, timeout: float = 30.0) -> None:
        """Start PgBouncer daemonized as the OS user; return once it accepts connections. If another
        process took its port meanwhile (a new sandbox only), move to a free one."""
        info = state["pooler"]
        p = self._pooler_paths()
        host = LocalHost(POOLER_NODE, self.os_user)
        for attempt in range(attempts):
            if self._pooler_pid() is None:
                # a stale pidfile whose pid now belongs to another process would stop pgbouncer starting
                p["pidfile"].unlink(missing_ok=True)
            offset = p["logfile"].stat().st_size if p["logfile"].exists() else 0
            # -q: nothing on stderr (the logfile has it); -d: the command returns once it has forked
            host.run([info["binary"], "-d", "-q", str(p["ini"])], timeout=60, check=False)
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout:
                pid = self._pooler_pid()
                # PgBouncer (1.18) does not exit when its TCP port is taken: it warns "cannot listen on
                # ...: Address already in use" and serves its unix socket only, while the port answers
                # for someone else. Ready: the admin console lets tern_admin in on the port.
                if pid is not None and "cannot listen" in self._pooler_log(offset):
                    break
                if pid is not None and _port_open(info["port"]) and self._pooler_answers(info["port"]):
                    return
                if pid is None and time.monotonic() - t0 > 2:
                    break   # no process after 2 s: it failed (its log says why)
                time.sleep(0.05)
            log_text = self._pooler_log(offset)
            if "already in use" in log_text and attempt < attempts - 1 and not self.exists():
                self.stop_pooler()
                info["port"] = _free_ports(1, owner=self.root)[0]
                host.write_file(str(p["ini"]), self._pooler_ini(info["port"]))
                self.state_file.write_text(json.dumps(state, indent=1))
                continue
            self.stop_pooler()
            tail = "\n".join(log_text.strip().splitlines()[-5:]) or "(nothing in its log)"
            raise SandboxError(f"the pooler (pgbouncer on 127.0.0.1:{info['port']}) did not start within "
                               f"{timeout:.0f}s; {p['logfile']}:\n{tail}")

    def _pooler_answers(self, port: int) -> bool:
        """Whether this sandbox's PgBouncer answers on ``port``: its admin console lets tern_admin in
        (someone else on the port would not)."""
        try:
            password = json.loads(self.secrets_file.read_text())["pooler_admin_password"]
            with psycopg.connect(host="127.0.0.1", port=port, dbname="pgbouncer", user=POOLER_ADMIN,
                                 password=password, sslmode="require", connect_timeout=2, autocommit=True,
                                 cursor_factory=psycopg.ClientCursor, application_name="tern:sandbox") as conn:
                conn.execute("SHOW VERSION")
            return True
        except (OSError, KeyError, ValueError, psycopg.Error):
            return False

    def _pooler_log(self, offset: int = 0) -> str:
        try:
            with open(self._pooler_paths()["logfile"], "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _pooler_pid(self) -> int | None:
        """The running pgbouncer's pid (from its pidfile), or None."""
        try:
            pid = int(self._pooler_paths()["pidfile"].read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 0 or not _pid_alive(pid):
            return None
        try:   # a stale pidfile may name someone else's process: only ours is signalled
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return pid   # no /proc: trust the pidfile
        ours = any(os.path.basename(a) == b"pgbouncer" for a in cmdline[:1]) and \
            str(self._pooler_paths()["ini"]).encode() in cmdline
        return pid if ours else None

    def has_pooler(self) -> bool:
        return self.state_file.exists() and bool(self.state().get("pooler"))

    def pooler_running(self) -> bool:
        """PgBouncer runs and accepts connections."""
        if not self.has_pooler():
            return False
        return self._pooler_pid() is not None and _port_open(self.state()["pooler"]["port"])

    def start_pooler(self) -> None:
        """Start the pooler if it is not running (it keeps its port and databases file)."""
        if not self.has_pooler():
            raise SandboxError("this sandbox has no pooler (it was built without pgbouncer)")
        if self._pooler_pid() is None:
            self._start_pooler(self.state())

    def stop_pooler(self, timeout: float = 10.0) -> None:
        """Stop PgBouncer: SIGINT (its safe shutdown: waits for the transactions in flight), then SIGKILL
        if it has not gone within ``timeout``. Idempotent."""
        pid = self._pooler_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                log.warning("the pooler (pid %d) did not stop within %.0fs: killing it", pid, timeout)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
        # a stale pidfile (a kill leaves it) could name someone else's process later
        self._pooler_paths()["pidfile"].unlink(missing_ok=True)

    def _pooler_outputs(self, state: dict[str, Any]) -> dict[str, Any] | None:
        info = state.get("pooler")
        if not info:
            return None
        return {"kind": "pgbouncer", "host": "127.0.0.1", "port": info["port"], "database": APP_DB, "tls": True,
                "admin_user": POOLER_ADMIN, "admin_password": f"file:{self.secrets_file}#pooler_admin_password",
                "nodes": [{"name": info.get("name", POOLER_NODE),
                           "availability_zone": info.get("availability_zone", POOLER_ZONE),
                           "admin_host": "127.0.0.1", "admin_port": info["port"],
                           "commands": {"kind": "local", "os_user": self.os_user},
                           "databases_file": str(self._pooler_paths()["databases"]),
                           "auth_file": str(self._pooler_paths()["userlist"])}]}

    def _aurora_api(self, state: dict[str, Any]) -> dict[str, Any]:
        """The stand-in for the RDS API (contract ``aurora.api``, kind ``local``): the node's superuser."""
        pg = self.node("aurora", state)
        return {"kind": "local", "bin_dir": pg.bin_dir, "data_dir": pg.data_dir, "socket_dir": pg.socket_dir,
                "port": pg.port, "os_user": self.os_user, "superuser": SANDBOX_SUPERUSER, "log_file": pg.log_file}

    def _write_outputs(self, state: dict[str, Any]) -> None:
        ref = f"file:{self.secrets_file}"
        replicas = []
        for name, info in state["nodes"].items():
            if info["kind"] != "ec2":
                continue
            node_dir = self.root / "nodes" / name
            replicas.append({
                "name": name, "availability_zone": info["availability_zone"], "host": "127.0.0.1",
                "port": info["port"], "database": APP_DB, "data_dir": str(node_dir / "data"),
                "bin_dir": state["bin_dir"], "socket_dir": str(node_dir / "run"),
                "commands": {"kind": "local", "os_user": self.os_user},
            })
        outputs = {
            "schema_version": 1, "stack": "local", "rehearsal": True, "region": "us-east-1",
            "source": {"heroku_app": "tern-sandbox-app", "database_url_var": "DATABASE_URL",
                       "archive": {"kind": "directory", "location": str(self.archive), "base_backup": "LATEST"},
                       "pg_major": state["pg_major"]},
            "app": {"kind": "local", "name": "tern-sandbox-app", "state_dir": str(self.app_dir)},
            "replicas": replicas,
            "aurora": {"writer_endpoint": "127.0.0.1", "reader_endpoint": "127.0.0.1",
                       "port": state["nodes"]["aurora"]["port"], "database": APP_DB,
                       "master_user": AURORA_MASTER, "master_password": f"{ref}#aurora_master_password",
                       "api": self._aurora_api(state)},
            "dms": None,
            "pooler": self._pooler_outputs(state),
            "credentials": {"replication_password": f"{ref}#replication_password"},
            # tern runs on this machine: the replicas admit its client certificate from loopback only
            "admin_cidrs": ["127.0.0.1/32", "::1/128"],
        }
        from ..contract import parse

        parse(outputs, origin="sandbox outputs")  # the sandbox must honour the contract it promises
        self.outputs_file.write_text(json.dumps(outputs, indent=1))

    def outputs(self) -> dict[str, Any]:
        return json.loads(self.outputs_file.read_text())

    def ensure_running(self, *, start_app: bool = True) -> None:
        state = self.state()
        for name in state["nodes"]:
            pg = self.node(name, state)
            if pg.has_data():
                pg.start(timeout=60)
        if state.get("pooler") and self._pooler_pid() is None:
            self._start_pooler(state)
        if start_app:
            app = self.app()
            formation = app.formation()
            app.scale(formation, timeout=30)

    # -- down ---------------------------------------------------------------------
    def down(self, *, check_ledger: bool = True) -> dict[str, Any] | None:
        """Stop the app, check its ledger against the database it writes to, stop every server, remove all."""
        result = None
        if not self.root.exists():
            return None
        app = self.app()
        if (self.app_dir / "state.json").exists():
            app.stop_all(timeout=15)
            if check_ledger and self.state_file.exists():
                result = self.check_ledger()
        if self.state_file.exists():
            state = self.state()
            if state.get("pooler"):
                self.stop_pooler()   # before the servers: its server connections close cleanly
            for name in state["nodes"]:
                pg = self.node(name, state)
                try:
                    pg.stop(mode="fast", timeout=30)
                except Exception:  # noqa: BLE001 - a server that will not stop is killed
                    pg.kill()
        shutil.rmtree(self.root, ignore_errors=True)
        release_ports(self.root)
        return result

    def check_ledger_after_stop(self) -> dict[str, Any]:
        """Stop the app (keeping its formation), then check the ledger."""
        self.app().stop_all(timeout=15)
        return self.check_ledger()

    def check_ledger(self) -> dict[str, Any]:
        """The ledger against the database DATABASE_URL points at now (the app must be stopped)."""
        from ..pg import url_endpoint
        from ..workload import ledger

        app = self.app()
        url = app.config_var("DATABASE_URL")
        host, port, _ = url_endpoint(url)
        entries = ledger.read(self.app_dir)
        with psycopg.connect(url, autocommit=True, application_name="tern:ledger-check") as conn:
            res = ledger.check(entries, conn, exact=True)
        return {"endpoint": f"{host}:{port}", "acknowledged": res.acknowledged, "in_doubt": res.in_doubt,
                "missing": res.lost, "missing_keys": {t: v[:20] for t, v in res.missing.items()},
                "unexplained": sum(len(v) for v in res.unexplained.values()), "ok": res.ok}


def _literal(value: str) -> str:
    return sql.Literal(value).as_string(None)


def _chinook_sql() -> str:
    """The Chinook script without its DROP/CREATE DATABASE and \\c lines (loaded into the app's database)."""
    candidates = [Path(os.environ.get("TERN_SHARED_DIR", "")) / "datasets/chinook/chinook.sql",
                  Path(__file__).resolve().parents[2].parent / "shared/datasets/chinook/chinook.sql"]
    for path in candidates:
        if path.is_file():
            break
    else:
        raise ConfigError("the chinook dataset is not found (looked for ../shared/datasets/chinook/chinook.sql; "
                          "set TERN_SHARED_DIR)")
    keep = []
    for line in path.read_text().splitlines():
        s = line.strip().upper()
        if s.startswith("DROP DATABASE") or s.startswith("CREATE DATABASE") or s.startswith("\\C"):
            continue
        keep.append(line)
    return "\n".join(keep)


__all__ = ["Sandbox", "effective_os_user"]
