#!/usr/bin/env python3
"""WAL-G, stood in for a rehearsal: what tern runs on an EC2 replica, against the S3 stand-in.

The commands tern runs (:mod:`runbook.archive`), as the release ``infra/replicas.py`` installs
(WAL-G v3.0.5) does them:

* ``wal-g backup-list [--json] [--detail] [--pretty]``: the base backups, each named by its
  ``<name>_backup_stop_sentinel.json`` under ``basebackups_005/``; ``time`` is that object's
  LastModified. Plain: oldest first by ``time``. ``--detail`` adds ``<name>/metadata.json``'s fields
  and sorts by ``start_time`` (by ``time`` when a backup has no metadata). ``--json`` prints Go's
  encoding of the entries, fields in WAL-G's order (``backup_name``, ``time``, ``wal_file_name``,
  ``storage_name``, then ``start_time`` ... ``compressed_size``), LSNs and ``pg_version``
  (``server_version_num``, e.g. 150004) as numbers, ``system_identifier`` a number or null. No
  backup: nothing on stdout (v3.0.5; later releases print ``[]``), ``No backups found`` on stderr.
* ``wal-g backup-fetch DIR NAME|LATEST``: LATEST is the backup whose sentinel was written last (the
  plain list's last, not the detailed list's); the tars of ``<name>/tar_partitions/`` are extracted,
  ``backup_label.tar.*`` after the parts and ``pg_control.tar.*`` last (a server cannot start on a
  half-extracted copy). A DIR that is not empty is refused (exit 1), as WAL-G refuses it.
* ``wal-g wal-fetch SEGMENT DEST``: ``wal_005/SEGMENT.<ext>`` decompressed into DEST (created, never
  overwritten). Absent: exit 74 (``EX_IOERR``), which PostgreSQL reads as "not there yet" and retries;
  any other failure exits 1 (also retried); never above 125, which would abort recovery.

Settings come from the environment as WAL-G reads them (the replica runs it under ``envdir`` with its
env directory): ``WALG_S3_PREFIX`` (``s3://bucket/path``), ``AWS_REGION``, ``AWS_ENDPOINT``,
``AWS_S3_FORCE_PATH_STYLE``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``
(a real host's WAL-G takes the instance role's instead; the stand-in has no metadata service), and for
what is pushed, ``WALG_COMPRESSION_METHOD``: ``lzma``, the one compression WAL-G writes that Python's
standard library has (WAL-G's lzma is the classic ``.lzma`` format, :data:`lzma.FORMAT_ALONE`). Reading
tries the extensions WAL-G tries, in its order; it decompresses ``.lzma``, ``.gz`` and none, and says so
for the others (``.lz4``, ``.zst``, ``.br``). Not stood in: delta backups, encryption, WAL prefetch,
multiple storages, tablespaces.

The push side is Heroku's, not tern's: :class:`ArchivePublisher` puts the sandbox's directory archive
into the bucket in this layout, as Heroku's continuous archiving does (``runbook.standins.world``).

Standard library only, and a script as well as a module, on purpose: on the host it runs as the
database OS user with the host's own ``python3`` (``python3 -I walg.py``, the shim the world puts on
the agent's PATH as ``wal-g``), not tern's virtualenv; and PostgreSQL runs ``restore_command`` about
twice per ``wal_retrieve_retry_interval`` (200 ms) while it waits for the next segment, so it must
start as fast as the Go binary does: importing boto3 and making a client costs about 0.5 s of CPU
each time, this about 0.05 s. Requests are signed with Signature Version 4 (checked against botocore's
signer in ``tests/unit/test_standin_walg.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import socket
import sys

# PostgreSQL runs wal-fetch about twice per 200 ms while a standby waits for the next segment: the modules
# only some commands need (re, json, lzma, tarfile, xml, ssl) are imported where they are used, and HTTP is
# spoken on the socket (http.client alone would double the start-up cost).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import tarfile
    from typing import IO, Any, Callable, Iterable

VERSION = "v3.0.5 (tern stand-in)"
BASEBACKUPS = "basebackups_005/"
WAL = "wal_005/"
SENTINEL_SUFFIX = "_backup_stop_sentinel.json"
METADATA = "metadata.json"
TAR_PARTITIONS = "tar_partitions/"
DEFAULT_STORAGE = "default"
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"        # ExtendedMetadataDto.date_fmt
TAR_SIZE_THRESHOLD = (1 << 30) - 1                 # WALG_TAR_SIZE_THRESHOLD's default
# the decompressors WAL-G v3.0.5 tries, in its order (lz4, lzma, gzip; zstd and brotli when built in)
EXTENSIONS = ("lz4", "lzma", "gz", "zst", "br")
COMPRESSORS = {"lzma": "lzma"}                     # WALG_COMPRESSION_METHOD -> extension (stdlib only)
EX_IOERR = 74                                      # wal-fetch: the segment is not in the archive
ZERO_TIME = "0001-01-01T00:00:00Z"                 # Go's zero time.Time, JSON-encoded
NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class WalgError(Exception):
    """A failure WAL-G reports on stderr and exits for (``code``: 1 unless said otherwise)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- logging as WAL-G's tracelog does it (stderr, "LEVEL: date time.micro message") -----------------
def _log(level: str, message: str) -> None:
    now = dt.datetime.now().strftime("%Y/%m/%d %H:%M:%S.%f")
    sys.stderr.write(f"{level}: {now} {message.rstrip()}\n")


def info(message: str) -> None:
    _log("INFO", message)


# -- S3 (Signature Version 4, path-style or virtual-hosted) -----------------------------------------
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


def _encode(value: str, safe: str = "-_.~") -> str:
    """Percent-encoding as SigV4 wants it (RFC 3986 unreserved characters, and ``safe``, left as they are)."""
    keep = _UNRESERVED | frozenset(safe.encode())
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in value.encode())


def sigv4_headers(method: str, host: str, path: str, query: list[tuple[str, str]], payload_hash: str, *,
                  region: str, access_key: str, secret_key: str, token: str | None = None,
                  now: dt.datetime | None = None) -> dict[str, str]:
    """The headers that sign an S3 request (``path`` as sent, already encoded): Signature Version 4
    with the payload's SHA-256 in ``x-amz-content-sha256``, as S3 requires."""
    now = now or dt.datetime.now(dt.timezone.utc)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {"host": host, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    canonical_query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(query))
    signed = ";".join(sorted(headers))
    canonical_headers = "".join(f"{k}:{' '.join(headers[k].split())}\n" for k in sorted(headers))
    request = "\n".join([method, path, canonical_query, canonical_headers, signed, payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed}, "
                                f"Signature={signature}")
    return headers


class S3Object:
    __slots__ = ("name", "size", "last_modified")

    def __init__(self, name: str, size: int, last_modified: dt.datetime) -> None:
        self.name = name                      # relative to the folder listed
        self.size = size
        self.last_modified = last_modified


class _Response:
    """An HTTP/1.1 response read off the socket: status, headers, then the body, streamed (by its
    Content-Length, as S3 sends it; to the end of the connection without one). A body cut short raises."""

    def __init__(self, sock: socket.socket, method: str) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        parts = self._file.readline(65537).decode("latin-1").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise WalgError("S3 answered something that is not HTTP")
        self.status, self.reason = int(parts[1]), (parts[2].strip() if len(parts) > 2 else "")
        self.headers: dict[str, str] = {}
        while True:
            line = self._file.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            raise WalgError("S3 answered with a chunked body, which the stand-in does not read")
        length = self.headers.get("content-length")
        self.remaining: int | None = 0 if method == "HEAD" else (int(length) if length is not None else None)

    def read(self, size: int | None = -1) -> bytes:
        if self.remaining is None:
            return self._file.read() if size is None or size < 0 else self._file.read(size)
        if self.remaining <= 0:
            return b""
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self._file.read(want)
        if not data:
            raise WalgError(f"S3 closed the connection with {self.remaining} bytes of the object still to come")
        self.remaining -= len(data)
        return data

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> "_Response":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Error(WalgError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"S3 {status} {code}: {message}")
        self.status, self.s3_code = status, code


class S3:
    """The few S3 calls WAL-G's reads need: GetObject (streamed) and ListObjectsV2 (paged)."""

    def __init__(self, *, bucket: str, region: str, endpoint: str | None, path_style: bool, access_key: str,
                 secret_key: str, token: str | None = None, timeout: float = 60.0) -> None:
        self.bucket, self.region, self.path_style = bucket, region, path_style
        self.access_key, self.secret_key, self.token, self.timeout = access_key, secret_key, token, timeout
        url = endpoint or f"https://s3.{region}.amazonaws.com"
        scheme, sep, rest = url.partition("://")
        netloc, _, path = rest.partition("/")
        hostname, _, port = netloc.rpartition(":") if netloc.rpartition(":")[2].isdigit() else (netloc, "", "")
        if not sep or scheme not in ("http", "https") or not hostname or "@" in netloc:
            raise WalgError(f"AWS_ENDPOINT {endpoint!r} is not an http(s) URL")
        self.scheme = scheme
        self.host = hostname if path_style else f"{bucket}.{hostname}"
        self.port = int(port) if port else None
        self.base = ("/" + path).rstrip("/") if path else ""

    @classmethod
    def from_env(cls, env: dict[str, str]) -> tuple["S3", str]:
        """(client, key prefix ending in / or empty) from WAL-G's settings."""
        prefix = env.get("WALG_S3_PREFIX", "")
        bucket, _, path = prefix[len("s3://"):].partition("/")
        if not prefix.startswith("s3://") or not bucket:
            raise WalgError("WALG_S3_PREFIX must be set to s3://bucket/path (no storage is configured)")
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if not region:
            raise WalgError("AWS_REGION is not set")
        key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise WalgError("no AWS credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set "
                            "(the stand-in does not read an instance role from the metadata service)")
        path_style = env.get("AWS_S3_FORCE_PATH_STYLE", "").lower() in ("1", "true")
        client = cls(bucket=bucket, region=region, endpoint=env.get("AWS_ENDPOINT"), path_style=path_style,
                     access_key=key, secret_key=secret, token=env.get("AWS_SESSION_TOKEN"))
        path = path.strip("/")
        return client, (path + "/" if path else "")

    def _path(self, key: str) -> str:
        bucket = f"/{_encode(self.bucket)}" if self.path_style else ""
        return f"{self.base}{bucket}/{_encode(key, safe='-_.~/')}" if key else f"{self.base}{bucket}/"

    def request(self, method: str, key: str = "", query: list[tuple[str, str]] | None = None):
        """The response (status 2xx), streamed; an error answer raises :class:`S3Error`."""
        query = query or []
        path = self._path(key)
        host = self.host if self.port is None else f"{self.host}:{self.port}"
        headers = sigv4_headers(method, host, path, query, EMPTY_SHA256, region=self.region,
                                access_key=self.access_key, secret_key=self.secret_key, token=self.token)
        target = path + ("?" + "&".join(f"{_encode(k)}={_encode(v)}" for k, v in query) if query else "")
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}",
                 *(f"{k}: {v}" for k, v in headers.items() if k != "host"), "Connection: close", "", ""]
        sock = None
        try:
            # the host as bytes: a str would be IDNA-encoded, an import that costs more than the request
            sock = socket.create_connection((self.host.encode("ascii"), self.port or (443 if self.scheme == "https"
                                                                                      else 80)), timeout=self.timeout)
            if self.scheme == "https":
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
            sock.sendall("\r\n".join(lines).encode())
            resp = _Response(sock, method)
        except OSError as exc:
            if sock is not None:
                sock.close()
            raise WalgError(f"cannot reach S3 at {self.scheme}://{host}: {exc}") from None
        if resp.status >= 300:
            with resp:
                body = resp.read()
            # <Error><Code>NoSuchKey</Code><Message>...</Message>...
            code = body.partition(b"<Code>")[2].partition(b"</Code>")[0].decode(errors="replace")
            message = body.partition(b"<Message>")[2].partition(b"</Message>")[0].decode(errors="replace")
            raise S3Error(resp.status, code or str(resp.status), message or resp.reason)
        return resp

    def get(self, key: str):
        """The object's body as a stream, or None when there is no such key."""
        try:
            return self.request("GET", key)
        except S3Error as exc:
            if exc.status == 404 and exc.s3_code in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def list(self, prefix: str, delimiter: str = "/") -> tuple[list[S3Object], list[str]]:
        """Objects right under ``prefix`` (names relative to it) and its sub-folders, every page."""
        import xml.etree.ElementTree as ET

        objects: list[S3Object] = []
        folders: list[str] = []
        token = None
        while True:
            query = [("list-type", "2"), ("prefix", prefix)] + ([("delimiter", delimiter)] if delimiter else [])
            if token:
                query.append(("continuation-token", token))
            resp = self.request("GET", "", query)
            root = ET.fromstring(resp.read())
            resp.close()
            for c in root.iter(f"{NS}Contents"):
                key = c.findtext(f"{NS}Key") or ""
                objects.append(S3Object(key[len(prefix):], int(c.findtext(f"{NS}Size") or 0),
                                        parse_time(c.findtext(f"{NS}LastModified") or "")))
            for p in root.iter(f"{NS}CommonPrefixes"):
                folders.append((p.findtext(f"{NS}Prefix") or "")[len(prefix):])
            token = root.findtext(f"{NS}NextContinuationToken")
            if (root.findtext(f"{NS}IsTruncated") or "false").lower() != "true" or not token:
                return objects, folders


# -- Go's encodings -----------------------------------------------------------------------------
def parse_time(text: str) -> dt.datetime:
    """An RFC 3339 time (S3's LastModified, Go's JSON) as an aware datetime (to the microsecond)."""
    import re

    if not text or text.startswith("0001-01-01"):
        return dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if not m:
        raise WalgError(f"not an RFC 3339 time: {text!r}")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    frac = ((m.group(2) or "") + "000000")[:6]
    return dt.datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}")


def go_time(value: dt.datetime) -> str:
    """Go's JSON encoding of a time.Time (RFC 3339 with nanoseconds, trailing zeros dropped)."""
    if value == dt.datetime.min.replace(tzinfo=dt.timezone.utc):
        return ZERO_TIME
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += "." + f"{value.microsecond:06d}".rstrip("0")
    offset = value.utcoffset() or dt.timedelta(0)
    if not offset:
        return text + "Z"
    minutes = int(offset.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{text}{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def rfc3339(value: dt.datetime) -> str:
    """Go's ``time.RFC3339`` (no fraction), or "-" for the zero time (FormatTime)."""
    if value == dt.datetime.min.replace(tzinfo=dt.timezone.utc):
        return "-"
    return go_time(value.replace(microsecond=0))


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    hi, lo = text.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def wal_file_name(timeline: int, lsn: int, segment_size: int = 16 * 1024 * 1024) -> str:
    segno = lsn // segment_size
    per_xlogid = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def strip_backup_name(key: str) -> str:
    """``base_X_backup_stop_sentinel.json`` -> ``base_X`` (WAL-G's StripRightmostBackupName)."""
    last = key.strip("/").split("/")[-1]
    return last[:-len(SENTINEL_SUFFIX)] if last.endswith(SENTINEL_SUFFIX) else last


def strip_wal_file_name(key: str) -> str:
    import re

    m = re.search(r"[0-9A-F]{24}", key)
    return m.group(0) if m else "Z" * 24


def go_json(value: Any, pretty: bool) -> str:
    """What Go's json.Encoder writes: compact (or indented by 4 with --pretty), then a newline."""
    import json

    if pretty:
        text = json.dumps(value, indent=4, ensure_ascii=False)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n"


# -- compression ----------------------------------------------------------------------------------
def decompressing(stream: IO[bytes], extension: str) -> IO[bytes]:
    if extension == "lzma":
        import lzma

        return lzma.LZMAFile(stream, format=lzma.FORMAT_ALONE)
    if extension == "gz":
        import gzip

        return gzip.GzipFile(fileobj=stream)
    if extension == "":
        return stream
    raise WalgError(f"the WAL-G stand-in cannot decompress .{extension} (Python's standard library has no "
                    f"{ {'lz4': 'lz4', 'zst': 'zstd', 'br': 'brotli'}.get(extension, extension)}); Heroku's "
                    "archive here is written with lzma")


def compress(data: bytes, extension: str) -> bytes:
    if extension != "lzma":
        raise WalgError(f"the WAL-G stand-in compresses with lzma only, not {extension}")
    import lzma

    # the classic .lzma format, as WAL-G's lzma compressor (github.com/ulikunitz/xz/lzma) writes it; LZMA1 at
    # its fastest (small dictionary, hash chains, short matches), which WAL-G's reader takes like any other:
    # a rehearsal pays this CPU for every segment the source archives
    fast = {"id": lzma.FILTER_LZMA1, "preset": 0, "dict_size": 1 << 16, "mode": lzma.MODE_FAST, "nice_len": 8,
            "mf": lzma.MF_HC3, "depth": 1}
    return lzma.compress(data, format=lzma.FORMAT_ALONE, filters=[fast])


def extension_of(name: str) -> str:
    for ext in EXTENSIONS:
        if name.endswith("." + ext):
            return ext
    return ""


# -- the commands ---------------------------------------------------------------------------------
class Walg:
    def __init__(self, s3: S3, prefix: str, out: IO[str] | None = None) -> None:
        self.s3, self.prefix = s3, prefix
        self.out = out or sys.stdout

    # backup-list
    def _backups(self) -> list[dict[str, Any]]:
        """BackupTime entries (backup_name, time, wal_file_name, storage_name), in listing order."""
        objects, _ = self.s3.list(self.prefix + BASEBACKUPS)
        return [{"backup_name": strip_backup_name(o.name), "time": o.last_modified,
                 "wal_file_name": strip_wal_file_name(o.name), "storage_name": DEFAULT_STORAGE}
                for o in objects if o.name.endswith(SENTINEL_SUFFIX)]

    def _read_json(self, key: str) -> Any:
        import json

        resp = self.s3.get(self.prefix + key)
        if resp is None:
            raise WalgError(f"object '{key}' not found in storage")
        with resp:
            data = resp.read()
        try:
            return json.loads(data)
        except ValueError:
            raise WalgError(f"failed to unmarshal {key}") from None

    def _metadata(self, name: str) -> dict[str, Any]:
        """ExtendedMetadataDto as Go decodes it: absent fields are zero values."""
        meta = self._read_json(f"{BASEBACKUPS}{name}/{METADATA}") or {}
        return {"start_time": parse_time(meta.get("start_time") or ""),
                "finish_time": parse_time(meta.get("finish_time") or ""),
                "date_fmt": meta.get("date_fmt") or "", "hostname": meta.get("hostname") or "",
                "data_dir": meta.get("data_dir") or "", "pg_version": int(meta.get("pg_version") or 0),
                "start_lsn": int(meta.get("start_lsn") or 0), "finish_lsn": int(meta.get("finish_lsn") or 0),
                "is_permanent": bool(meta.get("is_permanent")), "system_identifier": meta.get("system_identifier"),
                "uncompressed_size": int(meta.get("uncompressed_size") or 0),
                "compressed_size": int(meta.get("compressed_size") or 0),
                **({"user_data": meta["user_data"]} if meta.get("user_data") is not None else {})}

    def backup_list(self, *, detail: bool, as_json: bool, pretty: bool) -> int:
        backups = self._backups()
        if not backups:
            info("No backups found")
            return 0
        if detail:
            # GetBackupsDetails walks the listing backwards, then SortBackupDetails: by start_time when
            # every backup has metadata with a start time, else by the sentinel's modification time
            entries = [{**b, **self._metadata(b["backup_name"])} for b in reversed(backups)]
            zero = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
            key = "start_time" if all(e["start_time"] != zero for e in entries) else "time"
            entries.sort(key=lambda e: e[key])
        else:
            entries = sorted(backups, key=lambda b: b["time"])
        if as_json:
            self.out.write(go_json([self._json_entry(e) for e in entries], pretty))
        else:
            self._table([self._plain_fields(e, detail) for e in entries])
        return 0

    @staticmethod
    def _json_entry(e: dict[str, Any]) -> dict[str, Any]:
        return {k: go_time(v) if isinstance(v, dt.datetime) else v for k, v in e.items()}

    @staticmethod
    def _plain_fields(e: dict[str, Any], detail: bool) -> list[tuple[str, str]]:
        fields = [("backup_name", e["backup_name"]), ("modified", rfc3339(e["time"])),
                  ("wal_file_name", e["wal_file_name"]), ("storage_name", e["storage_name"])]
        if detail:
            fields += [("start_time", rfc3339(e["start_time"])), ("finish_time", rfc3339(e["finish_time"])),
                       ("hostname", e["hostname"]), ("data_dir", e["data_dir"]), ("pg_version", str(e["pg_version"])),
                       ("start_lsn", format_lsn(e["start_lsn"])), ("finish_lsn", format_lsn(e["finish_lsn"])),
                       ("is_permanent", "true" if e["is_permanent"] else "false")]
        return fields

    def _table(self, rows: list[list[tuple[str, str]]]) -> None:
        """Go's tabwriter (padding 1): every column but the last padded to its widest cell."""
        lines = [[name for name, _ in rows[0]]] + [[value for _, value in r] for r in rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        for line in lines:
            cells = [cell.ljust(widths[i] + 1) for i, cell in enumerate(line[:-1])] + [line[-1]]
            self.out.write("".join(cells) + "\n")

    # backup-fetch
    def latest(self) -> str:
        backups = self._backups()
        if not backups:
            raise WalgError("No backups found")
        name = sorted(backups, key=lambda b: b["time"])[-1]["backup_name"]   # stable: the last of equals
        info(f"LATEST backup is: '{name}'")
        return name

    def backup_fetch(self, directory: str, name: str) -> int:
        import re

        name = self.latest() if name == "LATEST" else name
        sentinel_key = f"{BASEBACKUPS}{name}{SENTINEL_SUFFIX}"
        try:
            sentinel = self._read_json(sentinel_key) or {}
        except WalgError as exc:
            if "not found" in str(exc):
                raise WalgError(f"Backup '{name}' does not exist.") from None
            raise
        if sentinel.get("DeltaFrom"):
            raise WalgError(f"backup {name} is a delta backup (from {sentinel['DeltaFrom']}): the WAL-G stand-in "
                            "restores full backups only")
        if os.path.isdir(directory) and os.listdir(directory):
            for entry in sorted(os.listdir(directory))[:1]:
                info(f"found file '{os.path.join(directory, entry)}' in directory: '{directory}'")
            raise WalgError(f"Directory {directory} for delta base must be empty")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        objects, _ = self.s3.list(f"{self.prefix}{BASEBACKUPS}{name}/{TAR_PARTITIONS}", delimiter="")
        tars = sorted(o.name for o in objects)
        control = [t for t in tars if re.match(r"^.*?pg_control\.tar(\..+$|$)", t)]
        label = [t for t in tars if re.match(r"^.*?backup_label\.tar(\..+$|$)", t)]
        parts = [t for t in tars if t not in control and t not in label]
        if not control:
            raise WalgError("Expect pg_control archive, but not found")
        for tar_name in parts + label + control:     # pg_control last: no half-restored copy can start
            self._extract(f"{BASEBACKUPS}{name}/{TAR_PARTITIONS}{tar_name}", directory)
        info("Backup extraction complete.")
        return 0

    def _extract(self, key: str, directory: str) -> None:
        import tarfile

        resp = self.s3.get(self.prefix + key)
        if resp is None:
            raise WalgError(f"object '{key}' not found in storage")
        root = os.path.realpath(directory)
        with resp, decompressing(resp, extension_of(key)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                target = os.path.realpath(os.path.join(root, member.name))
                if member.name.startswith("/") or not (target == root or target.startswith(root + os.sep)):
                    raise WalgError(f"{key}: member {member.name!r} is outside the data directory")
                if not (member.isfile() or member.isdir()):
                    raise WalgError(f"{key}: member {member.name!r} is neither a file nor a directory "
                                    "(tablespaces are not stood in)")
                tar.extract(member, root, set_attrs=True)
                os.chmod(target, member.mode & 0o700 if member.isfile() else 0o700)

    # wal-fetch
    def wal_fetch(self, segment: str, destination: str) -> int:
        for ext in EXTENSIONS + ("",):
            resp = self.s3.get(f"{self.prefix}{WAL}{segment}" + (f".{ext}" if ext else ""))
            if resp is None:
                continue
            fd = os.open(destination, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_EXCL, 0o666)
            try:
                with resp, decompressing(resp, ext) as stream, os.fdopen(fd, "wb") as out:
                    while chunk := stream.read(1 << 20):
                        out.write(chunk)
            except BaseException:
                os.unlink(destination)
                raise
            return 0
        raise WalgError(f"Archive '{segment}' does not exist.", EX_IOERR)


# -- the push side: Heroku's continuous archiving, stood in -----------------------------------------
class ArchivePublisher:
    """What Heroku's WAL-G puts in its bucket, made from the sandbox's directory archive
    (``<archive>/wal/<segment>``, ``<archive>/basebackups/<name>/base.tar`` from ``pg_basebackup -Ft -X none``).

    ``put(key, body)`` writes one object (the key is under ``prefix``); :meth:`sync` publishes what is new,
    segments in name order, each base backup's sentinel last (WAL-G's commit point). Not thread-safe: one
    caller (the world's sync thread) at a time."""

    def __init__(self, put: Callable[[str, bytes], None], *, archive_dir: str, prefix: str = "", pg_version: int,
                 hostname: str | None = None, data_dir: str = "", compression: str | None = None,
                 tar_size: int = TAR_SIZE_THRESHOLD) -> None:
        self.put = put
        self.archive_dir = archive_dir
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.pg_version = pg_version
        self.hostname = hostname or os.uname().nodename
        self.data_dir = data_dir
        method = compression or os.environ.get("WALG_COMPRESSION_METHOD") or "lzma"
        if method not in COMPRESSORS:
            raise WalgError(f"WALG_COMPRESSION_METHOD {method!r}: the stand-in writes only "
                            + ", ".join(COMPRESSORS))
        self.extension = COMPRESSORS[method]
        self.tar_size = tar_size
        self.published: set[str] = set()       # segment files and base backup directories done
        self.backups: dict[str, str] = {}      # sandbox backup directory -> WAL-G backup name

    def sync(self, wal: bool = True) -> list[str]:
        """Publish every base backup, then (``wal``) every archived file, not published yet; the keys written.
        Segments older than the oldest base backup are not kept (retention: nothing can replay them)."""
        written: list[str] = []
        base = os.path.join(self.archive_dir, "basebackups")
        for entry in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            path = os.path.join(base, entry)
            if path in self.published or not os.path.isfile(os.path.join(path, "backup_sentinel.json")):
                continue                       # the sandbox writes its sentinel when the backup is whole
            written += self.publish_base_backup(path)
            self.published.add(path)
        wal_dir = os.path.join(self.archive_dir, "wal")
        oldest = min((name[len("base_"):] for name in self.backups.values()), default="")
        for entry in sorted(os.listdir(wal_dir)) if wal and os.path.isdir(wal_dir) else []:
            path = os.path.join(wal_dir, entry)
            if entry.startswith(".") or path in self.published or not os.path.isfile(path):
                continue                       # .<name>.tmp: the archive_command is still copying it
            if len(entry) >= 24 and entry[:24] < oldest:
                self.published.add(path)       # before the oldest backup (a .history file is always kept)
                continue
            written.append(self.publish_segment(path))
            self.published.add(path)
        return written

    def publish_segment(self, path: str) -> str:
        """wal-push: ``wal_005/<file>.<ext>`` (segments, history and backup history files alike)."""
        with open(path, "rb") as f:
            data = f.read()
        key = f"{self.prefix}{WAL}{os.path.basename(path)}.{self.extension}"
        self.put(key, compress(data, self.extension))
        return key

    def publish_base_backup(self, path: str) -> list[str]:
        """backup-push's layout from a ``pg_basebackup -Ft`` directory: the tars, metadata, sentinel last."""
        import json

        with open(os.path.join(path, "backup_sentinel.json")) as f:
            sandbox_sentinel = json.load(f)
        label = _backup_label(os.path.join(path, "base.tar"))
        start_lsn = parse_lsn(label["START WAL LOCATION"].split()[0])
        timeline = int(label.get("START TIMELINE", "1"))
        finish_lsn = _finish_lsn(os.path.join(path, "backup_manifest")) or start_lsn
        name = "base_" + wal_file_name(timeline, start_lsn)
        folder = f"{self.prefix}{BASEBACKUPS}{name}/"
        keys: list[str] = []
        uncompressed = compressed = 0
        for tar_name, data in self._tars(os.path.join(path, "base.tar")):
            body = compress(data, self.extension)
            keys.append(f"{folder}{TAR_PARTITIONS}{tar_name}.{self.extension}")
            self.put(keys[-1], body)
            uncompressed += len(data)
            compressed += len(body)
        system_identifier = int(sandbox_sentinel["system_identifier"])
        start_time = _label_time(label.get("START TIME", ""))
        finished = sandbox_sentinel.get("finished_at")
        finish_time = (dt.datetime.fromtimestamp(float(finished), dt.timezone.utc) if finished
                       else dt.datetime.now(dt.timezone.utc))
        # ExtendedMetadataDto, fields in Go's order
        metadata = {"start_time": go_time(start_time), "finish_time": go_time(finish_time),
                    "date_fmt": DATETIME_FORMAT, "hostname": self.hostname, "data_dir": self.data_dir,
                    "pg_version": self.pg_version, "start_lsn": start_lsn, "finish_lsn": finish_lsn,
                    "is_permanent": False, "system_identifier": system_identifier,
                    "uncompressed_size": uncompressed, "compressed_size": compressed}
        keys.append(folder + METADATA)
        self.put(keys[-1], json.dumps(metadata).encode())
        # BackupSentinelDto, fields in Go's order; files metadata not kept (as WALG_WITHOUT_FILES_METADATA)
        sentinel = {"LSN": start_lsn, "PgVersion": self.pg_version, "FinishLSN": finish_lsn,
                    "SystemIdentifier": system_identifier, "UncompressedSize": uncompressed,
                    "CompressedSize": compressed, "Spec": None, "FilesMetadataDisabled": True, "ChkpNum": None}
        keys.append(f"{self.prefix}{BASEBACKUPS}{name}{SENTINEL_SUFFIX}")
        self.put(keys[-1], json.dumps(sentinel).encode())
        self.backups[path] = name
        return keys

    def _tars(self, base_tar: str) -> Iterable[tuple[str, bytes]]:
        """The base backup split as WAL-G splits it: part_NNN.tar (each up to ``tar_size``), then
        backup_label.tar (backup_label, tablespace_map) and pg_control.tar (global/pg_control)."""
        import tarfile

        special = {"backup_label": "backup_label", "tablespace_map": "backup_label", "global/pg_control": "pg_control"}
        held: dict[str, list[tuple[tarfile.TarInfo, bytes | None]]] = {"backup_label": [], "pg_control": []}
        part, size, members = 1, 0, []
        with tarfile.open(base_tar, mode="r:") as tar:
            for m in tar:
                data = tar.extractfile(m).read() if m.isfile() else None
                if m.name in special:
                    held[special[m.name]].append((m, data))
                    continue
                if members and size + m.size > self.tar_size:
                    yield f"part_{part:03d}.tar", _tar_bytes(members)
                    part, size, members = part + 1, 0, []
                members.append((m, data))
                size += m.size
        if members:
            yield f"part_{part:03d}.tar", _tar_bytes(members)
        for tar_name in ("backup_label", "pg_control"):
            if held[tar_name]:
                yield f"{tar_name}.tar", _tar_bytes(held[tar_name])


def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as out:
        for m, data in members:
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _backup_label(base_tar: str) -> dict[str, str]:
    import tarfile

    with tarfile.open(base_tar, mode="r:") as tar:
        try:
            text = tar.extractfile("backup_label").read().decode()
        except KeyError:
            raise WalgError(f"{base_tar} has no backup_label: not a base backup") from None
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def _finish_lsn(manifest: str) -> int | None:
    import json

    try:
        with open(manifest) as f:
            ranges = json.load(f).get("WAL-Ranges") or []
    except (OSError, ValueError):
        return None
    return max((parse_lsn(r["End-LSN"]) for r in ranges), default=None)


def _label_time(text: str) -> dt.datetime:
    """backup_label's ``START TIME: 2024-05-01 12:00:00 UTC`` (the zone name only says UTC here)."""
    try:
        return dt.datetime.strptime(" ".join(text.split()[:2]), "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return dt.datetime.now(dt.timezone.utc)


# -- the host's side: the wal-g and envdir commands the world puts on the agent's PATH ------------------
def wal_g_shim(python: str = "python3") -> str:
    """``wal-g`` on the emulated host: this file run by the host's python3 (isolated: no site, no PYTHON*)."""
    return f'#!/bin/sh\nexec {python} -I -S {os.path.abspath(__file__)} "$@"\n'


# daemontools' envdir, for a machine without it: each file of DIR sets the variable of its name to its first
# line (trailing spaces and tabs removed); an empty file unsets it; exit 111 when DIR cannot be read. Shell
# builtins only (no process per file): PostgreSQL runs it with every restore_command. Unlike envdir, a NUL in
# a value is not read as a newline.
ENVDIR_SHIM = r"""#!/bin/sh
# envdir DIR CHILD...: daemontools' envdir, stood in (the replicas' user data installs daemontools)
[ $# -ge 2 ] || { echo "envdir: usage: envdir dir child" >&2; exit 100; }
d=$1; shift
[ -d "$d" ] && [ -r "$d" ] && [ -x "$d" ] || { echo "envdir: fatal: unable to switch to directory $d" >&2; exit 111; }
for f in "$d"/* "$d"/.[!.]*; do
  [ -f "$f" ] || continue
  n=${f##*/}
  case $n in *=*) echo "envdir: fatal: $n: name contains =" >&2; exit 111;; esac
  if [ -s "$f" ]; then
    IFS= read -r v < "$f" || [ -n "$v" ] || { echo "envdir: fatal: unable to read $f" >&2; exit 111; }
    v=${v%"${v##*[! 	]}"}
    export "$n=$v"
  else
    unset "$n"
  fi
done
exec "$@"
"""


# -- the command line (cobra's: a usage error exits 1) -----------------------------------------------
USAGE = """Usage:
  wal-g [command]

Available Commands:
  backup-fetch  Fetches a backup from storage
  backup-list   Prints full list of backups from which recovery is available
  wal-fetch     Fetches a WAL file from storage
"""


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if args[0] in ("--version", "-v"):
        sys.stdout.write(f"wal-g version {VERSION}\n")
        return 0
    command, rest = args[0], args[1:]
    flags = {a for a in rest if a.startswith("--")}
    positional = [a for a in rest if not a.startswith("--")]
    try:
        if command == "backup-list":
            unknown = flags - {"--json", "--detail", "--pretty"}
            if unknown or positional:
                raise WalgError(f"unknown flag or argument for backup-list: {' '.join(sorted(unknown) + positional)}")
            return _walg(env).backup_list(detail="--detail" in flags, as_json="--json" in flags,
                                          pretty="--pretty" in flags)
        if command == "backup-fetch":
            if flags or len(positional) != 2:
                raise WalgError("backup-fetch takes: destination_directory backup_name|LATEST "
                                "(the stand-in has no flags)")
            return _walg(env).backup_fetch(positional[0], positional[1])
        if command == "wal-fetch":
            if flags or len(positional) != 2:
                raise WalgError(f"accepts 2 arg(s), received {len(positional)}")
            return _walg(env).wal_fetch(positional[0], positional[1])
        raise WalgError(f'unknown command "{command}" for "wal-g"')
    except WalgError as exc:
        _log("ERROR", str(exc))
        return exc.code
    except Exception as exc:  # noqa: BLE001 - WAL-G's FatalOnError: one line, exit 1 (PostgreSQL retries)
        _log("ERROR", f"{type(exc).__name__}: {exc}")
        return 1


def _walg(env: dict[str, str]) -> Walg:
    s3, prefix = S3.from_env(env)
    return Walg(s3, prefix)


if __name__ == "__main__":
    sys.exit(main())
