"""``invoke restore``: make each EC2 replica a hot standby of the source, fed by the WAL archive.

Idempotent: a restored, running standby is left alone; a restored but stopped one is
started; a half-restored one (no marker) is wiped and restored again - it never served.
Refuses, with nothing changed, when the archive or base backup is missing or the
PostgreSQL major version differs from the source's.

Every replica is TLS only: its pg_hba.conf (``hba_file``, beside the certificate, outside
the data directory) admits TCP only as ``hostssl ... scram-sha-256`` (replication too), and
trusts the local socket only for the database superuser, in a socket directory that is 0700
and owned by the server's OS user. On AWS the certificate and key are the ones the instance's
user data made (``infra/replicas.py``: :data:`AWS_TLS_DIR`); in the sandbox (and any other
``local`` host) restore makes a self-signed one per replica, in ``<data_dir>.tls``. The
certificates are self-signed: the app uses ``sslmode=require`` (:func:`tls_url`), which
encrypts but does not authenticate the server; tern itself reads each replica's certificate
through the host's command channel and verifies the replica against it
(:func:`pin_server_certificate`, :mod:`.client_tls`).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from . import archive as archive_mod
from . import client_tls, measure
from .adapters import HostCommands, app_for, host_for
from .contract import Outputs, Replica
from .errors import PreflightError, RunbookError
from .pg import connect, parse_major, with_endpoint
from .postgres import PgHost, literal
from .status import replica_host, source_url

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]   # (replica, done bytes, total bytes)
T = TypeVar("T")


# AWS: where infra/replicas.py's user data puts the certificate, its key and the hba (its CONF_DIR)
AWS_TLS_DIR = "/etc/tern/postgresql"


@dataclass(frozen=True)
class TlsPaths:
    dir: str
    cert: str
    key: str
    hba: str


def tls_paths(replica: Replica) -> TlsPaths:
    """Where a replica's certificate, key and pg_hba.conf live: outside its data directory, so a
    rebuild of the data directory (restore again, or a copy of the new leader) keeps them."""
    default = AWS_TLS_DIR if replica.commands.kind == "ssm" else replica.data_dir.rstrip("/") + ".tls"
    d = getattr(replica, "tls_dir", None) or default
    return TlsPaths(dir=d, cert=f"{d}/server.crt", key=f"{d}/server.key", hba=f"{d}/pg_hba.conf")


def standby_settings(replica: Replica, restore_cmd: str, client_ca: str = "") -> dict[str, str | int]:
    """``client_ca``: where tern's client certificate is on the host (:mod:`.client_tls`), or "" (none)."""
    tls = tls_paths(replica)
    return {
        "listen_addresses": replica.host if replica.host in ("127.0.0.1", "localhost") else "*",
        "port": replica.port,
        "unix_socket_directories": replica.socket_dir,
        "unix_socket_permissions": "0700",
        # TLS only: TCP matches only hostssl lines of this hba (the data directory's copy is not read)
        "hba_file": tls.hba,
        "ssl": "on",
        "ssl_cert_file": tls.cert,
        "ssl_key_file": tls.key,
        "ssl_ca_file": client_ca,            # tern's client certificate only (never the source's)
        "ssl_crl_file": "",
        "ssl_min_protocol_version": "TLSv1.2",
        "password_encryption": "scram-sha-256",
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


def _hba_name(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_]+", name) else '"' + name.replace('"', '""') + '"'


def hba_conf(superuser: str, client_cert: bool = False, admin_cidrs: Sequence[str] = ()) -> str:
    """TCP only over TLS with SCRAM (replication too); the socket trusts only the superuser, and
    its directory is 0700, owned by the server's OS user: nobody else on the host reaches it.
    ``client_cert``: the superuser comes in over TLS with tern's certificate only (:mod:`.client_tls`),
    only from ``admin_cidrs`` (where tern runs)."""
    su = _hba_name(superuser)
    return ("# tern restore: TCP only over TLS with SCRAM; the unix socket's directory is 0700 (server OS user only)\n"
            f"local    all          {su}    trust\n"
            f"local    replication  {su}    trust\n"
            + (client_tls.hba_lines(su, admin_cidrs) if client_cert else "")
            + "hostssl  all          all    0.0.0.0/0   scram-sha-256\n"
            "hostssl  replication  all    0.0.0.0/0   scram-sha-256\n"
            "hostssl  all          all    ::/0        scram-sha-256\n"
            "hostssl  replication  all    ::/0        scram-sha-256\n")


# A data directory's own pg_hba.conf: inert (standby_settings points hba_file at tls_paths().hba),
# kept TLS only all the same for callers that write one
HBA = hba_conf("postgres")


def tls_url(url: str) -> str:
    """``url`` with ``sslmode=require``: a replica refuses TCP without TLS. Its certificate is
    self-signed, so the app cannot verify it (tern does: :func:`.client_tls.verified_url`): any
    sslmode/sslrootcert of the source's URL is replaced."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("sslmode", "sslrootcert")]
    query.append(("sslmode", "require"))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def replica_url(url: str, replica: Replica) -> str:
    """The same URL (role, password, database) pointed at a replica, over TLS."""
    return tls_url(with_endpoint(url, replica.host, replica.port))


def check_tls_files(replica: Replica, host: HostCommands) -> None:
    """An AWS replica's certificate and key come from its user data: refuse when they are missing."""
    if replica.commands.kind != "ssm":
        return
    tls = tls_paths(replica)
    if host.run(["sh", "-c", 'test -s "$1" && test -s "$2"', "sh", tls.cert, tls.key], timeout=60,
                check=False).returncode != 0:
        raise PreflightError(f"{replica.name}: no TLS certificate and key at {tls.cert} and {tls.key} "
                             "(the instance's user data makes them: see infra/replicas.py)")


def _self_signed(common_name: str) -> tuple[str, str] | None:
    """(certificate PEM, key PEM) made with ``cryptography`` when it is installed, else None."""
    try:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(common_name))
    except ValueError:
        alt = x509.DNSName(common_name)
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def ensure_certificate(replica: Replica, host: HostCommands, *, use_cryptography: bool = True) -> str:
    """A local replica's self-signed certificate and key (0600, owned by the server's OS user),
    made once; an AWS replica's must already be there. Returns what was done."""
    tls = tls_paths(replica)
    if host.run(["sh", "-c", 'test -s "$1" && test -s "$2"', "sh", tls.cert, tls.key], timeout=60,
                check=False).returncode == 0:
        return "kept"
    check_tls_files(replica, host)   # AWS: refuses
    host.run(["mkdir", "-p", "-m", "700", tls.dir], timeout=30)
    made = _self_signed(replica.host) if use_cryptography else None
    if made is not None:
        cert, key = made
        host.write_file(tls.key, key)       # umask 077: mode 0600
        host.write_file(tls.cert, cert)
        return "made (cryptography)"
    host.run(["sh", "-c", 'umask 077 && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes '
              '-days 3650 -sha256 -subj "/CN=$1" -keyout "$2.tern-tmp" -out "$3" 2>&1 && mv "$2.tern-tmp" "$2"',
              "sh", replica.host, tls.key, tls.cert], timeout=120)
    return "made (openssl)"


def prepare_socket_dir(replica: Replica, host: HostCommands) -> None:
    """The socket directory: 0700 and owned by the OS user the server runs as (local trust relies on it)."""
    # 00700: a numeric mode with a leading zero also clears a directory's setgid bit (GNU chmod)
    res = host.run(["sh", "-c", 'mkdir -p "$1" && chmod 00700 "$1" && find "$1" -maxdepth 0 -perm 700 -user "$(id -un)"',
                    "sh", replica.socket_dir], timeout=30, check=False)
    if res.returncode != 0 or not res.stdout.strip():
        raise PreflightError(f"{replica.name}: socket directory {replica.socket_dir} must be mode 0700 and owned by "
                             f"the server's OS user {(res.stderr or '').strip()[-200:]}")


def client_ca_path(replica: Replica) -> str:
    return f"{tls_paths(replica).dir}/tern-client.crt"


def prepare_tls(replica: Replica, host: HostCommands, superuser: str,
                client: client_tls.ClientCert | None = None, admin_cidrs: Sequence[str] = ()) -> str:
    """Everything :func:`standby_settings` points at, outside the data directory: the 0700 socket
    directory, the certificate and key, the TLS-only hba (and tern's client certificate, when given).
    Returns what became of the certificate."""
    prepare_socket_dir(replica, host)
    certificate = ensure_certificate(replica, host)
    if client is not None:
        host.write_file(client_ca_path(replica), client.pem)
    host.write_file(tls_paths(replica).hba, hba_conf(superuser, client_cert=client is not None,
                                                     admin_cidrs=admin_cidrs))
    return certificate


def install_client_cert(pg: PgHost, replica: Replica, superuser: str, client: client_tls.ClientCert,
                        admin_cidrs: Sequence[str] = ()) -> None:
    """On a replica restored and running: trust tern's client certificate for the superuser from
    ``admin_cidrs`` (hba lines, ``ssl_ca_file``), reloaded - idempotent, and nothing else changes."""
    pg.host.write_file(client_ca_path(replica), client.pem)
    pg.host.write_file(tls_paths(replica).hba, hba_conf(superuser, client_cert=True, admin_cidrs=admin_cidrs))
    pg.psql(f"ALTER SYSTEM SET ssl_ca_file = {literal(client_ca_path(replica))};\nSELECT pg_reload_conf();")


def source_identity(outputs: Outputs, timeout: float) -> dict[str, object]:
    """What the source says of itself, through the app's own role."""
    app = app_for(outputs.app)
    with connect(source_url(app, outputs), purpose="restore-preflight", timeout=timeout) as conn:
        row = conn.execute("SELECT current_setting('server_version_num')::int / 10000, "
                           "(SELECT rolname FROM pg_roles WHERE oid = 10), "
                           "(SELECT system_identifier::text FROM pg_control_system())").fetchone()
    return {"pg_major": row[0], "superuser": row[1], "system_identifier": row[2]}


def restore_replica(outputs: Outputs, replica: Replica, *, timeout: float, identity: dict[str, object],
                    progress: Progress | None = None, client: client_tls.ClientCert | None = None,
                    backup: archive_mod.BaseBackup | None = None) -> str:
    """Restore one replica; returns what was done (restored / started / already running).
    ``client``: tern's client certificate, trusted for the superuser over TLS (:mod:`.client_tls`).
    ``backup``: the base backup found for it already (LATEST resolved), else looked up here."""
    pg = replica_host(replica)
    marker = pg.read_marker()
    if marker.get("restored_from") and pg.has_data():
        what = "already restored and running"
        if not pg.is_running():
            pg.start(timeout=60)
            what = "restored earlier; started"
        if client is not None:
            install_client_cert(pg, replica, str(marker.get("superuser") or identity["superuser"]), client,
                                outputs.admin_cidrs)
        return what
    host = pg.host
    backup = backup or archive_mod.find_base_backup(outputs.source.archive, host)
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
    certificate = prepare_tls(replica, host, str(identity["superuser"]), client, outputs.admin_cidrs)
    _fetch(pg, outputs, backup, progress, timeout)
    host.write_file(f"{replica.data_dir}/postgresql.auto.conf",
                    _conf_lines(standby_settings(replica, archive_mod.restore_command(outputs.source.archive),
                                                 client_ca_path(replica) if client is not None else "")))
    host.write_file(f"{replica.data_dir}/pg_hba.conf", hba_conf(str(identity["superuser"])))  # inert (hba_file)
    host.write_file(f"{replica.data_dir}/standby.signal", "")
    pg.log_file = replica.data_dir.rstrip("/") + ".log"
    pg.superuser = str(identity["superuser"])
    pg.start(timeout=timeout)
    pg.wait_ready(timeout=timeout)
    if not pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
        raise RunbookError(f"{replica.name}: restored server is not in recovery")
    pg.write_marker({"restored_from": backup.name, "superuser": identity["superuser"],
                     "system_identifier": identity["system_identifier"], "restored_at": time.time(),
                     "log_file": pg.log_file, "tls_dir": tls_paths(replica).dir})
    log.info("%s: TLS only; certificate %s", replica.name, certificate)
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
                progress: Progress | None = None, state_dir: Path | None = None) -> dict[str, str]:
    """Restore every replica. ``state_dir``: the stack's state directory, where tern keeps its client
    certificate (made there once, trusted by every replica: :mod:`.client_tls`); None: no certificate."""
    # check every replica's preconditions before touching any
    identity = source_identity(outputs, connect_timeout)

    backups: dict[str, archive_mod.BaseBackup] = {}     # what each replica checked is what it restores

    def preflight(r: Replica) -> None:
        pg = replica_host(r)
        if not (pg.read_marker().get("restored_from") and pg.has_data()):
            backups[r.name] = archive_mod.find_base_backup(outputs.source.archive, host_for(r))
            check_tls_files(r, pg.host)

    each_replica(outputs.replicas, preflight)
    # the certificate only where the outputs say where tern runs (admin_cidrs): never from anywhere
    client = client_tls.ensure(state_dir, str(identity["superuser"])) \
        if state_dir is not None and outputs.admin_cidrs else None
    if state_dir is not None and not outputs.admin_cidrs:
        log.info("the outputs name no admin_cidrs: the replicas do not trust tern's client certificate "
                 "(its SQL goes through the hosts' commands)")

    def restore(r: Replica) -> dict[str, str]:
        # restore and replay throughput, for `invoke estimate`: one meter a replica, as they restore at once
        meter = measure.RestoreMeter(state_dir, progress)
        done = meter.finish({r.name: restore_replica(outputs, r, timeout=timeout, identity=identity,
                                                     progress=meter.start(r), client=client,
                                                     backup=backups.get(r.name))})
        if state_dir is not None:
            pin_server_certificate(r, host_for(r), state_dir)
        return done

    results: dict[str, str] = {}
    for done in each_replica(outputs.replicas, restore):
        results.update(done)
    return results


def each_replica(replicas: Sequence[Replica], fn: Callable[[Replica], T]) -> list[T]:
    """``fn`` on every replica at the same time; the results in the replicas' order. The replicas are
    independent (each fetches the base backup from the archive itself: hours each on the real night, and
    every step over SSM a round trip of seconds), so one failing does not stop the others: once all have
    ended, the first error in the replicas' order is raised (a rerun redoes only what is not done)."""
    if len(replicas) <= 1:
        return [fn(r) for r in replicas]
    with ThreadPoolExecutor(max_workers=len(replicas), thread_name_prefix="tern-restore") as pool:
        futures = [pool.submit(fn, r) for r in replicas]
    for f in futures:
        if f.exception() is not None:
            raise f.exception()
    return [f.result() for f in futures]


def pin_server_certificate(replica: Replica, host: HostCommands, state_dir: Path, *, timeout: float = 30.0) -> Path:
    """The replica's own certificate, read through its command channel (SSM: authenticated by AWS; the
    sandbox: this machine) and kept as the one root tern trusts for it (:func:`.client_tls.pin_server`)."""
    return client_tls.pin_server(state_dir, replica.name,
                                 host.read_file(tls_paths(replica).cert, timeout=timeout) or "")
