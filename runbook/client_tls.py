"""tern's client certificate: the database superuser's way into a replica over TLS, without a password.

On AWS every host command goes through SSM Run Command, about a second each; a failover that reads a
replica's replay position, promotes it and lifts the fence through such commands pays them inside
the downtime window. A replica restored from Heroku's base backup carries Heroku's roles, and its
superuser's password is not ours; no role can be added to a standby. So tern makes a certificate of
its own, once per stack (``<state dir>/tls/``, key 0600, self-signed, its common name the superuser's
name), and ``restore`` installs it on each replica as the CA (``ssl_ca_file``) with one hba line
before the SCRAM ones::

    hostssl  all  <superuser>  0.0.0.0/0  cert

The superuser then comes in over TLS only with that certificate (never with a password), and
:class:`runbook.postgres.PgHost` runs its SQL through the local ``psql`` with it, over TCP, when the
replica's host has no socket tern can reach; the host commands remain for what is not SQL (pg_ctl,
files) and as the fallback when TCP cannot reach the replica.

The key is a credential: it stays in the state directory (0700), never in a journal, report or URL
printed (URLs name the file, not its contents).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from .errors import ConfigError

DIR = "tls"
HBA_LINE = "hostssl  all          {user}    {net}   cert\n"


@dataclass(frozen=True)
class ClientCert:
    cert: Path
    key: Path
    user: str        # the superuser it stands for (its common name)

    @property
    def pem(self) -> str:
        """The certificate (public): what a replica trusts as ``ssl_ca_file``."""
        return self.cert.read_text()

    def conninfo(self, host: str, port: int, database: str, application_name: str = "tern") -> str:
        """A libpq URL for the superuser with this certificate (TLS required; the server's certificate is
        self-signed, so it is not verified: ``sslmode=require``)."""
        query = urlencode({"sslmode": "require", "sslcert": str(self.cert), "sslkey": str(self.key),
                           "application_name": application_name})
        return f"postgresql://{quote(self.user, safe='')}@{host}:{int(port)}/{quote(database, safe='')}?{query}"


def _paths(state_dir: Path) -> tuple[Path, Path, Path]:
    d = Path(state_dir) / DIR
    return d, d / "client.crt", d / "client.key"


def existing(state_dir: Path | None) -> ClientCert | None:
    """The stack's client certificate, when restore made one."""
    if state_dir is None:
        return None
    d, cert, key = _paths(state_dir)
    user_file = d / "user"
    if not (cert.is_file() and key.is_file() and user_file.is_file()):
        return None
    return ClientCert(cert=cert, key=key, user=user_file.read_text().strip())


def ensure(state_dir: Path, superuser: str) -> ClientCert:
    """The stack's client certificate for ``superuser``, made once (again when the superuser differs)."""
    have = existing(state_dir)
    if have is not None and have.user == superuser:
        return have
    if shutil.which("openssl") is None:
        raise ConfigError("openssl is not installed: tern needs it to make its client certificate "
                          "(Debian: apt-get install openssl)")
    d, cert, key = _paths(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    tmp_key, tmp_cert = d / "client.key.tmp", d / "client.crt.tmp"
    # basicConstraints CA: the certificate is its own trust anchor on the replicas (ssl_ca_file)
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-days", "3650", "-sha256", "-subj", "/CN=" + superuser.replace("/", "\\/"),
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=digitalSignature,keyCertSign",
            "-keyout", str(tmp_key), "-out", str(tmp_cert)]
    old = os.umask(0o077)
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        os.umask(old)
    if res.returncode != 0:
        raise ConfigError(f"openssl could not make tern's client certificate: {res.stderr.strip()[-300:]}")
    os.chmod(tmp_key, 0o600)
    tmp_key.replace(key)
    tmp_cert.replace(cert)
    (d / "user").write_text(superuser + "\n")
    return ClientCert(cert=cert, key=key, user=superuser)


def hba_lines(superuser_hba_name: str) -> str:
    """The hba lines that let the superuser in over TLS with the certificate only (before the SCRAM lines)."""
    return "".join(HBA_LINE.format(user=superuser_hba_name, net=net) for net in ("0.0.0.0/0", "::/0"))
