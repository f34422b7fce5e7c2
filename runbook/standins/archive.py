"""Heroku's WAL archive in S3 and what the replicas' user data installs, stood in around a sandbox.

The sandbox's source archives into a directory (``<sandbox>/archive``: ``wal/<segment>``,
``basebackups/<name>/base.tar``). A rehearsal through the real adapters needs it where the real night
has it: in an S3 bucket, in WAL-G's layout, with new segments arriving while the source keeps
archiving, as Heroku's continuous archiving pushes them. :class:`HerokuArchive` does that into a
bucket of the SSM stand-in's S3 (:class:`~runbook.standins.walg.ArchivePublisher`, every
``interval`` seconds on a thread), and stands in for what ``infra/replicas.py``'s user data leaves on
every instance:

* ``wal-g`` on the agent's PATH (the stand-in, :mod:`runbook.standins.walg`, run by the host's
  ``python3``), and ``envdir`` too when this machine has no daemontools (the instances install it);
* WAL-G's env directory (``archive.env_dir`` of the outputs; ``/etc/wal-g.env`` on AWS): one file a
  variable, ``root:<os user>`` 0750/0640 as the user data makes it, with the stand-in's endpoint and
  keys (a real instance's WAL-G uses its instance role instead; there is no metadata service here);
* each replica's certificate and key (``replicas[].tls_dir``; ``/etc/tern/postgresql`` on AWS), made
  once with openssl as the user data makes them (an EC key here: an RSA 3072 key takes seconds).

The bin directory outlives :meth:`HerokuArchive.stop` (a standby started with it on its PATH keeps
calling ``restore_command``; a missing ``envdir`` would be "command not found", which aborts recovery);
the env directory, which holds the stand-in's secret key, does not (``envdir`` then exits 111, which
PostgreSQL retries).
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from . import walg
from .ssm import AGENT_PATH, SsmStandIn

log = logging.getLogger(__name__)

BUCKET = "tern-rehearsal-heroku-wal"
ENV_DIR = "wal-g.env"


def install_host_tools(root: Path, os_user: str) -> Path:
    """``<root>/bin`` with ``wal-g`` (and ``envdir`` when daemontools is absent); the directory to put first
    on the SSM agent's PATH (:class:`SsmStandIn` ``agent_path``)."""
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(bin_dir, 0o755)
    python = shutil.which("python3", path=AGENT_PATH) or shutil.which("python3") or "python3"
    tools = {"wal-g": walg.wal_g_shim(python)}
    if shutil.which("envdir", path=AGENT_PATH) is None:
        tools["envdir"] = walg.ENVDIR_SHIM
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        os.chmod(bin_dir / name, 0o755)
    return bin_dir


def _owner(os_user: str) -> tuple[int, int] | None:
    """(uid, gid) of ``os_user`` when this process may give files to it (root), else None."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam(os_user)
    return pw.pw_uid, pw.pw_gid


def make_tls_files(tls_dir: str, common_name: str, os_user: str) -> bool:
    """The user data's certificate and key, unless they are there (True: made now)."""
    d = Path(tls_dir)
    key, cert = d / "server.key", d / "server.crt"
    if key.exists() and key.stat().st_size and cert.exists() and cert.stat().st_size:
        return False
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "3650", "-sha256", "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    os.chmod(d, 0o700)
    os.chmod(key, 0o600)
    os.chmod(cert, 0o644)
    owner = _owner(os_user)
    if owner:
        for p in (d, key, cert):
            os.chown(p, *owner)
    return True


class HerokuArchive:
    """Start after the SSM stand-in (it serves the bucket); stop before it."""

    def __init__(self, sandbox, ssm: SsmStandIn, root: Path, *, os_user: str = "postgres", prefix: str | None = None,
                 interval: float = 0.2, bucket: str = BUCKET) -> None:
        self.sandbox = sandbox
        self.ssm = ssm
        self.root = Path(root)
        self.os_user = os_user
        self.bucket = bucket
        self.prefix = prefix or "heroku-postgres"
        self.interval = interval
        self.env_dir = self.root / ENV_DIR
        self.publisher: walg.ArchivePublisher | None = None
        self.published: list[str] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def contract(self) -> dict[str, Any]:
        """The outputs' ``source.archive``, as a real stack exports it (with this env directory)."""
        return {"kind": "s3", "location": self.location, "base_backup": "LATEST", "env_dir": str(self.env_dir)}

    def start(self) -> "HerokuArchive":
        self.ssm.add_bucket(self.bucket)
        self._write_env_dir()
        source = self.sandbox.node("source")
        version = int(source.query_one("SELECT current_setting('server_version_num')::int AS v")["v"])
        self.publisher = walg.ArchivePublisher(
            lambda key, body: self.ssm.put_object(self.bucket, key, body), archive_dir=str(self.sandbox.archive),
            prefix=self.prefix, pg_version=version, data_dir=source.data_dir)
        self.published += self.publisher.sync(wal=False)  # the base backup at once; its WAL comes with the thread
        self._thread = threading.Thread(target=self._loop, name="heroku-wal-archive", daemon=True)
        self._thread.start()
        return self

    def _write_env_dir(self) -> None:
        """As the user data: ``install -d -m 750 -o root -g <os user>``, files 0640, group the OS user."""
        self.env_dir.mkdir(mode=0o750, exist_ok=True)
        os.chmod(self.env_dir, 0o750)
        values = {"WALG_S3_PREFIX": self.location, "AWS_REGION": self.ssm.region,
                  "AWS_ENDPOINT": self.ssm.endpoint_url, "AWS_S3_FORCE_PATH_STYLE": "true",
                  "AWS_ACCESS_KEY_ID": self.ssm.access_key, "AWS_SECRET_ACCESS_KEY": self.ssm.secret_key}
        owner = _owner(self.os_user)
        for name, value in values.items():
            path = self.env_dir / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            with os.fdopen(fd, "w") as f:
                f.write(value + "\n")
            os.chmod(path, 0o640)
            if owner:
                os.chown(path, 0, owner[1])
        if owner:
            os.chown(self.env_dir, 0, owner[1])

    def _loop(self) -> None:
        while True:
            self.sync_now()
            if self._stop.wait(self.interval):
                return

    def sync_now(self) -> list[str]:
        """Push what the source archived since the last pass (the thread does it every ``interval``)."""
        assert self.publisher is not None
        try:
            written = self.publisher.sync()
        except Exception as exc:  # noqa: BLE001 - a pass that failed is retried at the next one
            self.errors += 1
            log.warning("heroku archive stand-in: push failed (%s: %s); retrying", type(exc).__name__, exc)
            return []
        self.published += written
        return written

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        shutil.rmtree(self.env_dir, ignore_errors=True)    # the stand-in's secret key: gone with it

    def summary(self) -> dict[str, Any]:
        backups = self.publisher.backups.values() if self.publisher else ()
        return {"location": self.location, "base_backups": sorted(backups),
                "wal_files_pushed": sum(1 for k in self.published if f"/{walg.WAL}" in k),
                "push_errors": self.errors}
