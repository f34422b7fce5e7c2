"""HostCommands as a local subprocess, run as the database OS user.

PostgreSQL refuses to run as root: when tern runs as root (CI, these machines),
commands run as ``os_user`` (default ``postgres``) through ``runuser``; as an
ordinary user on a laptop they run as that user.
"""

from __future__ import annotations

import getpass
import os
import pwd
import subprocess
from typing import Sequence

from ..errors import CommandError, CommandTimeout
from ..redact import redact
from . import CommandResult, HostCommands


def as_user_prefix(os_user: str) -> list[str]:
    """The argv prefix that runs a command as ``os_user`` from the current user."""
    if os.geteuid() != 0:
        return []
    if os_user == "root":
        raise CommandError("refusing to run PostgreSQL commands as root; set commands.os_user")
    try:
        pwd.getpwnam(os_user)
    except KeyError:
        raise CommandError(f"OS user {os_user!r} does not exist (PostgreSQL cannot run as root)") from None
    return ["runuser", "-u", os_user, "--"]


def effective_os_user(os_user: str) -> str:
    """Which OS user commands really run as."""
    return os_user if os.geteuid() == 0 else getpass.getuser()


class LocalHost(HostCommands):
    local_socket = True

    def __init__(self, name: str, os_user: str = "postgres") -> None:
        self.name = name
        self.os_user = os_user
        self._prefix = as_user_prefix(os_user)

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None,
            check: bool = True) -> CommandResult:
        full = self._prefix + [str(a) for a in argv]
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout,
                                  cwd="/", check=False)
        except subprocess.TimeoutExpired:
            raise CommandTimeout(f"{self.name}: `{self.describe(argv)}` timed out after {timeout:.0f}s") from None
        except OSError as exc:
            raise CommandError(f"{self.name}: cannot run `{self.describe(argv)}`: {exc.strerror}") from None
        result = CommandResult(proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            tail = redact((proc.stderr or proc.stdout).strip())[-500:]
            raise CommandError(f"{self.name}: `{self.describe(argv)}` exited {proc.returncode}: {tail}")
        return result

    def write_file_from_secret(self, path: str, prefix: str, reference: str, *, timeout: float = 60.0) -> None:
        """The secret is resolved here (a local host has no channel history) and piped through stdin."""
        from ..secrets import resolve

        self.write_file(path, f"{prefix}{resolve(reference)}\n", timeout=timeout)
