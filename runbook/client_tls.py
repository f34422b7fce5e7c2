"""tern's client certificate: the database superuser's way into a replica over TLS, without a password.

On AWS every host command goes through SSM Run Command, about a second each; a failover that reads a
replica's replay position, promotes it and lifts the fence through such commands pays them inside
the downtime window. A replica restored from Heroku's base backup carries Heroku's roles, and its
superuser's password is not ours; no role can be added to a standby. So tern makes a certificate of
its own, once per stack (``<state dir>/tls/``, key 0600, self-signed, its common name the superuser's
name), and ``restore`` installs it on each replica as the CA (``ssl_ca_file``) with hba lines before the
SCRAM ones, one per network of the outputs' ``admin_cidrs`` (where tern runs; ``tern:admin_cidrs`` in the
Pulumi config, loopback in the sandbox)::

    hostssl  all  <superuser>  10.0.4.0/24  cert

The superuser then comes in over TLS only with that certificate, only from where tern runs (never with a
password), and :class:`runbook.postgres.PgHost` runs its SQL through the local ``psql`` with it, over TCP,
when the replica's host has no socket tern can reach; the host commands remain for what is not SQL
(pg_ctl, files) and as the fallback when TCP cannot reach the replica. Outputs without ``admin_cidrs``
get no such line: the SQL then goes through the host's commands.

tern verifies each replica in turn (``sslmode=verify-ca``): ``restore`` reads the replica's own
self-signed server certificate through its command channel (SSM, authenticated by AWS; this machine in
the sandbox) and keeps it as the only root tern trusts for that replica (``servers/<replica>.crt``).
A name check (``verify-full``) would add nothing to that pin - only the host holding that key passes -
and the AWS certificate names the host's DNS name while tern connects to its private address.

The certificate and its key are made in a directory of their own (``v-*``) and put in use by one
rename of the ``current`` link, so a crash at any moment leaves the old pair or the new one, never a
new key beside an old certificate.

The key is a credential: it stays in the state directory (0700), never in a journal, report or URL
printed (URLs name the file, not its contents). ``teardown`` removes the stack's directory (:func:`forget`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from .errors import ConfigError

DIR = "tls"
CURRENT = "current"      # the link to the version in use (v-*): one rename swaps certificate and key together
SERVERS = "servers"      # <replica>.crt: each replica's own certificate, the one root tern trusts for it
HBA_LINE = "hostssl  all          {user}    {net}   cert\n"


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path
    user: str        # the superuser it stands for (its common name)
    servers: Path | None = None   # where the replicas' certificates are kept (:func:`pin_server`)

    @property
    def pem(self) -> str:
        """The certificate (public): what a replica trusts as ``ssl_ca_file``."""
        return self.cert.read_text()

    def server_ca(self, server: str) -> Path | None:
        """The replica ``server``'s own certificate, when tern has read it (else None: not verifiable)."""
        if self.servers is None:
            return None
        path = self.servers / f"{server}.crt"
        return path if path.is_file() else None

    def conninfo(self, host: str, port: int, database: str, application_name: str = "tern", *, server: str) -> str:
        """A libpq URL for the superuser with this certificate, to the replica ``server`` (its name), whose
        certificate is verified against the one tern read from it (``sslmode=verify-ca``, see the module's
        docstring). Refused when tern has not read it: never an unverified connection."""
        ca = self.server_ca(server)
        if ca is None:
            raise ConfigError(f"{server}: tern has not read its server certificate, so it cannot verify it "
                              "(run restore again: it reads each replica's certificate)")
        query = urlencode({"sslmode": "verify-ca", "sslrootcert": str(ca), "sslcert": str(self.cert),
                           "sslkey": str(self.key), "application_name": application_name})
        return f"postgresql://{quote(self.user, safe='')}@{host}:{int(port)}/{quote(database, safe='')}?{query}"


def _pair(base: Path) -> tuple[Path, Path, Path]:
    return base / "client.crt", base / "client.key", base / "user"


def existing(state_dir: Path | None) -> ClientCert | None:
    """The stack's client certificate, when restore made one. The ``current`` link is resolved once, here:
    a swap by another process later never mixes this pair (the first layout, files directly in ``tls/``,
    is read too)."""
    if state_dir is None:
        return None
    d = Path(state_dir) / DIR
    link = d / CURRENT
    base = link.resolve() if link.is_symlink() else d
    cert, key, user_file = _pair(base)
    if not (cert.is_file() and key.is_file() and user_file.is_file()):
        return None
    return ClientCert(cert=cert, key=key, user=user_file.read_text().strip(), servers=d / SERVERS)


def ensure(state_dir: Path, superuser: str) -> ClientCert:
    """The stack's client certificate for ``superuser``, made once (again when the superuser differs)."""
    have = existing(state_dir)
    if have is not None and have.user == superuser:
        return have
    if shutil.which("openssl") is None:
        raise ConfigError("openssl is not installed: tern needs it to make its client certificate "
                          "(Debian: apt-get install openssl)")
    d = Path(state_dir) / DIR
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    # a new version of its own (0700): nothing in use is touched until the one rename below
    version = Path(tempfile.mkdtemp(prefix="v-", dir=d))
    cert, key, user_file = _pair(version)
    # basicConstraints CA: the certificate is its own trust anchor on the replicas (ssl_ca_file)
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "3650", "-sha256", "-subj", "/CN=" + superuser.replace("/", "\\/"),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=digitalSignature,keyCertSign",
            "-keyout", str(key), "-out", str(cert)]
    old = os.umask(0o077)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        os.umask(old)
    if res.returncode != 0:
        shutil.rmtree(version, ignore_errors=True)
        raise ConfigError(f"openssl could not make tern's client certificate: {res.stderr.strip()[-300:]}")
    os.chmod(key, 0o600)
    user_file.write_text(superuser + "\n")
    for path in (key, cert, user_file):
        _fsync(path)
    _fsync(version)
    # the swap: one atomic rename of a link, so the pair in use is the old one or the new one, never half
    swap = d / f".{CURRENT}.{os.getpid()}"
    swap.unlink(missing_ok=True)
    os.symlink(version.name, swap)
    os.replace(swap, d / CURRENT)
    _fsync(d)
    # what is no longer in use: earlier versions, and the first layout's files
    for old_version in d.glob("v-*"):
        if old_version != version:
            shutil.rmtree(old_version, ignore_errors=True)
    for name in ("client.crt", "client.key", "user", "client.key.tmp", "client.crt.tmp"):
        (d / name).unlink(missing_ok=True)
    return ClientCert(cert=cert, key=key, user=superuser, servers=d / SERVERS)


def _fsync(path: Path) -> None:
    """On disk before the next step relies on it (a directory: its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pin_server(state_dir: Path, server: str, pem: str) -> Path:
    """Keep the replica ``server``'s own certificate (read through its command channel) as the one root
    tern trusts for it; written whole or not at all. Refuses what is not a lone certificate."""
    text = (pem or "").strip()
    if not (text.startswith("-----BEGIN CERTIFICATE-----") and text.endswith("-----END CERTIFICATE-----")
            and text.count("-----BEGIN ") == 1):
        raise ConfigError(f"{server}: its server certificate is missing or is not one PEM certificate")
    d = Path(state_dir) / DIR / SERVERS
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d.parent, 0o700)
    path = d / f"{server}.crt"
    if path.is_file() and path.read_text().strip() == text:
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{server}.", dir=d)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def server_ca(state_dir: Path | None, server: str) -> Path | None:
    """The replica ``server``'s certificate as tern keeps it (:func:`pin_server`), or None."""
    if state_dir is None:
        return None
    path = Path(state_dir) / DIR / SERVERS / f"{server}.crt"
    return path if path.is_file() else None


def verified_url(url: str, ca: Path) -> str:
    """``url`` verifying the server against ``ca`` (``sslmode=verify-ca``; any other sslmode/sslrootcert
    replaced)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in ("sslmode", "sslrootcert")]
    query += [("sslmode", "verify-ca"), ("sslrootcert", str(ca))]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def forget(state_dir: Path | None) -> bool:
    """Remove the stack's client certificate, its key and the replicas' certificates (at teardown: the
    hosts that trusted it are gone). True when there was something to remove."""
    if state_dir is None:
        return False
    d = Path(state_dir) / DIR
    if not d.exists() and not d.is_symlink():
        return False
    shutil.rmtree(d)
    return True


def check_cidrs(cidrs: Sequence[str]) -> list[str]:
    """``cidrs`` as network addresses (10.0.4.0/24, ::1/128), none open to the world; else ValueError."""
    out = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(str(cidr).strip())
        except ValueError:
            raise ValueError(f"{cidr!r} is not a network address (such as 10.0.4.0/24)") from None
        if network.prefixlen == 0:
            raise ValueError(f"{cidr} would admit tern's certificate from anywhere: name where tern runs")
        out.append(str(network))
    return out


def hba_lines(superuser_hba_name: str, admin_cidrs: Sequence[str]) -> str:
    """The hba lines that let the superuser in over TLS with the certificate only (before the SCRAM lines),
    only from ``admin_cidrs`` (where tern runs); none without them."""
    return "".join(HBA_LINE.format(user=superuser_hba_name, net=net) for net in check_cidrs(admin_cidrs))
