"""The source's WAL archive (Heroku's S3 bucket in WAL-G layout; a directory in the sandbox).

For each archive kind: how to find the base backup, the command that fetches it onto a
host, and the ``restore_command`` a standby uses to replay WAL from it.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

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
    # s3 / WAL-G: the host's wal-g reads its configuration from /etc/wal-g.env (installed by user data)
    res = host.run(["sh", "-c", "envdir /etc/wal-g.env wal-g backup-list --json --detail"], timeout=120, check=False)
    if res.returncode != 0:
        raise PreflightError(f"cannot list base backups in {archive.location}: {res.stderr.strip()[-300:]}")
    backups = json.loads(res.stdout or "[]")
    if not backups:
        raise PreflightError(f"no base backup in {archive.location}")
    chosen = backups[-1] if archive.base_backup == "LATEST" else next(
        (b for b in backups if b["backup_name"] == archive.base_backup), None)
    if chosen is None:
        raise PreflightError(f"base backup {archive.base_backup} not found in {archive.location}")
    return BaseBackup(chosen["backup_name"], int(str(chosen["pg_version"])[:2]), str(chosen.get("system_identifier", "")),
                      int(chosen.get("uncompressed_size", 0)), None)


def fetch_command(archive: Archive, backup: BaseBackup, data_dir: str) -> list[str]:
    if archive.kind == "directory":
        return ["tar", "-xf", f"{archive.location.rstrip('/')}/basebackups/{backup.name}/base.tar", "-C", data_dir]
    return ["sh", "-c", f"envdir /etc/wal-g.env wal-g backup-fetch {shlex.quote(data_dir)} {shlex.quote(backup.name)}"]


def restore_command(archive: Archive) -> str:
    if archive.kind == "directory":
        return f"cp {shlex.quote(archive.location.rstrip('/') + '/wal')}/%f %p"
    return "envdir /etc/wal-g.env wal-g wal-fetch %f %p"
