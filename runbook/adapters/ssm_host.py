"""HostCommands over AWS SSM Run Command (``AWS-RunShellScript``), as the database OS user.

What the service documents, and how this adapter meets it:

* Right after SendCommand, GetCommandInvocation may answer ``InvocationDoesNotExist``: that is
  "not yet" for ``visible_within`` seconds, then an error.
* GetCommandInvocation returns only the first 24,000 characters of stdout (8,000 of stderr). An
  output that may have been cut is read in full from the S3 bucket SSM writes every command's
  output to (``commands.output_bucket`` of the outputs contract); without one, a possibly cut stdout
  is refused, never parsed (stderr, only ever shown, is marked as cut).
* Throttling and transient errors are retried with back-off, a bounded number of times
  (:func:`~runbook.adapters.aws_calls.aws_call`); SendCommand only when the service refused it, so
  a command never runs twice. What is left becomes a :class:`CommandError`; a poll that gives up
  cancels the command.
* ``executionTimeout`` is the call's ``timeout`` (SSM allows up to 48 h, so a multi-hour
  ``backup-fetch`` fits); the host's agent kills the command then and SSM says TimedOut, raised as
  :class:`CommandTimeout` (a :class:`~runbook.errors.TimeoutExpired`). The wait here is bounded
  (delivery + execution + a margin); past it the command is cancelled.
* The ``aws`` CLI calls this adapter puts on a host name their region.

The sleep and the clock are injectable (tests cost nothing). Command input (stdin) travels
base64-encoded inside the script, and SSM (and the output bucket) keep what a command printed: do
not send secrets that must not appear in SSM's command history, nor print them - have the host
fetch them from Secrets Manager (:meth:`SsmHost.write_file_from_secret`).
"""

from __future__ import annotations

import base64
import contextlib
import math
import shlex
import time
from typing import Any, Callable, Sequence
from urllib.parse import unquote, urlparse

from ..errors import CommandError, CommandTimeout, RunbookError
from ..polling import polling_loop
from ..redact import redact
from . import CommandResult, HostCommands
from .aws_calls import aws_call, client as aws_client, error_code, refused, transient

TERMINAL = {"Success", "Failed", "Cancelled", "TimedOut"}     # Pending, InProgress, Delayed, Cancelling: not yet
INLINE_LIMIT = {"stdout": 24_000, "stderr": 8_000}           # characters SSM returns inline, from the start
CUT_MARGIN = 64               # an inline output this close to its limit may have been cut (suffixes, bytes)
MAX_EXECUTION_TIMEOUT = 172_800                              # AWS-RunShellScript's executionTimeout: 48 h
DEADLINE_MARGIN = 30.0
PLUGIN_DIR = "awsrunShellScript/0.awsrunShellScript"


class SsmHost(HostCommands):
    def __init__(self, name: str, *, instance_id: str, region: str | None = None, os_user: str = "postgres",
                 output_bucket: str | None = None, output_prefix: str = "tern/ssm", client=None, s3=None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 poll_interval: float = 1.0, delivery_timeout: int = 60, visible_within: float = 30.0,
                 api_attempts: int = 8, api_first_wait: float = 0.5, api_max_wait: float = 10.0) -> None:
        self.name = name
        self.instance_id = instance_id
        self.region = region
        self.os_user = os_user
        self.output_bucket = output_bucket
        self.output_prefix = output_prefix.strip("/")
        self.client = client if client is not None else aws_client("ssm", region)
        self._s3 = s3
        self.sleep = sleep
        self.clock = clock
        self.poll_interval = poll_interval
        self.delivery_timeout = delivery_timeout
        self.visible_within = visible_within
        self._retry = {"attempts": api_attempts, "first_wait": api_first_wait, "max_wait": api_max_wait,
                       "sleep": sleep, "error": CommandError}

    @property
    def s3(self):
        if self._s3 is None:
            self._s3 = aws_client("s3", self.region)
        return self._s3

    def script(self, argv: Sequence[str], input: str | None) -> str:
        command = shlex.join([str(a) for a in argv])
        runas = f"runuser -u {shlex.quote(self.os_user)} -- "
        if input is None:
            return f"cd / && {runas}{command} </dev/null"
        payload = base64.b64encode(input.encode()).decode()
        return f"cd / && echo {payload} | base64 -d | {runas}{command}"

    def execution_timeout(self, timeout: float, what: str) -> int:
        seconds = max(1, math.ceil(timeout))
        if seconds > MAX_EXECUTION_TIMEOUT:
            raise CommandError(f"{self.name}: `{what}` may take {timeout:.0f}s, and SSM runs a command for at most "
                               f"{MAX_EXECUTION_TIMEOUT}s (48 h): lower the timeout setting")
        return seconds

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None,
            check: bool = True) -> CommandResult:
        what = self.describe(argv)
        execution = self.execution_timeout(timeout, what)
        command_id = self._send(what, self.script(argv, input), execution)
        try:
            inv = self._wait(command_id, what, execution)
        except CommandError:
            self._cancel(command_id)
            raise
        return self._result(inv, what, execution, check)

    # -- the conversation with SSM -------------------------------------------------------------
    def _send(self, what: str, script: str, execution: int) -> str:
        request: dict[str, Any] = {
            "InstanceIds": [self.instance_id], "DocumentName": "AWS-RunShellScript",
            "Comment": f"tern: {what}"[:100],
            "Parameters": {"commands": [script], "executionTimeout": [str(execution)]},
            "TimeoutSeconds": max(30, int(self.delivery_timeout))}
        if self.output_bucket:
            request.update(OutputS3BucketName=self.output_bucket, OutputS3KeyPrefix=self.output_prefix)
        sent = aws_call(self.client.send_command, what=f"{self.name}: SSM SendCommand for `{what}`",
                        retry_on=refused, **self._retry, **request)
        return sent["Command"]["CommandId"]

    def _wait(self, command_id: str, what: str, execution: int) -> dict[str, Any]:
        bound = self.delivery_timeout + execution + DEADLINE_MARGIN
        status = "not yet visible"
        for elapsed in polling_loop(bound, self.poll_interval, clock=self.clock, sleep=self.sleep):
            inv = aws_call(self.client.get_command_invocation, what=f"{self.name}: SSM GetCommandInvocation",
                           absent={"InvocationDoesNotExist"}, **self._retry,
                           CommandId=command_id, InstanceId=self.instance_id)
            if inv is None:
                if elapsed > self.visible_within:
                    raise CommandError(f"{self.name}: SSM shows no invocation of command {command_id} on "
                                       f"{self.instance_id} {elapsed:.0f}s after sending `{what}`")
                continue
            status = inv.get("Status")
            if status in TERMINAL:
                return inv
        raise CommandTimeout(f"{self.name}: `{what}` did not finish within {bound:.0f}s (SSM status {status}); "
                             "cancelled")

    def _cancel(self, command_id: str) -> None:
        with contextlib.suppress(RunbookError):
            aws_call(self.client.cancel_command, what=f"{self.name}: SSM CancelCommand", **self._retry,
                     CommandId=command_id, InstanceIds=[self.instance_id])

    def _result(self, inv: dict[str, Any], what: str, execution: int, check: bool) -> CommandResult:
        status = inv.get("Status")
        details = (inv.get("StatusDetails") or "").replace(" ", "")
        code = int(inv.get("ResponseCode", -1))
        if status == "TimedOut" and details == "DeliveryTimedOut":
            raise CommandError(f"{self.name}: `{what}` never reached {self.instance_id} within "
                               f"{self.delivery_timeout}s (SSM DeliveryTimedOut): is its SSM agent online?")
        if status == "TimedOut":
            raise CommandTimeout(f"{self.name}: `{what}` timed out on the host after {execution}s (SSM {details or status}"
                                 f", exit {code}; SSM also reports a command killed with exit 137 so)")
        if status == "Cancelled":
            raise CommandError(f"{self.name}: `{what}` was cancelled (SSM Cancelled)")
        stderr = self._full(inv, "stderr", what)
        if check and (status != "Success" or code != 0):
            tail = redact(stderr.strip() or inv.get("StandardOutputContent", "").strip())[-500:]
            raise CommandError(f"{self.name}: `{what}` exited {code} ({status}): {tail}")
        return CommandResult(code, self._full(inv, "stdout", what), stderr)

    # -- output past SSM's inline limit ----------------------------------------------------------
    def _full(self, inv: dict[str, Any], stream: str, what: str) -> str:
        field = "StandardOutput" if stream == "stdout" else "StandardError"
        inline = inv.get(f"{field}Content") or ""
        limit = INLINE_LIMIT[stream]
        if len(inline.encode()) < limit - CUT_MARGIN:
            return inline
        cut = f"\n[tern: stderr cut by SSM at {limit:,} characters; commands.output_bucket keeps it all]"
        if self.output_bucket:
            try:
                return self._from_s3(inv, stream, inline, inv.get(f"{field}Url") or "", what)
            except CommandError:
                if stream == "stdout":
                    raise
                return inline + cut         # stderr is only ever shown: what SSM returned, marked
        if stream == "stderr":
            return inline + cut
        raise CommandError(f"{self.name}: `{what}` printed {len(inline):,}+ characters, more than SSM returns inline "
                           f"({limit:,}), and the outputs contract names no commands.output_bucket to read all of "
                           "it from: refusing to use a cut output")

    def _from_s3(self, inv: dict[str, Any], stream: str, inline: str, url: str, what: str) -> str:
        key = self._key_from_url(url) or "/".join(
            p for p in (self.output_prefix, inv["CommandId"], self.instance_id, PLUGIN_DIR, stream) if p)
        where = f"s3://{self.output_bucket}/{key}"

        def absent_for_now(exc: BaseException) -> bool:
            return transient(exc) or error_code(exc) in ("NoSuchKey", "404")

        got = aws_call(self.s3.get_object, what=f"{self.name}: reading the full {stream} of `{what}` from {where} "
                       "(the instance role must be allowed to write it)", retry_on=absent_for_now,
                       **{**self._retry, "attempts": min(5, self._retry["attempts"])},
                       Bucket=self.output_bucket, Key=key)
        text = got["Body"].read().decode("utf-8", errors="replace")
        head = inline[:1000]
        if len(text) < len(inline) - CUT_MARGIN or not text.startswith(head):
            raise CommandError(f"{self.name}: {where} does not hold the {stream} SSM returned for `{what}`")
        return text

    def _key_from_url(self, url: str) -> str | None:
        """The object key in a StandardOutputUrl (path-style ``https://s3.<region>.amazonaws.com/<bucket>/<key>``
        or virtual-hosted ``https://<bucket>.s3...amazonaws.com/<key>``)."""
        if not url:
            return None
        path = unquote(urlparse(url).path).lstrip("/")
        bucket = f"{self.output_bucket}/"
        return path[len(bucket):] if path.startswith(bucket) else path or None

    # -- secrets read on the host ----------------------------------------------------------------
    # the host fetches the secret with its instance role; the value never enters the SSM command
    SECRET_SCRIPT = ('umask 077; region=${5:-$(printf %s "$1" | cut -d: -f4)}; [ -n "$region" ] || '
                     '{ echo "no region for secret $1" >&2; exit 2; }; '
                     'v=$(aws secretsmanager get-secret-value --region "$region" --secret-id "$1" '
                     '--query SecretString --output text) && if [ -n "$2" ]; then v=$(printf %s "$v" | python3 -c '
                     '"import json,sys; print(json.load(sys.stdin)[sys.argv[1]])" "$2"); fi && '
                     'printf "%s%s\\n" "$3" "$v" > "$4.tern-tmp" && mv "$4.tern-tmp" "$4"')

    def write_file_from_secret(self, path: str, prefix: str, reference: str, *, timeout: float = 60.0) -> None:
        """An ``aws-secretsmanager:ARN[#key]`` secret is read on the host (SSM keeps command history,
        so the value must not travel in the command; the instance role may read that secret), in the
        ARN's region (else this host's). Any other reference is resolved here and piped in, as
        :meth:`write_file` does."""
        scheme, _, rest = reference.partition(":")
        if scheme == "aws-secretsmanager":
            arn, _, key = rest.partition("#")
            parts = arn.split(":")
            region = (parts[3] if len(parts) > 3 and parts[0] == "arn" else "") or self.region
            if not region:
                raise CommandError(f"{self.name}: no region for secret {arn}: the ARN names none and the "
                                   "command channel has no region")
            self.run(["sh", "-c", self.SECRET_SCRIPT, "sh", arn, key, prefix, path, region], timeout=timeout)
            return
        from ..secrets import resolve

        self.write_file(path, f"{prefix}{resolve(reference)}\n", timeout=timeout)
