"""The small interfaces the runbook acts through. The orchestration never knows which implementation it has.

* :class:`HostCommands` - run a command on a database host (local subprocess, SSM Run Command).
* :class:`AppControl` - the application: config vars, maintenance mode, formation (local app, Heroku).

:func:`host_for` and :func:`app_for` pick the implementation named by the outputs contract.
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..errors import CommandError
from ..redact import redact


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class HostCommands(ABC):
    """Runs commands on one host as its database OS user.

    Contract: ``run`` returns within ``timeout`` seconds or raises :class:`CommandError`;
    with ``check=True`` a non-zero exit raises :class:`CommandError` carrying the
    (redacted) tail of stderr. Implementations never log command input (it may hold secrets).
    """

    name: str
    #: whether tern, where it runs, reaches the server's unix socket as its superuser (the sandbox)
    local_socket: bool = False

    @abstractmethod
    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None,
            check: bool = True) -> CommandResult: ...

    def write_file(self, path: str, content: str, *, timeout: float = 30.0) -> None:
        """Write ``content`` to ``path`` on the host, readable only by the OS user."""
        self.run(["sh", "-c", 'umask 077 && cat > "$1.tern-tmp" && mv "$1.tern-tmp" "$1"', "sh", path],
                 input=content, timeout=timeout)

    def read_file(self, path: str, *, timeout: float = 30.0) -> str | None:
        res = self.run(["sh", "-c", 'if [ -f "$1" ]; then cat "$1"; else exit 3; fi', "sh", path],
                       timeout=timeout, check=False)
        if res.returncode == 3:
            return None
        if res.returncode != 0:
            raise CommandError(f"{self.name}: cannot read {path}: {redact(res.stderr.strip())[-300:]}")
        return res.stdout

    def exists(self, path: str, *, timeout: float = 30.0) -> bool:
        return self.run(["test", "-e", path], timeout=timeout, check=False).returncode == 0

    @abstractmethod
    def write_file_from_secret(self, path: str, prefix: str, reference: str, *, timeout: float = 60.0) -> None:
        """Write ``prefix`` + the secret named by ``reference`` + a newline to ``path`` (mode 0600).

        The secret's value must not be logged nor, where the channel keeps a history of what it
        sends (SSM), travel in the command: an implementation that can fetch it on the host does.
        """

    def read_file_from(self, path: str, offset: int, *, limit: int = 16384,
                       timeout: float = 30.0) -> tuple[str, int]:
        """What was appended to ``path`` since byte ``offset`` (at most ``limit`` bytes, the newest:
        SSM returns at most 24,000 characters of output),
        and the file's size now: the offset to pass next time (``limit=0``: only the size). A file
        shorter than ``offset`` was truncated or rotated: it is read from its start. A missing file
        reads as empty, size 0."""
        script = ('[ -f "$1" ] || exit 3; size=$(($(wc -c < "$1"))); start=$2; [ "$size" -lt "$start" ] && start=0; '
                  'echo "$size"; [ "$3" -eq 0 ] || tail -c +"$((start + 1))" "$1" | tail -c "$3"')
        res = self.run(["sh", "-c", script, "sh", path, str(max(0, int(offset))), str(int(limit))],
                       timeout=timeout, check=False)
        if res.returncode == 3:
            return "", 0
        if res.returncode != 0:
            raise CommandError(f"{self.name}: cannot read {path}: {redact(res.stderr.strip())[-300:]}")
        size, _, text = res.stdout.partition("\n")
        return text, int(size.strip())

    @staticmethod
    def describe(argv: Sequence[str]) -> str:
        return redact(shlex.join(argv))


class AppControl(ABC):
    """The application whose database moves (Heroku semantics).

    Contract: changing config vars restarts the processes (they reconnect to the new
    URL); maintenance mode stops web traffic but leaves processes (and their pooled
    connections) running; ``scale`` sets the formation and returns once the running
    processes match it, or raises after ``timeout``.
    """

    @abstractmethod
    def config_var(self, name: str) -> str | None: ...

    @abstractmethod
    def set_config_vars(self, changes: Mapping[str, str | None]) -> None: ...

    @abstractmethod
    def maintenance(self) -> bool: ...

    @abstractmethod
    def set_maintenance(self, on: bool) -> None: ...

    @abstractmethod
    def formation(self) -> dict[str, int]: ...

    @abstractmethod
    def scale(self, quantities: Mapping[str, int], *, timeout: float) -> dict[str, int]:
        """Set the formation; returns the previous quantities of the types changed (to restore them)."""

    @abstractmethod
    def running(self) -> dict[str, int]:
        """How many processes of each type run now."""

    @abstractmethod
    def smoke_test(self, host: str, port: int, *, since: float, timeout: float) -> str:
        """Prove the app wrote and read through ``host:port`` after ``since``; returns a description."""


def host_for(replica) -> HostCommands:
    """The command channel named by a replica's ``commands`` field."""
    channel = replica.commands
    if channel.kind == "local":
        from .local_host import LocalHost

        return LocalHost(replica.name, os_user=channel.os_user)
    from .ssm_host import SsmHost  # noqa: F401  (arrives with the AWS adapters)

    return SsmHost(replica.name, instance_id=channel.instance_id, region=channel.region, os_user=channel.os_user,
                   output_bucket=channel.output_bucket, output_prefix=channel.output_prefix)


def app_for(app) -> AppControl:
    if app.kind == "local":
        from .local_app import LocalApp

        return LocalApp(app.state_dir)
    from .heroku_app import HerokuApp  # noqa: F401  (arrives with the Heroku adapter)

    return HerokuApp(app.name, api_key_ref=app.api_key)
