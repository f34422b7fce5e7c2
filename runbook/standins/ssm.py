"""AWS Systems Manager Run Command, stood in on 127.0.0.1 (the ``AWS-RunShellScript`` document only).

A small HTTP server speaking the AWS JSON 1.1 protocol that boto3's ``ssm`` client uses with
``endpoint_url`` (``X-Amz-Target: AmazonSSM.<Operation>``): SendCommand, GetCommandInvocation,
ListCommandInvocations, ListCommands, CancelCommand. Each instance id is a local "host": the script
runs under ``/bin/sh -c`` as the SSM agent runs it - as root, with the agent's bare environment
(``PATH`` only, no ``HOME``), in a fresh orchestration directory, in its own process group. Started
by an unprivileged developer, it runs as that user with a ``runuser`` shim that can only "switch"
to that same user.

What it does as the service and its agent do (and moto does not):

* an invocation is unknown (``InvocationDoesNotExist``) for ``visible_after`` seconds after SendCommand;
* it is ``Pending`` for ``latency`` seconds, then ``InProgress``, then ``Success``, ``Failed``,
  ``TimedOut`` (StatusDetails ``ExecutionTimedOut``: ``executionTimeout`` expired and the process
  group was killed, ResponseCode 137; the agent reads any exit code 137 so), ``Cancelled``; an
  offline instance ends ``TimedOut`` / ``DeliveryTimedOut`` after ``TimeoutSeconds``;
* GetCommandInvocation returns the first 24,000 characters of stdout and the first 8,000 of
  stderr; ListCommandInvocations with Details 2,500 of both together;
* with OutputS3BucketName the full output goes to S3 under ``<prefix>/<command id>/<instance id>/
  awsrunShellScript/0.awsrunShellScript/stdout`` (and ``stderr``); an empty stream is not uploaded,
  and an upload that fails (no such bucket) does not fail the command, as with the agent. The same
  server answers S3's GetObject, HeadObject and ListObjectsV2 (path-style, REST: ``prefix``,
  ``delimiter`` with CommonPrefixes, ``max-keys`` up to 1,000 a page, ``continuation-token``,
  ``start-after``; each object's LastModified) for the buckets made with :meth:`SsmStandIn.add_bucket`,
  so the adapter reads the output through boto3's ``s3`` client, and a rehearsal's WAL-G stand-in
  (:mod:`runbook.standins.walg`) reads the archive a bucket holds (:meth:`SsmStandIn.put_object`
  writes it, as the bucket's owner does);
* GetCommandInvocation polled faster than ``poll_rate`` calls a second (a bucket of ``poll_burst``)
  answers ``ThrottlingException``;
* a request must be SigV4-signed with the stand-in's access key, for its region and service.

Point boto3 at it with ``endpoint_url`` (:meth:`SsmStandIn.client`), or for code that makes its own
clients, the environment: ``AWS_ENDPOINT_URL_SSM`` and ``AWS_ENDPOINT_URL_S3`` = :attr:`endpoint_url`,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from :meth:`SsmStandIn.client_settings`.

>>> with SsmStandIn(latency=0.05, visible_after=0.0) as ssm:
...     host = ssm.add_instance()
...     client = ssm.client()
...     sent = client.send_command(InstanceIds=[host], DocumentName="AWS-RunShellScript",
...                                Parameters={"commands": ["echo hello"]})
...     ssm.wait(sent["Command"]["CommandId"], host)["StandardOutputContent"]
'hello\\n'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, unquote, urlsplit
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

DOCUMENT = "AWS-RunShellScript"
PLUGIN = "aws:runShellScript"
PLUGIN_DIR = "awsrunShellScript/0.awsrunShellScript"
STDOUT_LIMIT = 24_000            # GetCommandInvocation.StandardOutputContent: "the first 24,000 characters"
STDERR_LIMIT = 8_000             # StandardErrorContent: "the first 8,000 characters"
PLUGIN_OUTPUT_LIMIT = 2_500      # CommandPlugin.Output (ListCommandInvocations, Details)
EXECUTION_TIMEOUT = (1, 172_800, 3_600)    # AWS-RunShellScript executionTimeout: min, max (48 h), default
DELIVERY_TIMEOUT = (30, 2_592_000, 3_600)  # SendCommand TimeoutSeconds: min, max, default
KILLED = 137                     # the agent's exit code for a command it stopped (timeout, cancel)
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TERMINAL = {"Success", "Failed", "TimedOut", "Cancelled"}

RUNUSER_SHIM = """#!/bin/sh
# the stand-in is not root: runuser can only "switch" to the current user
if [ "$1" = "-u" ] && [ "$2" = "$(id -un)" ] && [ "$3" = "--" ]; then shift 3; exec "$@"; fi
echo "runuser: may not be used by non-root users" >&2
exit 1
"""


class ApiError(Exception):
    """An error answer of the service: HTTP ``status`` and ``{"__type": code, "message": ...}``."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass
class Instance:
    instance_id: str
    online: bool = True            # False: commands are never delivered (TimedOut / DeliveryTimedOut)


@dataclass
class Invocation:
    command: dict[str, Any]
    instance_id: str
    script: str
    execution_timeout: int
    working_directory: str | None
    delivery_timeout: int
    sent_at: float                               # monotonic
    status: str = "Pending"
    details: str = "Pending"
    response_code: int = -1
    stdout: str = ""
    stderr: str = ""
    started: float | None = None                 # epoch
    ended: float | None = None
    pid: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def command_id(self) -> str:
        return self.command["CommandId"]


class _TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _plugin_output(stdout: str, stderr: str, capacity: int = PLUGIN_OUTPUT_LIMIT) -> str:
    """stdout and stderr together as CommandPlugin.Output shows them, cut to ``capacity``."""
    title = "\n----------ERROR-------\n" if stderr else ""
    text = f"{stdout}{title}{stderr}"
    return text if len(text) <= capacity else text[:capacity - 23] + "\n---Output truncated---"


class SsmStandIn:
    """The service; instances are added with :meth:`add_instance`. Start and stop it with ``with``."""

    def __init__(self, *, region: str = "us-east-1", latency: float = 1.0, visible_after: float = 0.5,
                 poll_rate: float = 5.0, poll_burst: float = 5.0, access_key: str | None = None,
                 agent_path: tuple[str, ...] = ()) -> None:
        """``agent_path``: directories put first on the agent's PATH - what an instance's user data installs
        under /usr/local/bin (a rehearsal's ``wal-g``), for every command and every process it starts."""
        self.region = region
        self.latency = latency
        self.visible_after = visible_after
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.modified: dict[tuple[str, str], float] = {}  # (bucket, key) -> when it was last written (epoch)
        self.access_key = access_key or "AKIA" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_hex(20)         # any signature is accepted; the key id is checked
        self.instances: dict[str, Instance] = {}
        self.invocations: dict[tuple[str, str], Invocation] = {}
        self.calls: list[tuple[str, str]] = []          # (operation, outcome): what a test can assert on
        self._lock = threading.Lock()
        self._polls = _TokenBucket(poll_rate, poll_burst, time.monotonic)
        self._root = tempfile.mkdtemp(prefix="tern-ssm-standin-")
        self._env = {"PATH": AGENT_PATH}
        if os.geteuid() != 0:
            shim = os.path.join(self._root, "bin")
            os.makedirs(shim)
            with open(os.path.join(shim, "runuser"), "w") as f:
                f.write(RUNUSER_SHIM)
            os.chmod(os.path.join(shim, "runuser"), 0o755)
            self._env["PATH"] = f"{shim}:{AGENT_PATH}"
        if agent_path:
            self._env["PATH"] = ":".join([*map(str, agent_path), self._env["PATH"]])
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "SsmStandIn":
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                standin._handle(self)

            def do_GET(self) -> None:  # noqa: N802
                standin._handle_s3(self)

            def do_HEAD(self) -> None:  # noqa: N802
                standin._handle_s3(self, head=True)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                log.debug("ssm stand-in: " + format, *args)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="ssm-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            running = [inv for inv in self.invocations.values() if inv.status not in TERMINAL]
        for inv in running:
            inv.cancel.set()
        for inv in running:
            inv.done.wait(10)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> "SsmStandIn":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def client_settings(self) -> dict[str, str]:
        """What a boto3 client (or the environment: AWS_ENDPOINT_URL_SSM, AWS_ACCESS_KEY_ID, ...) needs."""
        return {"endpoint_url": self.endpoint_url, "region_name": self.region,
                "aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key}

    def client(self, service: str = "ssm", **config: Any):
        """A boto3 client (``ssm`` or ``s3``) for this stand-in; ``config`` goes to botocore's Config."""
        import boto3
        from botocore.config import Config

        return boto3.client(service, config=Config(**config) if config else None, **self.client_settings())

    def add_bucket(self, name: str) -> str:
        """An S3 bucket the agent can write command output to (on AWS: made by ``pulumi up``)."""
        self.buckets.setdefault(name, {})
        return name

    def put_object(self, bucket: str, key: str, body: bytes) -> None:
        """Write an object, as its owner would (the agent's upload; Heroku's WAL-G into its archive bucket)."""
        with self._lock:
            self.buckets[bucket][key] = bytes(body)
            self.modified[(bucket, key)] = time.time()

    def add_instance(self, instance_id: str | None = None, *, online: bool = True) -> str:
        instance_id = instance_id or "i-" + secrets.token_hex(9)[:17]
        self.instances[instance_id] = Instance(instance_id, online=online)
        return instance_id

    def wait(self, command_id: str, instance_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """For tests: block until the invocation is terminal; its GetCommandInvocation answer."""
        inv = self.invocations[(command_id, instance_id)]
        if not inv.done.wait(timeout):
            raise TimeoutError(f"{command_id} on {instance_id} still {inv.status}")
        with self._lock:
            return self._invocation_answer(inv)

    # -- protocol --------------------------------------------------------------------------
    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        target = req.headers.get("X-Amz-Target", "")
        operation = target.partition(".")[2]
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        try:
            self._authenticate(req.headers.get("Authorization", ""))
            if not target.startswith("AmazonSSM.") or operation not in self.OPERATIONS:
                raise ApiError("UnknownOperationException", f"unknown operation {target!r}")
            if req.headers.get("Content-Type", "").split(";")[0] != "application/x-amz-json-1.1":
                raise ApiError("SerializationException", "expected application/x-amz-json-1.1")
            payload = json.loads(body or b"{}")
            answer = getattr(self, self.OPERATIONS[operation])(payload)
            status, data = 200, answer
            self.calls.append((operation, "ok"))
        except ApiError as exc:
            status, data = exc.status, {"__type": exc.code, "message": exc.message}
            self.calls.append((operation, exc.code))
        except (ValueError, KeyError, TypeError) as exc:
            status, data = 400, {"__type": "ValidationException", "message": str(exc)}
            self.calls.append((operation, "ValidationException"))
        encoded = json.dumps(data).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/x-amz-json-1.1")
        req.send_header("Content-Length", str(len(encoded)))
        req.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        req.end_headers()
        req.wfile.write(encoded)

    _CREDENTIAL = re.compile(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/\d{8}/([^/]+)/([^/]+)/aws4_request,")

    def _authenticate(self, authorization: str, service: str = "ssm") -> None:
        m = self._CREDENTIAL.match(authorization)
        if not m:
            raise ApiError("MissingAuthenticationTokenException", "Request is missing Authentication Token")
        key, region, _ = m.groups()
        if key != self.access_key:
            raise ApiError("UnrecognizedClientException", "The security token included in the request is invalid.")
        if region != self.region:
            raise ApiError("InvalidSignatureException",
                           f"Credential should be scoped to a valid region, not '{region}'.")
        if m.group(3) != service:
            raise ApiError("InvalidSignatureException", f"Credential should be scoped to correct service: '{service}'.")

    OPERATIONS = {"SendCommand": "send_command", "GetCommandInvocation": "get_command_invocation",
                  "ListCommandInvocations": "list_command_invocations", "ListCommands": "list_commands",
                  "CancelCommand": "cancel_command"}

    # -- operations ------------------------------------------------------------------------
    def send_command(self, p: dict[str, Any]) -> dict[str, Any]:
        if p.get("DocumentName") != DOCUMENT:
            raise ApiError("InvalidDocument", f"Document {p.get('DocumentName')!r} is not available in this stand-in")
        if p.get("Targets"):
            raise ApiError("ValidationException", "this stand-in takes InstanceIds, not Targets")
        ids = p.get("InstanceIds") or []
        if not ids:
            raise ApiError("ValidationException", "InstanceIds must name at least one managed node")
        if len(set(ids)) != len(ids):
            raise ApiError("DuplicateInstanceId", "Duplicate instance id")
        unknown = [i for i in ids if i not in self.instances]
        if unknown:
            raise ApiError("InvalidInstanceId", f"Instances {unknown} not in a valid state for account")
        params = p.get("Parameters") or {}
        extra = set(params) - {"commands", "workingDirectory", "executionTimeout"}
        if extra:
            raise ApiError("InvalidParameters", f"document {DOCUMENT} does not support parameters {sorted(extra)}")
        commands = params.get("commands") or []
        if not commands:
            raise ApiError("InvalidParameters", "the commands parameter is required")
        low, high, default = EXECUTION_TIMEOUT
        raw = (params.get("executionTimeout") or [str(default)])
        if len(raw) != 1 or not re.fullmatch(r"[1-9][0-9]*", raw[0]) or not low <= int(raw[0]) <= high:
            raise ApiError("InvalidParameters", f"executionTimeout must be one whole number of seconds from {low} "
                                                f"to {high}, not {raw}")
        workdir = params.get("workingDirectory") or [""]
        if len(workdir) != 1:
            raise ApiError("InvalidParameters", "workingDirectory takes one value")
        low, high, default = DELIVERY_TIMEOUT
        delivery = p.get("TimeoutSeconds", default)
        if not low <= delivery <= high:
            raise ApiError("ValidationException", f"TimeoutSeconds must be from {low} to {high}")
        comment = p.get("Comment", "")
        if len(comment) > 100:
            raise ApiError("ValidationException", "Comment: Member must have length less than or equal to 100")
        bucket = p.get("OutputS3BucketName", "")
        if bucket and not 3 <= len(bucket) <= 63:
            raise ApiError("ValidationException", "OutputS3BucketName must have length 3 to 63")
        now = time.time()
        command = {
            "CommandId": str(uuid.uuid4()), "DocumentName": DOCUMENT, "DocumentVersion": "$DEFAULT",
            "Comment": comment, "ExpiresAfter": now + delivery, "Parameters": params, "InstanceIds": ids,
            "Targets": [], "RequestedDateTime": now, "Status": "Pending", "StatusDetails": "Pending",
            "OutputS3Region": self.region, "OutputS3BucketName": bucket,
            "OutputS3KeyPrefix": p.get("OutputS3KeyPrefix", ""), "MaxConcurrency": "50", "MaxErrors": "0",
            "TargetCount": len(ids), "CompletedCount": 0, "ErrorCount": 0, "DeliveryTimedOutCount": 0,
            "ServiceRole": "", "NotificationConfig": {}, "TimeoutSeconds": delivery,
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False}}
        with self._lock:
            for instance_id in ids:
                inv = Invocation(command, instance_id, "\n".join(commands), int(raw[0]), workdir[0] or None,
                                 delivery, time.monotonic())
                self.invocations[(command["CommandId"], instance_id)] = inv
                threading.Thread(target=self._run, args=(inv,), name=f"ssm-{instance_id}", daemon=True).start()
        return {"Command": self._command_answer(command)}

    def get_command_invocation(self, p: dict[str, Any]) -> dict[str, Any]:
        if not self._polls.take():
            raise ApiError("ThrottlingException", "Rate exceeded")
        if p.get("PluginName") not in (None, PLUGIN):
            raise ApiError("InvalidPluginName", "The plugin name is not valid")
        with self._lock:
            inv = self._visible(p["CommandId"], p["InstanceId"])
            if inv is None:
                raise ApiError("InvocationDoesNotExist", "An error occurred (InvocationDoesNotExist)")
            return self._invocation_answer(inv)

    def list_command_invocations(self, p: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            found = [inv for inv in self._listed(p) if self._visible(inv.command_id, inv.instance_id)]
            page, token = self._page(found, p)
            return {"CommandInvocations": [self._listed_invocation(inv, bool(p.get("Details"))) for inv in page],
                    **({"NextToken": token} if token else {})}

    def list_commands(self, p: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            commands = {inv.command_id: inv.command for inv in self._listed(p)}
            page, token = self._page(list(commands.values()), p)
            return {"Commands": [self._command_answer(c) for c in page], **({"NextToken": token} if token else {})}

    def cancel_command(self, p: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            targets = [inv for (cid, iid), inv in self.invocations.items()
                       if cid == p["CommandId"] and (not p.get("InstanceIds") or iid in p["InstanceIds"])]
            if not targets:
                raise ApiError("InvalidCommandId", "The command id is not valid")
            for inv in targets:
                if inv.status not in TERMINAL:
                    inv.cancel.set()
                    if inv.status == "InProgress":
                        inv.status, inv.details = "Cancelling", "Cancelling"
        return {}

    # -- state -----------------------------------------------------------------------------
    def _visible(self, command_id: str, instance_id: str) -> Invocation | None:
        inv = self.invocations.get((command_id, instance_id))
        if inv is None or time.monotonic() - inv.sent_at < self.visible_after:
            return None
        return inv

    def _listed(self, p: dict[str, Any]) -> list[Invocation]:
        found = [inv for inv in self.invocations.values()
                 if p.get("CommandId") in (None, inv.command_id) and p.get("InstanceId") in (None, inv.instance_id)]
        return sorted(found, key=lambda inv: inv.sent_at, reverse=True)

    @staticmethod
    def _page(items: list, p: dict[str, Any]) -> tuple[list, str | None]:
        start = int(p.get("NextToken") or 0)
        size = int(p.get("MaxResults") or 50)
        rest = items[start:start + size]
        return rest, (str(start + size) if start + size < len(items) else None)

    def _command_answer(self, command: dict[str, Any]) -> dict[str, Any]:
        invs = [inv for (cid, _), inv in self.invocations.items() if cid == command["CommandId"]]
        states = {inv.status for inv in invs}
        if states <= TERMINAL and states:
            status = ("Success" if states == {"Success"} else "Cancelled" if "Cancelled" in states
                      else "TimedOut" if "TimedOut" in states else "Failed")
        else:
            status = "Pending" if states == {"Pending"} else "InProgress"
        return {**command, "Status": status, "StatusDetails": status,
                "CompletedCount": sum(inv.status in TERMINAL for inv in invs),
                "ErrorCount": sum(inv.status in ("Failed", "TimedOut") for inv in invs),
                "DeliveryTimedOutCount": sum(inv.details == "DeliveryTimedOut" for inv in invs)}

    def _urls(self, inv: Invocation) -> tuple[str, str]:
        bucket = inv.command["OutputS3BucketName"]
        if not bucket or inv.status not in TERMINAL:
            return "", ""
        base = f"https://s3.{self.region}.amazonaws.com/{bucket}/{self._key(inv, '')}"
        return base + "stdout", base + "stderr"

    @staticmethod
    def _key(inv: Invocation, stream: str) -> str:
        prefix = inv.command["OutputS3KeyPrefix"].strip("/")
        return "/".join(part for part in (prefix, inv.command_id, inv.instance_id, PLUGIN_DIR) if part) + "/" + stream

    def _invocation_answer(self, inv: Invocation) -> dict[str, Any]:
        out_url, err_url = self._urls(inv)
        done = inv.status in ("Success", "Failed")   # "empty if ... neither Succeeded nor Failed"
        elapsed = ((inv.ended or time.time()) - inv.started) if inv.started else None
        return {"CommandId": inv.command_id, "InstanceId": inv.instance_id, "Comment": inv.command["Comment"],
                "DocumentName": DOCUMENT, "DocumentVersion": "$DEFAULT", "PluginName": PLUGIN,
                "ResponseCode": inv.response_code, "ExecutionStartDateTime": _iso(inv.started),
                "ExecutionElapsedTime": f"PT{elapsed:.3f}S" if elapsed is not None else "",
                "ExecutionEndDateTime": _iso(inv.ended), "Status": inv.status, "StatusDetails": inv.details,
                "StandardOutputContent": inv.stdout[:STDOUT_LIMIT] if done else "",
                "StandardOutputUrl": out_url,
                "StandardErrorContent": inv.stderr[:STDERR_LIMIT] if done else "",
                "StandardErrorUrl": err_url,
                "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False}}

    def _listed_invocation(self, inv: Invocation, details: bool) -> dict[str, Any]:
        out_url, err_url = self._urls(inv)
        answer = {"CommandId": inv.command_id, "InstanceId": inv.instance_id, "InstanceName": "",
                  "Comment": inv.command["Comment"], "DocumentName": DOCUMENT, "DocumentVersion": "$DEFAULT",
                  "RequestedDateTime": inv.command["RequestedDateTime"], "Status": inv.status,
                  "StatusDetails": inv.details, "TraceOutput": "", "StandardOutputUrl": out_url,
                  "StandardErrorUrl": err_url, "CommandPlugins": [], "ServiceRole": "", "NotificationConfig": {},
                  "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False}}
        if details:
            plugin = {"Name": PLUGIN, "Status": inv.status, "StatusDetails": inv.details,
                      "ResponseCode": inv.response_code,
                      "Output": _plugin_output(inv.stdout, inv.stderr) if inv.status in TERMINAL else "",
                      "StandardOutputUrl": out_url, "StandardErrorUrl": err_url, "OutputS3Region": self.region,
                      "OutputS3BucketName": inv.command["OutputS3BucketName"],
                      "OutputS3KeyPrefix": self._key(inv, "").rsplit("/", 2)[0] if inv.command["OutputS3BucketName"]
                      else ""}
            if inv.started:
                plugin["ResponseStartDateTime"] = inv.started
            if inv.ended:
                plugin["ResponseFinishDateTime"] = inv.ended
            answer["CommandPlugins"] = [plugin]
        return answer

    # -- the agent -------------------------------------------------------------------------
    def _run(self, inv: Invocation) -> None:
        try:
            self._deliver_and_run(inv)
        except Exception as exc:  # noqa: BLE001 - an agent error is a Failed invocation, never a dead thread
            log.exception("ssm stand-in: %s on %s", inv.command_id, inv.instance_id)
            self._finish(inv, "Failed", "Failed", 1, "", f"stand-in agent error: {exc}")

    def _deliver_and_run(self, inv: Invocation) -> None:
        if not self.instances[inv.instance_id].online:
            if inv.cancel.wait(inv.delivery_timeout):
                return self._finish(inv, "Cancelled", "Cancelled", -1, "", "")
            return self._finish(inv, "TimedOut", "DeliveryTimedOut", -1, "", "")
        if inv.cancel.wait(self.latency):
            return self._finish(inv, "Cancelled", "Cancelled", -1, "", "")
        orchestration = os.path.join(self._root, inv.instance_id, inv.command_id, PLUGIN_DIR)
        os.makedirs(orchestration, mode=0o700)
        with self._lock:
            inv.status, inv.details, inv.started = "InProgress", "InProgress", time.time()
        out_path, err_path = os.path.join(orchestration, "stdout"), os.path.join(orchestration, "stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(["/bin/sh", "-c", inv.script], cwd=inv.working_directory or orchestration,
                                        env=self._env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        start_new_session=True)
            except OSError as exc:          # e.g. a workingDirectory that does not exist
                return self._finish(inv, "Failed", "Failed", 1, "", f"failed to run commands: {exc.strerror}")
            inv.pid = proc.pid
            deadline = time.monotonic() + inv.execution_timeout
            stopped = None
            while proc.poll() is None:
                if stopped is None and (inv.cancel.is_set() or time.monotonic() >= deadline):
                    stopped = "Cancelled" if inv.cancel.is_set() else "TimedOut"
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        if stopped:
            code = KILLED
        stdout = open(out_path, encoding="utf-8", errors="replace").read()
        stderr = open(err_path, encoding="utf-8", errors="replace").read()
        if stopped == "Cancelled":
            status, details = "Cancelled", "Cancelled"
        elif code == KILLED:                # the agent reads 137 as its own kill: TimedOut
            status, details = "TimedOut", "ExecutionTimedOut"
        else:
            status, details = ("Success", "Success") if code == 0 else ("Failed", "Failed")
        self._upload(inv, stdout, stderr)
        self._finish(inv, status, details, code, stdout, stderr)

    def _upload(self, inv: Invocation, stdout: str, stderr: str) -> None:
        bucket = inv.command["OutputS3BucketName"]
        if not bucket:
            return
        if bucket not in self.buckets:      # the agent logs a failed upload; the command still succeeds
            log.warning("ssm stand-in: output of %s not uploaded: no bucket %s", inv.command_id, bucket)
            return
        for stream, text in (("stdout", stdout), ("stderr", stderr)):
            if text:                        # the agent uploads a stream only when it is not empty
                self.put_object(bucket, self._key(inv, stream), text.encode())

    # -- S3, read side (GetObject, HeadObject, ListObjectsV2; path-style) ------------------------
    def _handle_s3(self, req: BaseHTTPRequestHandler, head: bool = False) -> None:
        url = urlsplit(req.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        operation = "ListObjectsV2" if not key else "HeadObject" if head else "GetObject"
        modified = time.time()
        try:
            self._authenticate(req.headers.get("Authorization", ""), "s3")
            objects = self.buckets.get(bucket)
            if objects is None:
                raise ApiError("NoSuchBucket", "The specified bucket does not exist", 404)
            if key:
                with self._lock:
                    body = objects.get(key)
                    modified = self.modified.get((bucket, key), modified)
                if body is None:
                    raise ApiError("NoSuchKey", "The specified key does not exist.", 404)
                content_type = "application/octet-stream"
            else:
                body, content_type = self._list_objects(bucket, query), "application/xml"
            self.calls.append((operation, "ok"))
            status = 200
        except ApiError as exc:
            self.calls.append((operation, exc.code))
            status, content_type = exc.status, "application/xml"
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{exc.code}</Code>'
                    f"<Message>{escape(exc.message)}</Message><RequestId>{uuid.uuid4()}</RequestId></Error>").encode()
        req.send_response(status)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("ETag", f'"{hashlib.md5(body).hexdigest()}"')
        req.send_header("Last-Modified", formatdate(modified, usegmt=True))
        req.send_header("x-amz-request-id", uuid.uuid4().hex)
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def _list_objects(self, bucket: str, query: dict[str, str]) -> bytes:
        """ListObjectsV2: keys in UTF-8 binary order; with a delimiter, the keys that share the part of
        their name up to it after the prefix roll up into one CommonPrefixes entry (counted once in
        max-keys); a page ends at max-keys (at most 1,000) with a continuation token."""
        if query.get("list-type") != "2":
            raise ApiError("NotImplemented", "this stand-in answers ListObjectsV2 (list-type=2) only", 501)
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        max_keys = max(0, min(1000, int(query.get("max-keys") or 1000)))
        after = query.get("continuation-token") or query.get("start-after") or ""
        with self._lock:
            objects = {k: (len(v), self.modified.get((bucket, k), 0.0), hashlib.md5(v).hexdigest())
                       for k, v in self.buckets[bucket].items() if k.startswith(prefix)}
        entries: list[tuple[str, bool]] = []           # (key or common prefix, is a common prefix)
        for k in sorted(objects, key=lambda k: k.encode()):
            if after and k.encode() <= after.encode():
                continue
            rest = k[len(prefix):]
            if delimiter and delimiter in rest:
                common = prefix + rest[:rest.index(delimiter) + len(delimiter)]
                if entries and entries[-1] == (common, True):
                    continue
                if after and common.encode() <= after.encode():
                    continue
                entries.append((common, True))
            else:
                entries.append((k, False))
        page, truncated = entries[:max_keys], len(entries) > max_keys
        # the token: the last key (or common prefix) of the page; the next page starts after it
        token = page[-1][0] if truncated and page else ""
        contents = "".join(
            # S3 keeps LastModified to the second (listed as .000Z)
            f"<Contents><Key>{escape(k)}</Key><LastModified>{_iso(int(objects[k][1]))}</LastModified>"
            f"<ETag>&quot;{objects[k][2]}&quot;</ETag><Size>{objects[k][0]}</Size>"
            f"<StorageClass>STANDARD</StorageClass></Contents>" for k, common in page if not common)
        prefixes = "".join(f"<CommonPrefixes><Prefix>{escape(k)}</Prefix></CommonPrefixes>"
                           for k, common in page if common)
        return ('<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult '
                'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                + (f"<Delimiter>{escape(delimiter)}</Delimiter>" if delimiter else "")
                + f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                + (f"<NextContinuationToken>{escape(token)}</NextContinuationToken>" if token else "")
                + (f"<ContinuationToken>{escape(query['continuation-token'])}</ContinuationToken>"
                   if query.get("continuation-token") else "")
                + f"{contents}{prefixes}</ListBucketResult>").encode()

    def _finish(self, inv: Invocation, status: str, details: str, code: int, stdout: str, stderr: str) -> None:
        with self._lock:
            inv.status, inv.details, inv.response_code = status, details, code
            inv.stdout, inv.stderr, inv.ended = stdout, stderr, time.time()
        inv.done.set()
