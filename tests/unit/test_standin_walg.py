"""The WAL-G stand-in's command-line contract (runbook/standins/walg.py), as WAL-G v3.0.5 behaves, and the
archive adapter's reading of it (runbook/archive.py), against the S3 side of the SSM stand-in.

The commands run as a host runs them: the host's python3, isolated (``python3 -I -S walg.py``), with WAL-G's
settings in the environment, through the ``wal-g`` and ``envdir`` shims the rehearsal world installs.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from unittest import mock

import pytest

from runbook.adapters import CommandResult, HostCommands
from runbook.archive import choose_backup, find_base_backup, restore_command
from runbook.contract import Archive
from runbook.errors import PreflightError
from runbook.standins import walg
from runbook.standins.ssm import SsmStandIn

BUCKET = "heroku-wal"
PREFIX = "shop-db"
SYSID = 7312345678901234567
PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"


@pytest.fixture
def s3():
    with SsmStandIn(latency=0.0, visible_after=0.0) as service:
        service.add_bucket(BUCKET)
        yield service


def env_for(service: SsmStandIn, prefix: str = PREFIX) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "WALG_S3_PREFIX": f"s3://{BUCKET}/{prefix}", "AWS_REGION": service.region,
            "AWS_ENDPOINT": service.endpoint_url, "AWS_S3_FORCE_PATH_STYLE": "true",
            "AWS_ACCESS_KEY_ID": service.access_key, "AWS_SECRET_ACCESS_KEY": service.secret_key}


def wal_g(service: SsmStandIn, *args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run([PYTHON, "-I", "-S", walg.__file__, *args], env=env or env_for(service), cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def make_base_backup(archive: Path, *, lsn: str, segment: str, start: str, sysid: int = SYSID,
                     payload: bytes = b"rows of the base backup") -> Path:
    """A ``pg_basebackup -Ft -X none`` directory as the sandbox keeps it (base.tar, backup_manifest, sentinel)."""
    d = archive / "basebackups" / f"base_{segment}_sandbox"
    d.mkdir(parents=True)
    members = {
        "backup_label": (f"START WAL LOCATION: {lsn} (file {segment})\nCHECKPOINT LOCATION: {lsn}\n"
                         f"BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: {start} UTC\n"
                         "LABEL: pg_basebackup base backup\nSTART TIMELINE: 1\n").encode(),
        "PG_VERSION": b"15\n", "base/1/1259": payload, "global/pg_control": b"control" * 100}
    with tarfile.open(d / "base.tar", "w") as tar:
        for dirname in ("base", "base/1", "global", "pg_wal"):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    hi, lo = lsn.split("/")
    end = f"{hi}/{int(lo, 16) + 0x100:X}"
    (d / "backup_manifest").write_text(json.dumps({"WAL-Ranges": [{"Timeline": 1, "Start-LSN": lsn, "End-LSN": end}]}))
    (d / "backup_sentinel.json").write_text(json.dumps({"name": d.name, "pg_major": 15, "system_identifier": str(sysid),
                                                        "finished_at": 1714564900.5}))
    return d


def publisher(service: SsmStandIn, archive: Path, **kw) -> walg.ArchivePublisher:
    return walg.ArchivePublisher(lambda key, body: service.put_object(BUCKET, key, body), archive_dir=str(archive),
                                 prefix=PREFIX, pg_version=150004, hostname="heroku-db", data_dir="/db", **kw)


def set_modified(service: SsmStandIn, key: str, when: dt.datetime) -> None:
    service.modified[(BUCKET, key)] = when.timestamp()


def sentinel_key(name: str) -> str:
    return f"{PREFIX}/basebackups_005/{name}_backup_stop_sentinel.json"


@pytest.fixture
def two_backups(s3, tmp_path):
    """Two backups whose sentinels were written in the other order than they started: the first to start
    (base_...02) was the last to finish."""
    archive = tmp_path / "archive"
    make_base_backup(archive, lsn="0/2000028", segment="000000010000000000000002", start="2024-05-01 10:00:00")
    make_base_backup(archive, lsn="0/5000028", segment="000000010000000000000005", start="2024-05-01 11:00:00")
    (archive / "wal").mkdir()
    (archive / "wal" / "000000010000000000000002").write_bytes(b"\x01" * 8192 + b"segment two")
    (archive / "wal" / ".000000010000000000000003.tmp").write_bytes(b"being copied")
    (archive / "wal" / "000000010000000000000001").write_bytes(b"before every base backup")
    (archive / "wal" / "00000002.history").write_bytes(b"1\t0/3000000\tno recovery target specified\n")
    pub = publisher(s3, archive)
    written = pub.sync()
    set_modified(s3, sentinel_key("base_000000010000000000000005"), dt.datetime(2024, 5, 1, 11, 5, tzinfo=dt.timezone.utc))
    set_modified(s3, sentinel_key("base_000000010000000000000002"), dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc))
    return archive, pub, written


# -- the layout ------------------------------------------------------------------------------------------

def test_the_archive_is_in_walg_layout_lzma_compressed_with_the_sentinel_last(s3, two_backups):
    _, pub, written = two_backups
    keys = set(s3.buckets[BUCKET])
    name = "base_000000010000000000000002"
    folder = f"{PREFIX}/basebackups_005/{name}/"
    assert {f"{folder}tar_partitions/part_001.tar.lzma", f"{folder}tar_partitions/backup_label.tar.lzma",
            f"{folder}tar_partitions/pg_control.tar.lzma", f"{folder}metadata.json", sentinel_key(name),
            f"{PREFIX}/wal_005/000000010000000000000002.lzma"} <= keys
    assert not any(".tmp" in k for k in keys)                 # a segment still being copied is not pushed
    # retention: WAL older than the oldest base backup is not kept; timeline history files always are
    assert f"{PREFIX}/wal_005/000000010000000000000001.lzma" not in keys
    assert f"{PREFIX}/wal_005/00000002.history.lzma" in keys
    mine = [k for k in written if name in k]
    assert mine[-1] == sentinel_key(name)                      # the sentinel is WAL-G's commit point: last
    # the classic .lzma format, as WAL-G's lzma (ulikunitz/xz/lzma) writes and reads it
    seg = lzma.decompress(s3.buckets[BUCKET][f"{PREFIX}/wal_005/000000010000000000000002.lzma"],
                          format=lzma.FORMAT_ALONE)
    assert seg.endswith(b"segment two")
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(s3.buckets[BUCKET][f"{folder}tar_partitions/pg_control.tar.lzma"],
                                                         format=lzma.FORMAT_ALONE))) as tar:
        assert tar.getnames() == ["global/pg_control"]
    sentinel = json.loads(s3.buckets[BUCKET][sentinel_key(name)])
    assert list(sentinel)[:4] == ["LSN", "PgVersion", "FinishLSN", "SystemIdentifier"]
    assert (sentinel["LSN"], sentinel["PgVersion"], sentinel["SystemIdentifier"]) == (0x2000028, 150004, SYSID)
    assert pub.sync() == []                                    # idempotent: nothing new, nothing written


# -- backup-list ---------------------------------------------------------------------------------------------

DETAIL_FIELDS = ["backup_name", "time", "wal_file_name", "storage_name", "start_time", "finish_time", "date_fmt",
                 "hostname", "data_dir", "pg_version", "start_lsn", "finish_lsn", "is_permanent", "system_identifier",
                 "uncompressed_size", "compressed_size"]


def test_backup_list_json_detail_prints_walgs_fields_in_walgs_order_sorted_by_start_time(s3, two_backups):
    res = wal_g(s3, "backup-list", "--json", "--detail")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("\n") == 1 and res.stdout.startswith('[{"backup_name":')   # Go: compact, one line
    backups = json.loads(res.stdout)
    assert [list(b) for b in backups] == [DETAIL_FIELDS, DETAIL_FIELDS]
    assert [b["backup_name"] for b in backups] == ["base_000000010000000000000002", "base_000000010000000000000005"]
    first = backups[0]
    assert first["time"] == "2024-05-01T12:00:00Z" and first["start_time"] == "2024-05-01T10:00:00Z"
    assert first["wal_file_name"] == "000000010000000000000002" and first["storage_name"] == "default"
    # numbers, as Go encodes an int, an LSN (uint64) and a *uint64
    assert (first["pg_version"], first["start_lsn"], first["finish_lsn"]) == (150004, 0x2000028, 0x2000128)
    assert first["system_identifier"] == SYSID and first["is_permanent"] is False
    assert first["uncompressed_size"] > first["compressed_size"] > 0
    assert first["hostname"] == "heroku-db" and first["date_fmt"] == "%Y-%m-%dT%H:%M:%S.%fZ"


def test_backup_list_plain_is_oldest_sentinel_first_and_pretty_json_is_indented(s3, two_backups):
    res = wal_g(s3, "backup-list")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["backup_name", "modified", "wal_file_name", "storage_name"]
    assert [line.split()[0] for line in lines[1:]] == ["base_000000010000000000000005", "base_000000010000000000000002"]
    pretty = wal_g(s3, "backup-list", "--json", "--pretty")
    assert pretty.stdout.startswith('[\n    {\n        "backup_name": "base_000000010000000000000005",\n')
    assert [list(b) for b in json.loads(pretty.stdout)] == [DETAIL_FIELDS[:4]] * 2


def test_backup_list_without_backups_prints_nothing_and_exits_0(s3):
    res = wal_g(s3, "backup-list", "--json", "--detail")
    assert (res.returncode, res.stdout) == (0, "")           # v3.0.5: not even "[]"
    assert "No backups found" in res.stderr


def test_no_credentials_or_no_prefix_is_an_error(s3):
    env = env_for(s3)
    del env["AWS_SECRET_ACCESS_KEY"]
    res = wal_g(s3, "backup-list", env=env)
    assert res.returncode == 1 and "credentials" in res.stderr
    env = env_for(s3)
    del env["WALG_S3_PREFIX"]
    assert wal_g(s3, "backup-list", env=env).returncode == 1


# -- backup-fetch ---------------------------------------------------------------------------------------------

def test_backup_fetch_latest_is_the_last_sentinel_written_not_the_last_started(s3, two_backups, tmp_path):
    target = tmp_path / "data"
    res = wal_g(s3, "backup-fetch", str(target), "LATEST")
    assert res.returncode == 0, res.stderr
    assert "LATEST backup is: 'base_000000010000000000000002'" in res.stderr
    assert "START WAL LOCATION: 0/2000028" in (target / "backup_label").read_text()
    assert (target / "global" / "pg_control").read_bytes() == b"control" * 100
    assert (target / "base" / "1" / "1259").read_bytes() == b"rows of the base backup"
    assert (target / "pg_wal").is_dir() and oct((target / "base" / "1" / "1259").stat().st_mode & 0o777) == "0o600"


def test_backup_fetch_refuses_a_directory_that_is_not_empty(s3, two_backups, tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "PG_VERSION").write_text("15\n")
    res = wal_g(s3, "backup-fetch", str(target), "base_000000010000000000000005")
    assert res.returncode == 1
    assert f"Directory {target} for delta base must be empty" in res.stderr
    assert sorted(os.listdir(target)) == ["PG_VERSION"]       # nothing extracted


def test_backup_fetch_of_an_unknown_backup_or_an_empty_archive_fails(s3, two_backups, tmp_path):
    res = wal_g(s3, "backup-fetch", str(tmp_path / "a"), "base_000000010000000000000009")
    assert res.returncode == 1 and "Backup 'base_000000010000000000000009' does not exist." in res.stderr
    res = wal_g(s3, "backup-fetch", str(tmp_path / "b"), "LATEST", env=env_for(s3, prefix="other-db"))
    assert res.returncode == 1 and "No backups found" in res.stderr


def test_a_base_backup_larger_than_the_tar_size_is_split_into_parts(s3, tmp_path):
    archive = tmp_path / "archive"
    make_base_backup(archive, lsn="0/9000028", segment="000000010000000000000009", start="2024-05-02 10:00:00",
                     payload=os.urandom(6000))
    publisher(s3, archive, tar_size=4096).sync()
    parts = sorted(k.rsplit("/", 1)[1] for k in s3.buckets[BUCKET] if "/tar_partitions/part_" in k)
    assert parts == ["part_001.tar.lzma", "part_002.tar.lzma"]
    res = wal_g(s3, "backup-fetch", str(tmp_path / "data"), "LATEST")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "data" / "PG_VERSION").read_text() == "15\n"
    assert len((tmp_path / "data" / "base" / "1" / "1259").read_bytes()) == 6000


# -- wal-fetch ------------------------------------------------------------------------------------------------

def test_wal_fetch_writes_the_segment_and_exits_74_when_it_is_not_archived_yet(s3, two_backups, tmp_path):
    (tmp_path / "pg_wal").mkdir()
    res = wal_g(s3, "wal-fetch", "000000010000000000000002", "pg_wal/RECOVERYXLOG", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "pg_wal" / "RECOVERYXLOG").read_bytes() == b"\x01" * 8192 + b"segment two"
    # not archived yet (and a timeline history file that does not exist): 74, which PostgreSQL retries
    for name in ("000000010000000000000003", "00000003.history"):
        res = wal_g(s3, "wal-fetch", name, "pg_wal/RECOVERYXLOG2", cwd=tmp_path)
        assert res.returncode == walg.EX_IOERR == 74, res.stderr
        assert f"Archive '{name}' does not exist." in res.stderr
        assert not (tmp_path / "pg_wal" / "RECOVERYXLOG2").exists()
    # once the source archives it and the bucket has it, the same command succeeds
    (two_backups[0] / "wal" / "000000010000000000000003").write_bytes(b"segment three")
    two_backups[1].sync()
    res = wal_g(s3, "wal-fetch", "000000010000000000000003", "pg_wal/RECOVERYXLOG2", cwd=tmp_path)
    assert res.returncode == 0 and (tmp_path / "pg_wal" / "RECOVERYXLOG2").read_bytes() == b"segment three"


def test_wal_fetch_cannot_reach_s3_exits_1_not_above_125(s3, tmp_path):
    env = {**env_for(s3), "AWS_ENDPOINT": "http://127.0.0.1:9"}
    res = wal_g(s3, "wal-fetch", "000000010000000000000002", str(tmp_path / "x"), env=env)
    assert res.returncode == 1 and "cannot reach S3" in res.stderr
    assert wal_g(s3, "wal-fetch", "only-one-argument").returncode == 1


# -- S3: signatures and listing --------------------------------------------------------------------------------

def test_requests_are_signed_as_botocore_signs_them():
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    now = dt.datetime(2024, 5, 1, 12, 30, 45, tzinfo=dt.timezone.utc)
    for token in (None, "session-token/+="):
        for path, query in (("/heroku-wal/shop-db/wal_005/000000010000000000000002.lzma", []),
                            ("/heroku-wal/", [("list-type", "2"), ("prefix", "shop db/basebackups_005/"),
                                              ("delimiter", "/"), ("continuation-token", "a+b=c/d")])):
            ours = walg.sigv4_headers("GET", "127.0.0.1:8123", path, query, walg.EMPTY_SHA256, region="us-east-1",
                                      access_key="AKIDEXAMPLE", secret_key="wJalrXUtnFEMI/K7MDENG", token=token, now=now)
            url = "http://127.0.0.1:8123" + path + ("?" + "&".join(f"{walg._encode(k)}={walg._encode(v)}"
                                                                 for k, v in query) if query else "")
            request = AWSRequest(method="GET", url=url, headers={"X-Amz-Content-SHA256": walg.EMPTY_SHA256})
            signer = S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "s3", "us-east-1")
            with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
                signer.add_auth(request)
            assert ours["Authorization"] == request.headers["Authorization"], (path, token)


def test_listing_pages_and_common_prefixes_match_boto3s_view(s3):
    for i in range(1005):
        s3.put_object(BUCKET, f"{PREFIX}/wal_005/{i:024X}.lzma", b"x")
    for name in ("base_1", "base_2"):
        s3.put_object(BUCKET, f"{PREFIX}/basebackups_005/{name}/metadata.json", b"{}")
        s3.put_object(BUCKET, f"{PREFIX}/basebackups_005/{name}_backup_stop_sentinel.json", b"{}")
    client = walg.S3(bucket=BUCKET, region=s3.region, endpoint=s3.endpoint_url, path_style=True,
                     access_key=s3.access_key, secret_key=s3.secret_key)
    objects, folders = client.list(f"{PREFIX}/wal_005/")
    assert len(objects) == 1005 and objects[0].name == f"{0:024X}.lzma"        # two pages of ListObjectsV2
    objects, folders = client.list(f"{PREFIX}/basebackups_005/")
    assert [o.name for o in objects] == ["base_1_backup_stop_sentinel.json", "base_2_backup_stop_sentinel.json"]
    assert folders == ["base_1/", "base_2/"]
    # boto3's paginator agrees, with tiny pages that cut between a common prefix and keys
    pages = s3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=f"{PREFIX}/basebackups_005/", Delimiter="/", PaginationConfig={"PageSize": 1})
    keys, prefixes = [], []
    for page in pages:
        keys += [c["Key"] for c in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    assert prefixes == [f"{PREFIX}/basebackups_005/base_1/", f"{PREFIX}/basebackups_005/base_2/"]
    assert keys == [f"{PREFIX}/basebackups_005/base_1_backup_stop_sentinel.json",
                    f"{PREFIX}/basebackups_005/base_2_backup_stop_sentinel.json"]


# -- the host's shims and the archive adapter ----------------------------------------------------------------

class ShimHost(HostCommands):
    """A host whose PATH has the world's ``wal-g`` (and ``envdir``, when daemontools is absent) first."""

    name = "replica"

    def __init__(self, bin_dir: Path) -> None:
        self.env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}

    def run(self, argv, *, timeout, input=None, check=True):
        res = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, input=input)
        return CommandResult(res.returncode, res.stdout, res.stderr)

    def write_file_from_secret(self, path, prefix, reference, *, timeout=60.0):
        raise NotImplementedError


@pytest.fixture
def host(s3, tmp_path):
    bin_dir, env_dir = tmp_path / "bin", tmp_path / "wal-g.env"
    bin_dir.mkdir()
    env_dir.mkdir()
    (bin_dir / "wal-g").write_text(walg.wal_g_shim(PYTHON))
    (bin_dir / "envdir").write_text(walg.ENVDIR_SHIM)      # the shim even where daemontools is installed
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    for k, v in env_for(s3).items():
        if k != "PATH":
            (env_dir / k).write_text(v + "  \n")               # envdir drops trailing blanks
    return ShimHost(bin_dir), Archive(kind="s3", location=f"s3://{BUCKET}/{PREFIX}", env_dir=str(env_dir))


def test_the_envdir_shim_behaves_as_daemontools_envdir(tmp_path):
    shim = tmp_path / "envdir"
    shim.write_text(walg.ENVDIR_SHIM)
    shim.chmod(0o755)
    d = tmp_path / "env"
    d.mkdir()
    (d / "KEPT").write_text("first line \t \nsecond line\n")   # the first line, trailing blanks dropped
    (d / "GONE").write_text("")                                  # an empty file unsets the variable
    res = subprocess.run([str(shim), str(d), "sh", "-c", 'printf "%s|%s|%s" "$KEPT" "${GONE-unset}" "$OTHER"'],
                         env={"PATH": "/usr/bin:/bin", "GONE": "set", "OTHER": "inherited"}, capture_output=True,
                         text=True, timeout=10)
    assert (res.returncode, res.stdout) == (0, "first line|unset|inherited")
    res = subprocess.run([str(shim), str(tmp_path / "missing"), "true"], capture_output=True, text=True, timeout=10)
    assert res.returncode == 111     # daemontools' "temporary failure": PostgreSQL retries, never aborts


def test_find_base_backup_through_envdir_takes_what_backup_fetch_latest_fetches(s3, two_backups, host):
    shim_host, archive = host
    backup = find_base_backup(archive, shim_host)
    assert (backup.name, backup.pg_major, backup.system_identifier) == ("base_000000010000000000000002", 15, str(SYSID))
    assert backup.size_bytes > 0
    named = find_base_backup(archive.model_copy(update={"base_backup": "base_000000010000000000000005"}), shim_host)
    assert named.name == "base_000000010000000000000005"
    with pytest.raises(PreflightError, match="base_9 not found"):
        find_base_backup(archive.model_copy(update={"base_backup": "base_9"}), shim_host)
    assert restore_command(archive) == f"envdir {archive.env_dir} wal-g wal-fetch %f %p"


def test_find_base_backup_in_an_empty_archive_is_refused(s3, host):
    shim_host, archive = host
    with pytest.raises(PreflightError, match="no base backup"):
        find_base_backup(archive, shim_host)


def test_the_adapter_reads_walgs_encodings():
    archive = Archive(kind="s3", location="s3://b/p")
    base = {"wal_file_name": "0" * 24, "storage_name": "default", "uncompressed_size": 5}
    listed = [  # detailed order: by start_time; the sentinel of the first was written last
        {**base, "backup_name": "base_a", "time": "2024-05-01T12:00:00.5+03:00", "pg_version": 90624,
         "system_identifier": None},
        {**base, "backup_name": "base_b", "time": "2024-05-01T10:00:00.25Z", "pg_version": 150004,
         "system_identifier": 7312345678901234567},
        {**base, "backup_name": "base_c", "time": "2024-05-01T10:00:00.25Z", "pg_version": 160000}]
    latest = choose_backup(listed, archive)
    assert latest.name == "base_c" and latest.pg_major == 16     # Go's stable sort: the last of equal times
    b = choose_backup(listed, archive.model_copy(update={"base_backup": "base_b"}))
    assert (b.pg_major, b.system_identifier) == (15, "7312345678901234567")
    a = choose_backup(listed, archive.model_copy(update={"base_backup": "base_a"}))
    assert (a.pg_major, a.system_identifier) == (9, "")           # null: no identifier to compare, not "None"
    with pytest.raises(PreflightError, match="no base backup"):
        choose_backup([], archive)
