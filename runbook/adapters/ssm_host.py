"""HostCommands over AWS SSM Run Command (``AWS-RunShellScript``), as the database OS user.

Polling is bounded (``timeout`` plus a margin for SSM's own delivery), the sleep is
injectable (tests cost nothing), and the command's exit status and output are surfaced.
Command input (stdin) travels base64-encoded inside the script: do not send secrets that
must not appear in SSM's command history - have the host fetch them from Secrets Manager.
"""

from __future__ import annotations

import base64
import shlex
import time
from typing import Callable, Sequence

from ..errors import CommandError
from ..redact import redact
from . import CommandResult, HostCommands

TERMINAL = {"Success", "Failed", "Cancelled", "TimedOut", "Cancelling"}
DELIVERY_MARGIN = 60.0


class SsmHost(HostCommands):
    def __init__(self, name: str, *, instance_id: str, region: str | None = None, os_user: str = "postgres",
                 client=None, sleep: Callable[[float], None] = time.sleep, poll_interval: float = 1.0) -> None:
        self.name = name
        self.instance_id = instance_id
        self.os_user = os_user
        if client is None:
            import boto3

            client = boto3.client("ssm", region_name=region)
        self.client = client
        self.sleep = sleep
        self.poll_interval = poll_interval

    def script(self, argv: Sequence[str], input: str | None) -> str:
        command = shlex.join([str(a) for a in argv])
        runas = f"runuser -u {shlex.quote(self.os_user)} -- "
        if input is None:
            return f"cd / && {runas}{command} </dev/null"
        payload = base64.b64encode(input.encode()).decode()
        return f"cd / && echo {payload} | base64 -d | {runas}{command}"

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None,
            check: bool = True) -> CommandResult:
        what = self.describe(argv)
        try:
            sent = self.client.send_command(
                InstanceIds=[self.instance_id], DocumentName="AWS-RunShellScript",
                Comment=f"tern: {what}"[:100],
                Parameters={"commands": [self.script(argv, input)], "executionTimeout": [str(max(30, int(timeout)))]},
                TimeoutSeconds=max(30, int(DELIVERY_MARGIN)))
        except Exception as exc:  # noqa: BLE001 - botocore errors carry no secret, but redact anyway
            raise CommandError(f"{self.name}: SSM send_command failed: {redact(exc)}") from None
        command_id = sent["Command"]["CommandId"]
        deadline = time.monotonic() + timeout + DELIVERY_MARGIN
        while True:
            try:
                inv = self.client.get_command_invocation(CommandId=command_id, InstanceId=self.instance_id)
            except self.client.exceptions.InvocationDoesNotExist:
                inv = {"Status": "Pending"}
            status = inv.get("Status")
            if status in TERMINAL:
                break
            if time.monotonic() > deadline:
                try:
                    self.client.cancel_command(CommandId=command_id, InstanceIds=[self.instance_id])
                finally:
                    raise CommandError(f"{self.name}: `{what}` timed out after {timeout:.0f}s (SSM status {status})")
            self.sleep(self.poll_interval)
        code = int(inv.get("ResponseCode", -1))
        if status == "TimedOut":
            raise CommandError(f"{self.name}: `{what}` timed out on the host after {timeout:.0f}s")
        result = CommandResult(code, inv.get("StandardOutputContent", ""), inv.get("StandardErrorContent", ""))
        if check and (status != "Success" or code != 0):
            tail = redact((result.stderr or result.stdout).strip())[-500:]
            raise CommandError(f"{self.name}: `{what}` exited {code} ({status}): {tail}")
        return result

    # the host fetches the secret with its instance role; the value never enters the SSM command
    SECRET_SCRIPT = ('umask 077; region=$(printf %s "$1" | cut -d: -f4); '
                     'v=$(aws secretsmanager get-secret-value ${region:+--region "$region"} --secret-id "$1" '
                     '--query SecretString --output text) && if [ -n "$2" ]; then v=$(printf %s "$v" | python3 -c '
                     '"import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$2"); fi && '
                     'printf "%s%s\\n" "$3" "$v" > "$4.tern-tmp" && mv "$4.tern-tmp" "$4"')

    def write_file_from_secret(self, path: str, prefix: str, reference: str, *, timeout: float = 60.0) -> None:
        """An ``aws-secretsmanager:ARN[#key]`` secret is read on the host (SSM keeps command history,
        so the value must not travel in the command; the instance role may read that secret).
        Any other reference is resolved here and piped in, as :meth:`write_file` does."""
        scheme, _, rest = reference.partition(":")
        if scheme == "aws-secretsmanager":
            arn, _, key = rest.partition("#")
            self.run(["sh", "-c", self.SECRET_SCRIPT, "sh", arn, key, prefix, path], timeout=timeout)
            return
        from ..secrets import resolve

        self.write_file(path, f"{prefix}{resolve(reference)}\n", timeout=timeout)
