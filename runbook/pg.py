"""Small PostgreSQL helpers: connections with application_name, LSN arithmetic, binaries."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, urlsplit, unquote

import psycopg

from .errors import ConfigError, DatabaseError
from .redact import redact, register_secret

APPLICATION_NAME = "tern"


def make_url(host: str, port: int, user: str, password: str | None, database: str) -> str:
    """Build a postgresql:// URL; the password is registered for redaction."""
    register_secret(password)
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    return f"postgresql://{auth}@{host}:{port}/{quote(database, safe='')}"


def url_endpoint(url: str) -> tuple[str, int, str]:
    """(host, port, database) of a URL, without the credentials (the host may be a socket directory)."""
    from psycopg.conninfo import conninfo_to_dict

    if not url.startswith(("postgres://", "postgresql://")):
        raise ConfigError(f"not a PostgreSQL URL: {redact(url)}")
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        raise ConfigError(f"not a valid PostgreSQL URL: {redact(url)}") from None
    if params.get("password"):
        register_secret(str(params["password"]))
    if not params.get("host"):
        raise ConfigError(f"PostgreSQL URL without a host: {redact(url)}")
    port = str(params.get("port") or 5432)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"PostgreSQL URL with a bad port {port!r}: {redact(url)}")
    return str(params["host"]), int(port), str(params.get("dbname") or "")


def with_password(url: str, password: str) -> str:
    """The same URL with ``password`` in it (registered for redaction first)."""
    from urllib.parse import urlunsplit

    register_secret(password)
    url_endpoint(url)
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if userinfo else ""
    netloc = f"{user}:{quote(password, safe='')}@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@contextmanager
def connect(url: str, *, purpose: str, autocommit: bool = True, timeout: float = 5.0,
            options: str | None = None) -> Iterator[psycopg.Connection]:
    """Open a connection tagged ``tern:<purpose>`` in pg_stat_activity. Errors are redacted."""
    url_endpoint(url)  # registers the password for redaction
    kwargs = {"application_name": f"{APPLICATION_NAME}:{purpose}", "connect_timeout": max(1, int(timeout))}
    if options:
        kwargs["options"] = options
    try:
        conn = psycopg.connect(url, autocommit=autocommit, **kwargs)
    except psycopg.Error as exc:
        host, port, db = url_endpoint(url)
        raise DatabaseError(f"cannot connect to {host}:{port}/{db} ({purpose}): {redact(exc).strip()}") from None
    try:
        yield conn
    finally:
        conn.close()


def lsn_to_int(lsn: str | None) -> int | None:
    """'16/B374D848' -> integer byte position."""
    if lsn is None:
        return None
    hi, _, lo = str(lsn).partition("/")
    return (int(hi, 16) << 32) + int(lo, 16)


WAL_PAGE = 8192          # XLOG_BLCKSZ
SHORT_PAGE_HEADER = 24   # SizeOfXLogShortPHD: every WAL page but a segment's first
LONG_PAGE_HEADER = 40    # SizeOfXLogLongPHD: a segment's first page


def replay_target(lsn: int) -> int:
    """What a standby reports (``pg_last_wal_replay_lsn``, the *end* of the last record it replayed)
    once it has replayed everything before ``lsn``, a position where the next record would be *inserted*
    (``pg_current_wal_insert_lsn``).

    They differ right after a page header: when the last record ends exactly at a page (or segment)
    boundary, the insert position is past the next page's header, the replayed end is the boundary
    itself. Waiting for the insert position there waits for a record that starts after it - after a
    segment switch, until the *next* segment is archived (archive_timeout, a minute). Nothing lies
    between the boundary and the position but the header, so the boundary is the same point.

    >>> hex(replay_target(0x3000028)), hex(replay_target(0x3002018)), hex(replay_target(0x3002030))
    ('0x3000000', '0x3002000', '0x3002030')
    """
    # Safe for any page: no record ends strictly between the page start and the position. Where a
    # record continues from the page before (an offset of 40 can follow 16 bytes of it), no record ends
    # at the page start either, so a standby at the page start or past it has replayed that one too.
    if lsn % WAL_PAGE in (SHORT_PAGE_HEADER, LONG_PAGE_HEADER):
        return lsn - lsn % WAL_PAGE
    return lsn


def bindir(configured: str | None = None) -> Path:
    """The PostgreSQL server binaries: a configured path, TERN_PG_BINDIR, pg_config, or Debian's layout."""
    candidates: list[str] = []
    if configured:
        candidates.append(configured)
    if os.environ.get("TERN_PG_BINDIR"):
        candidates.append(os.environ["TERN_PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            candidates.append(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                             check=True, timeout=10).stdout.strip())
        except (subprocess.SubprocessError, OSError):
            pass
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for c in candidates:
        if (Path(c) / "pg_ctl").exists() and (Path(c) / "initdb").exists():
            return Path(c)
    raise ConfigError("PostgreSQL server binaries not found: install PostgreSQL 13+ or set TERN_PG_BINDIR")


def server_major(bin_dir: Path) -> int:
    out = subprocess.run([str(Path(bin_dir) / "postgres"), "--version"], capture_output=True, text=True,
                         check=True, timeout=10).stdout
    return parse_major(out)


def parse_major(version_output: str) -> int:
    """The major version from ``postgres --version``: "postgres (PostgreSQL) 15.18 (Debian ...)" -> 15."""
    return int(version_output.split(")")[1].strip().split()[0].split(".")[0])


def with_endpoint(url: str, host: str, port: int) -> str:
    """The same URL (user, password, database) pointed at another host and port."""
    from urllib.parse import urlunsplit

    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def url_user(url: str) -> str:
    return unquote(urlsplit(url).username or "")


def scram_verifier(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    ``CREATE ROLE ... PASSWORD '<verifier>'`` sets the password without the plaintext ever
    reaching the server, its logs, or a command channel's history.
    """
    import base64
    import hashlib
    import hmac
    import os as _os

    salt = salt if salt is not None else _os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"
