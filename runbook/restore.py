"""``invoke restore``: make each EC2 replica a hot standby of the source, fed by the WAL archive.

Idempotent: a restored, running standby is left alone; a restored but stopped one is
started; a half-restored one (no marker) is wiped and restored again - it never served.
Refuses, with nothing changed, when the archive or base backup is missing or the
PostgreSQL major version differs from the source's.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from . import archive as archive_mod
from .adapters import app_for, host_for
from .contract import Outputs, Replica
from .errors import PreflightError, RunbookError
from .pg import connect, parse_major
from .postgres import PgHost, literal
from .status import replica_host, source_url

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]   # (replica, done bytes, total bytes)


def standby_settings(replica: Replica, restore_cmd: str) -> dict[str, str | int]:
    return {
        "listen_addresses": replica.host if replica.host in ("127.0.0.1", "localhost") else "*",
        "port": replica.port,
        "unix_socket_directories": replica.socket_dir,
        "hot_standby": "on",
        "hot_standby_feedback": "on",
        "archive_mode": "off",               # the replica never writes into Heroku's bucket
        "restore_command": restore_cmd,
        "recovery_target_timeline": "latest",
        "wal_retrieve_retry_interval": "200ms",  # poll the archive often: the final segment matters at cutover
        "wal_level": "logical",              # ready to publish to Aurora once it leads
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        # keep recent segments: at the cutover the other replicas stream what they miss from the new leader
        "wal_keep_size": "2GB",
        "primary_conninfo": "",
    }


def _conf_lines(settings: dict[str, str | int]) -> str:
    lines = ["# written by tern restore; ALTER SYSTEM edits below are kept"]
    for k, v in settings.items():
        lines.append(f"{k} = {v}" if isinstance(v, int) else f"{k} = {literal(str(v))}")
    return "\n".join(lines) + "\n"


HBA = ("# tern: local socket (directory 0700) for the host's own tools; TCP with passwords\n"
       "local all all trust\n"
       "local replication all trust\n"
       "host all all 127.0.0.1/32 scram-sha-256\n"
       "host all all 0.0.0.0/0 scram-sha-256\n"
       "host replication all 127.0.0.1/32 scram-sha-256\n"
       "host replication all 0.0.0.0/0 scram-sha-256\n")


def source_identity(outputs: Outputs, timeout: float) -> dict[str, object]:
    """What the source says of itself, through the app's own role."""
    app = app_for(outputs.app)
    with connect(source_url(app, outputs), purpose="restore-preflight", timeout=timeout) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int / 10000, "
                           "(SELECT rolname FROM pg_roles WHERE oid = 10), "
                           "(SELECT system_identifier::text FROM pg_control_system())").fetchone()
    return {"pg_major": row[0], "superuser": row[1], "system_identifier": row[2]}


def restore_replica(outputs: Outputs, replica: Replica, *, timeout: float, identity: dict[str, object],
                    progress: Progress | None = None) -> str:
    """Restore one replica; returns what was done (restored / started / already running)."""
    pg = replica_host(replica)
    marker = pg.read_marker()
    if marker.get("restored_from") and pg.has_data():
        if pg.is_running():
            return "already restored and running"
        pg.start(timeout=60)
        return "restored earlier; started"
    host = pg.host
    backup = archive_mod.find_base_backup(outputs.source.archive, host)
    server_major = parse_major(host.run([f"{replica.bin_dir}/postgres", "--version"], timeout=30).stdout)
    if backup.pg_major != outputs.source.pg_major or server_major != backup.pg_major:
        raise PreflightError(f"{replica.name}: PostgreSQL major versions differ: source {outputs.source.pg_major}, "
                             f"base backup {backup.pg_major}, replica server {server_major}")
    if backup.system_identifier and identity.get("system_identifier") and \
            backup.system_identifier != identity["system_identifier"]:
        raise PreflightError(f"{replica.name}: base backup {backup.name} is of another database system "
                             f"({backup.system_identifier}, source is {identity['system_identifier']})")
    # a half-restored data directory never served: start over
    pg.stop(mode="immediate", timeout=30) if pg.has_data() and pg.is_running() else None
    host.run(["rm", "-rf", replica.data_dir], timeout=300)
    host.run(["mkdir", "-p", "-m", "700", replica.data_dir], timeout=30)
    host.run(["mkdir", "-p", "-m", "700", replica.socket_dir], timeout=30)
    _fetch(pg, outputs, backup, progress, timeout)
    host.write_file(f"{replica.data_dir}/postgresql.auto.conf",
                    _conf_lines(standby_settings(replica, archive_mod.restore_command(outputs.source.archive))))
    host.write_file(f"{replica.data_dir}/pg_hba.conf", HBA)
    host.write_file(f"{replica.data_dir}/standby.signal", "")
    pg.log_file = replica.data_dir.rstrip("/") + ".log"
    pg.superuser = str(identity["superuser"])
    pg.start(timeout=timeout)
    pg.wait_ready(timeout=timeout)
    if not pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        raise RunbookError(f"{replica.name}: restored server is not in recovery")
    pg.write_marker({"restored_from": backup.name, "superuser": identity["superuser"],
                     "system_identifier": identity["system_identifier"], "restored_at": time.time(),
                     "log_file": pg.log_file})
    return f"restored from {backup.name}"


def _fetch(pg: PgHost, outputs: Outputs, backup: archive_mod.BaseBackup, progress: Progress | None,
           timeout: float) -> None:
    argv = archive_mod.fetch_command(outputs.source.archive, backup, pg.data_dir)
    error: list[BaseException] = []

    def worker() -> None:
        try:
            pg.host.run(argv, timeout=timeout)
        except BaseException as exc:  # noqa: BLE001
            error.append(exc)

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.5)
        if progress:
            res = pg.host.run(["du", "-sb", pg.data_dir], timeout=30, check=False)
            done = int(res.stdout.split()[0]) if res.returncode == 0 and res.stdout else 0
            progress(pg.host.name, min(done, backup.size_bytes), backup.size_bytes)
    if error:
        raise error[0]
    if progress:
        progress(pg.host.name, backup.size_bytes, backup.size_bytes)


def restore_all(outputs: Outputs, *, timeout: float, connect_timeout: float,
                progress: Progress | None = None) -> dict[str, str]:
    # check every replica's preconditions before touching any
    identity = source_identity(outputs, connect_timeout)
    for r in outputs.replicas:
        pg = replica_host(r)
        if not (pg.read_marker().get("restored_from") and pg.has_data()):
            archive_mod.find_base_backup(outputs.source.archive, host_for(r))
    return {r.name: restore_replica(outputs, r, timeout=timeout, identity=identity, progress=progress)
            for r in outputs.replicas}
