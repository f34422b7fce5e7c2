"""The source's WAL archive (Heroku's S3 bucket in WAL-G layout; a directory in the sandbox).

For each archive kind: how to find the base backup, the command that fetches it onto a
host, and the ``restore_command`` a standby uses to replay WAL from it.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from datetime import datetime

from .adapters import HostCommands
from .contract import Archive
from .errors import PreflightError


@dataclass(frozen=True)
class BaseBackup:
    name: str
    pg_major: int
    system_identifier: str
    size_bytes: int
    superuser: str | None


def find_base_backup(archive: Archive, host: HostCommands) -> BaseBackup:
    """The base backup named in the contract, checked from the host that will restore it."""
    if archive.kind == "directory":
        root = archive.location.rstrip("/")
        if not host.exists(f"{root}/wal"):
            raise PreflightError(f"the WAL archive {root}/wal is missing")
        name = archive.base_backup
        if name == "LATEST":
            latest = host.read_file(f"{root}/basebackups/LATEST")
            if not latest:
                raise PreflightError(f"no base backup in the archive ({root}/basebackups/LATEST is missing)")
            name = latest.strip()
        sentinel = host.read_file(f"{root}/basebackups/{name}/backup_sentinel.json")
        if sentinel is None or not host.exists(f"{root}/basebackups/{name}/base.tar"):
            raise PreflightError(f"base backup {name} is missing or incomplete in {root}/basebackups")
        info = json.loads(sentinel)
        size = int(host.run(["stat", "-c", "%s", f"{root}/basebackups/{name}/base.tar"], timeout=30).stdout.strip())
        return BaseBackup(name, int(info["pg_major"]), str(info["system_identifier"]), size, info.get("superuser"))
    # s3 / WAL-G: the host's wal-g reads its configuration from the env directory (installed by user data)
    res = host.run(["sh", "-c", f"{_walg(archive)} backup-list --json --detail"], timeout=120, check=False)
    if res.returncode != 0:
        raise PreflightError(f"cannot list base backups in {archive.location}: {res.stderr.strip()[-300:]}")
    try:
        backups = json.loads(res.stdout or "[]")   # v3.0.5 prints nothing at all when there is no backup
    except json.JSONDecodeError:
        raise PreflightError(f"wal-g backup-list printed something that is not JSON: {res.stdout.strip()[:200]}") from None
    return choose_backup(backups or [], archive)


def choose_backup(backups: list[dict], archive: Archive) -> BaseBackup:
    """The entry of ``wal-g backup-list --json --detail`` that ``archive.base_backup`` names.

    LATEST is what ``wal-g backup-fetch LATEST`` would fetch: the backup whose sentinel was written last
    (``time``, the sentinel's modification time). The detailed list is sorted by ``start_time`` instead,
    so its last entry is not always that one; the name found here is then fetched by name, so every
    replica restores the same backup even if a newer one lands meanwhile."""
    if not backups:
        raise PreflightError(f"no base backup in {archive.location}")
    if archive.base_backup == "LATEST":
        # Go's stable sort by time: among equal times, the one listed last
        chosen = sorted(enumerate(backups), key=lambda ib: (_time(ib[1].get("time")), ib[0]))[-1][1]
    else:
        chosen = next((b for b in backups if b.get("backup_name") == archive.base_backup), None)
    if chosen is None:
        raise PreflightError(f"base backup {archive.base_backup} not found in {archive.location}")
    # pg_version is server_version_num (150004 for 15.4; 90624 for 9.6, read as 9); 0 without metadata
    major = int(chosen.get("pg_version") or 0) // 10000
    # system_identifier is a number, or null for a backup pushed without one
    sysid = chosen.get("system_identifier")
    return BaseBackup(chosen["backup_name"], major, "" if sysid is None else str(sysid),
                      int(chosen.get("uncompressed_size") or 0), None)


def _time(text: object) -> datetime:
    """An RFC 3339 time as WAL-G prints it (Go: nanoseconds, trailing zeros dropped, Z or an offset)."""
    raw = str(text or "")
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", raw)
    if not m:
        raise PreflightError(f"wal-g backup-list printed a time that is not RFC 3339: {raw[:40]!r}")
    frac = ((m.group(2) or "") + "000000")[:6]
    return datetime.fromisoformat(f"{m.group(1)}.{frac}{'+00:00' if m.group(3) == 'Z' else m.group(3)}")


def _walg(archive: Archive) -> str:
    return f"envdir {shlex.quote(archive.env_dir)} wal-g"


def fetch_command(archive: Archive, backup: BaseBackup, data_dir: str) -> list[str]:
    if archive.kind == "directory":
        return ["tar", "-xf", f"{archive.location.rstrip('/')}/basebackups/{backup.name}/base.tar", "-C", data_dir]
    return ["sh", "-c", f"{_walg(archive)} backup-fetch {shlex.quote(data_dir)} {shlex.quote(backup.name)}"]


def restore_command(archive: Archive) -> str:
    """PostgreSQL's ``restore_command``. ``wal-g wal-fetch`` exits 74 for a segment not archived yet,
    which PostgreSQL reads as "not there" and retries (an exit above 125 would abort recovery)."""
    if archive.kind == "directory":
        return f"cp {shlex.quote(archive.location.rstrip('/') + '/wal')}/%f %p"
    return f"{_walg(archive)} wal-fetch %f %p"
