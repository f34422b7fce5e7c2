"""AWS DMS task control and observation (the replication adapter for hop 2 when DMS is used).

Follows the DMS API reference:

* **Starting** (``StartReplicationTask``): ``start-replication`` is the only valid type for a
  task's first run (any other type then causes data errors); ``resume-processing`` continues
  from the last stop position; ``reload-target`` loads every table again (only when asked).
  :meth:`DmsTask.start` picks the type from the task's history, so callers say *what* they
  want (continue, or reload), never which API type.
* **Failing fast**: a task ``failed`` or ``failed-move``, or ``stopped`` with a ``StopReason``
  naming ``FATAL_ERROR``, ``STOPPED_DUE_TO_LOW_MEMORY`` or ``STOPPED_DUE_TO_LOW_DISK``, raises
  at once with DMS's reason instead of waiting out a timeout.
* **Validation** is read per table from ``DescribeTableStatistics`` (``ValidationState``,
  ``ValidationFailedRecords``, ``ValidationSuspendedRecords``, ``TableState``).
* **Following the leader**: :meth:`DmsTask.follow_leader` reads the source endpoint
  (``DescribeEndpoints``): one that authenticates through Secrets Manager takes host and port
  from that secret (see ``infra/dms.py``), which is rewritten; any other is changed with
  ``ModifyEndpoint`` (``ServerName``, ``Port``). Either way ``TestConnection`` proves the new
  source before the task runs again.
* **Full load, then CDC**: :meth:`DmsTask.wait_full_load` waits for ``running`` with
  ``FullLoadProgressPercent`` 100 and no table loading, queued or errored; a task that stops
  instead (``STOPPED_AFTER_FULL_LOAD``, a fatal reason) fails at once.
* **Lag**: ``CDCLatencySource`` / ``CDCLatencyTarget`` from CloudWatch; no datapoint is
  ``None`` (unknown), never 0.

Every wait is bounded (:mod:`runbook.polling`), its clock and sleep injectable. AWS errors
become :class:`RunbookError` subclasses with one clear line. Nothing here logs or raises a
credential: the password read from the secret is registered for redaction and written back
unchanged, never printed.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from botocore.exceptions import BotoCoreError, ClientError

from ..errors import ConfigError, PreflightError, RunbookError, VerificationError
from ..polling import wait_until
from ..redact import redact, register_secret

START_TYPES = ("start-replication", "resume-processing", "reload-target")

#: Status values of a task that is moving between states: wait them out before acting.
TRANSITIONAL = frozenset({"creating", "modifying", "moving", "starting", "stopping", "testing", "deleting"})
#: Status values that end any wait: the task cannot get anywhere from them by itself.
FAILED_STATUSES = frozenset({"failed", "failed-move"})
#: ``StopReason`` markers of a stop that is a failure, not a request (DMS: "Stop Reason FATAL_ERROR", ...).
FATAL_STOP_MARKERS = ("FATAL_ERROR", "LOW_MEMORY", "LOW_DISK")
#: ``ValidationState`` values that mean a table failed validation.
VALIDATION_FAILED_STATES = frozenset({"Mismatched records", "Suspended records", "Table error", "Error"})
#: ``TableState`` values that mean the table itself was not migrated.
TABLE_FAILED_STATES = frozenset({"Table error", "Table cancelled", "Table does not exist"})


@dataclass
class TaskStatus:
    status: str
    full_load_percent: int | None
    tables_loaded: int | None
    tables_errored: int | None
    stop_reason: str | None
    last_failure: str | None
    start_date: Any = None          # ReplicationTaskStartDate: None until the task first ran
    full_load_start: Any = None     # ReplicationTaskStats.FullLoadStartDate
    stop_date: Any = None           # ReplicationTaskStats.StopDate (of the last stop)
    tables_loading: int | None = None
    tables_queued: int | None = None
    full_load_finish: Any = None    # ReplicationTaskStats.FullLoadFinishDate

    @property
    def full_load_done(self) -> bool:
        """Running, the full load at 100 % with no table loading, queued or errored: CDC carries on."""
        return (self.status == "running" and self.full_load_percent == 100 and not self.tables_loading
                and not self.tables_queued and not self.tables_errored)

    @property
    def never_started(self) -> bool:
        """The task has never run: its only valid start type is ``start-replication``."""
        return self.status == "ready" and self.start_date is None and self.full_load_start is None

    @property
    def fatal_stop(self) -> bool:
        return self.status == "stopped" and any(m in (self.stop_reason or "") for m in FATAL_STOP_MARKERS)

    @property
    def failure(self) -> str | None:
        """Why the task is in a failed state (status, stop reason, DMS's last failure), or None."""
        if self.status in FAILED_STATUSES or self.fatal_stop:
            parts = [f"status {self.status}"]
            if self.stop_reason:
                parts.append(self.stop_reason)
            if self.last_failure:
                parts.append(self.last_failure)
            return redact("; ".join(parts))
        return None


@dataclass(frozen=True)
class TableValidation:
    """One table's validation, from ``DescribeTableStatistics``."""

    table: str                      # schema.table
    state: str                      # ValidationState ("Validated", "Mismatched records", ...)
    table_state: str | None         # TableState ("Table completed", "Table error", ...)
    failed_records: int
    suspended_records: int
    pending_records: int
    details: str | None = None      # ValidationStateDetails

    @property
    def problem(self) -> str | None:
        """Why this table fails validation, or None (pending / not enabled / no PK are not failures)."""
        why = []
        if self.failed_records:
            why.append(f"{self.failed_records} failed records")
        if self.suspended_records:
            why.append(f"{self.suspended_records} suspended records")
        if self.state in VALIDATION_FAILED_STATES:
            why.append(f"validation state {self.state!r}")
        if self.table_state in TABLE_FAILED_STATES:
            why.append(f"table state {self.table_state!r}")
        return ", ".join(why) or None

    @property
    def validated(self) -> bool:
        return self.problem is None and self.state == "Validated"


def secret_arn_of(ref: str) -> str:
    """The secret ARN of an ``aws-secretsmanager:ARN[#key]`` credential reference."""
    scheme, _, rest = str(ref).partition(":")
    if scheme != "aws-secretsmanager" or not rest:
        raise ConfigError(f"the DMS source secret must be an aws-secretsmanager:ARN#key reference, not {scheme}:...")
    return rest.partition("#")[0]


def _client_error(exc: Exception, what: str) -> RunbookError:
    """An AWS error as the runbook's error: one line, redacted; a missing resource is bad input."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code, message = err.get("Code", "Error"), err.get("Message", "")
        cls = ConfigError if code in ("ResourceNotFoundFault", "ResourceNotFoundException") else RunbookError
        return cls(redact(f"{what}: {code}: {message}".rstrip(": ")), code=code)
    return ConfigError(redact(f"{what}: {exc}"))


class DmsTask:
    def __init__(self, task_arn: str, *, region: str | None = None, dms=None, cloudwatch=None,
                 secretsmanager=None, sleep: Callable[[float], None] = time.sleep, poll_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, source_secret: str | None = None,
                 replication_instance_arn: str | None = None, source_endpoint_arn: str | None = None) -> None:
        """``source_secret``: the replication secret's reference (``aws-secretsmanager:ARN#key``) or ARN;
        the instance and source endpoint ARNs default to the task's own."""
        import boto3

        self.task_arn = task_arn
        self.region = region
        self.dms = dms or boto3.client("dms", region_name=region)
        self._cloudwatch = cloudwatch
        self._secretsmanager = secretsmanager
        self.sleep = sleep
        self.clock = clock
        self.poll_interval = poll_interval
        self.source_secret = source_secret
        self.replication_instance_arn = replication_instance_arn
        self.source_endpoint_arn = source_endpoint_arn
        self._resumed_from: Any = None    # StopDate of the stop the last start() resumed from

    @classmethod
    def from_outputs(cls, outputs, **kwargs) -> "DmsTask":
        """The stack's DMS task, from the outputs contract (:class:`runbook.contract.Outputs`)."""
        if outputs.dms is None:
            raise ConfigError(f"stack {outputs.stack} has no DMS task (outputs: dms is null)")
        d = outputs.dms
        return cls(d.replication_task_arn, region=d.region, source_secret=outputs.credentials.replication_password,
                   replication_instance_arn=d.replication_instance_arn, source_endpoint_arn=d.source_endpoint_arn,
                   **kwargs)

    @property
    def cloudwatch(self):
        if self._cloudwatch is None:
            import boto3

            self._cloudwatch = boto3.client("cloudwatch", region_name=self.region)
        return self._cloudwatch

    @property
    def secretsmanager(self):
        if self._secretsmanager is None:
            import boto3

            self._secretsmanager = boto3.client("secretsmanager", region_name=self.region)
        return self._secretsmanager

    def _call(self, client, op: str, what: str, **kwargs) -> dict[str, Any]:
        try:
            return getattr(client, op)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise _client_error(exc, what) from None

    # -- the task -------------------------------------------------------------------------------

    def _describe(self, *, with_settings: bool = False) -> dict[str, Any]:
        try:
            tasks = self.dms.describe_replication_tasks(
                Filters=[{"Name": "replication-task-arn", "Values": [self.task_arn]}],
                WithoutSettings=not with_settings)["ReplicationTasks"]
        except ClientError as exc:
            # DMS answers a filter that matches nothing with ResourceNotFoundFault (moto: an empty list)
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundFault":
                raise _client_error(exc, f"describing DMS task {self.task_arn}") from None
            tasks = []
        except BotoCoreError as exc:
            raise _client_error(exc, f"describing DMS task {self.task_arn}") from None
        if not tasks:
            raise ConfigError(f"DMS task {self.task_arn} not found (ResourceNotFoundFault): check the outputs' "
                              "dms.replication_task_arn and region")
        return tasks[0]

    def status(self) -> TaskStatus:
        t = self._describe()
        stats = t.get("ReplicationTaskStats") or {}
        return TaskStatus(t["Status"], stats.get("FullLoadProgressPercent"), stats.get("TablesLoaded"),
                          stats.get("TablesErrored"), t.get("StopReason"), t.get("LastFailureMessage"),
                          start_date=t.get("ReplicationTaskStartDate"), full_load_start=stats.get("FullLoadStartDate"),
                          stop_date=stats.get("StopDate"), tables_loading=stats.get("TablesLoading"),
                          tables_queued=stats.get("TablesQueued"), full_load_finish=stats.get("FullLoadFinishDate"))

    def definition(self) -> dict[str, Any]:
        """What the task is declared to do: ``migration_type``, ``settings`` (``ReplicationTaskSettings``,
        parsed), ``mappings`` (``TableMappings``, parsed), ``source_endpoint_arn``, ``target_endpoint_arn``."""
        t = self._describe(with_settings=True)

        def parsed(key: str) -> dict[str, Any]:
            try:
                value = json.loads(t.get(key) or "{}")
            except ValueError:
                raise ConfigError(f"DMS task {self.task_arn}: its {key} is not JSON") from None
            return value if isinstance(value, dict) else {}

        return {"migration_type": t.get("MigrationType"), "settings": parsed("ReplicationTaskSettings"),
                "mappings": parsed("TableMappings"), "source_endpoint_arn": t.get("SourceEndpointArn"),
                "target_endpoint_arn": t.get("TargetEndpointArn")}

    def _settled(self, timeout: float) -> TaskStatus:
        """The task's status once it is not moving between states (bounded)."""
        seen: list[TaskStatus] = []

        def probe() -> TaskStatus | None:
            st = self.status()
            seen[:] = [st]
            if st.status in FAILED_STATUSES:
                return st
            return None if st.status in TRANSITIONAL else st

        return wait_until(probe, timeout=timeout, interval=self.poll_interval, clock=self.clock, sleep=self.sleep,
                          what=f"DMS task {self.task_arn} to settle", last=lambda: f"still {seen[0].status}")

    def start(self, start_type: str | None = None, *, recover: bool = False, settle_timeout: float = 300.0) -> str | None:
        """Start the task the way the API allows; return the start type used, None when it already runs.

        ``start_type``: None, ``start-replication`` or ``resume-processing`` mean *continue*: a
        task that never ran gets ``start-replication``, any other ``resume-processing``.
        ``reload-target`` means a full reload (``start-replication`` on a first run, which loads
        everything anyway); it refuses a running task (stop it first).

        A task ``failed`` or stopped with a fatal reason is refused, with DMS's reason, unless
        ``recover`` says its cause was dealt with (e.g. :meth:`follow_leader` repointed the
        source); ``failed-move`` is always refused. Transitional states (creating, stopping,
        ...) are waited out for at most ``settle_timeout`` seconds.
        """
        if start_type is not None and start_type not in START_TYPES:
            raise ConfigError(f"unknown DMS start type {start_type!r}; one of {', '.join(START_TYPES)}")
        reload = start_type == "reload-target"
        st = self.status()
        if st.status in ("running", "starting"):
            if reload:
                raise PreflightError(f"DMS task is {st.status}: stop it before a full reload (reload-target)")
            return None  # already running: nothing to do
        if st.status in TRANSITIONAL:
            st = self._settled(settle_timeout)
            if st.status in ("running", "starting") and not reload:
                return None
        if st.status == "failed-move" or (st.failure and not recover):
            raise RunbookError(f"DMS task cannot be started: {st.failure}"
                               + ("" if st.status == "failed-move" else
                                  "; fix the cause, then start again with recover=True"))
        if st.status not in ("ready", "stopped", "failed"):
            raise PreflightError(f"DMS task is {st.status}: it cannot be started from there")
        if st.never_started:
            chosen = "start-replication"
        else:
            chosen = "reload-target" if reload else "resume-processing"
        self._resumed_from = st.stop_date
        self._call(self.dms, "start_replication_task", f"starting DMS task ({chosen})",
                   ReplicationTaskArn=self.task_arn, StartReplicationTaskType=chosen)
        return chosen

    def resume(self, *, recover: bool = False) -> str | None:
        """Continue replicating (``resume-processing``; ``start-replication`` if the task never ran)."""
        return self.start("resume-processing", recover=recover)

    def reload(self, *, recover: bool = False) -> str | None:
        """Load every table again, then continue with CDC (``reload-target``): only when asked."""
        return self.start("reload-target", recover=recover)

    def ensure_running(self, *, timeout: float, start_type: str | None = None, recover: bool = False) -> TaskStatus:
        """Start (as :meth:`start`) and wait, bounded, for ``running``; fail fast on a failure."""
        self.start(start_type, recover=recover, settle_timeout=timeout)
        return self.wait_for({"running"}, timeout=timeout)

    def stop(self, *, timeout: float | None = None) -> None:
        """Stop the task (a no-op unless it runs); with ``timeout``, wait (bounded) until it is stopped."""
        st = self.status()
        if st.status in ("running", "starting"):
            self._call(self.dms, "stop_replication_task", "stopping DMS task", ReplicationTaskArn=self.task_arn)
        if timeout is not None and st.status in ("running", "starting", "stopping"):
            self.wait_for({"stopped"}, timeout=timeout)

    def wait_for(self, wanted: set[str], *, timeout: float, failed: set[str] = FAILED_STATUSES) -> TaskStatus:
        """Poll until the task's status is one of ``wanted`` (bounded by ``timeout``).

        Fails fast, with DMS's reason, on a status in ``failed`` (``failed``, ``failed-move``) or,
        unless ``stopped`` is wanted, on a stop with a fatal ``StopReason`` (the stop this
        adapter last resumed from, still shown until DMS moves on, does not count).
        """
        failed = set(failed) | {"failed-move"}
        seen: list[TaskStatus] = []

        def probe() -> TaskStatus | None:
            st = self.status()
            seen[:] = [st]
            if st.status in wanted:
                return st
            if st.status in failed:
                raise RunbookError(f"DMS task failed: {st.failure or st.status}")
            stale = self._resumed_from is not None and st.stop_date == self._resumed_from
            if st.fatal_stop and not stale:
                raise RunbookError(f"DMS task stopped on an error: {st.failure}")
            return None

        return wait_until(probe, timeout=timeout, interval=self.poll_interval, clock=self.clock, sleep=self.sleep,
                          what=f"DMS task {self.task_arn} (wanted {sorted(wanted)})",
                          last=lambda: f"still {seen[0].status}" if seen else "never described")

    def wait_full_load(self, *, timeout: float, progress: Callable[[str], None] | None = None) -> TaskStatus:
        """Poll until the full load is complete and the task runs on with CDC (:attr:`TaskStatus.full_load_done`).

        Fails fast, with DMS's reason, on ``failed`` / ``failed-move``, on a fatal stop (not the one the
        last :meth:`start` resumed from), and on any other stop: a task stopped after its full load
        (``STOPPED_AFTER_FULL_LOAD`` ...) does not replicate changes. Bounded by ``timeout``."""
        seen: list[TaskStatus] = []

        def probe() -> TaskStatus | None:
            st = self.status()
            seen[:] = [st]
            if st.status in FAILED_STATUSES:
                raise RunbookError(f"DMS task failed during its full load: {st.failure or st.status}")
            stale = self._resumed_from is not None and st.stop_date == self._resumed_from
            if st.status == "stopped" and not stale:
                if st.fatal_stop:
                    raise RunbookError(f"DMS task stopped on an error during its full load: {st.failure}")
                raise RunbookError(f"DMS task stopped ({st.stop_reason or 'no reason given'}) instead of replicating "
                                   "changes after its full load: it must be a full-load-and-cdc task that keeps running")
            if st.tables_errored:
                raise RunbookError(f"DMS task: {st.tables_errored} tables errored during the full load "
                                   "(DescribeTableStatistics names them; see the task's CloudWatch log)")
            if progress and st.status == "running":
                progress(f"DMS full load {st.full_load_percent or 0}%: {st.tables_loaded or 0} tables loaded, "
                         f"{st.tables_loading or 0} loading, {st.tables_queued or 0} queued")
            return st if st.full_load_done else None

        return wait_until(probe, timeout=timeout, interval=self.poll_interval, clock=self.clock, sleep=self.sleep,
                          what=f"DMS task {self.task_arn} to finish its full load and replicate changes",
                          last=lambda: (f"still {seen[0].status}, full load {seen[0].full_load_percent}%"
                                        if seen else "never described"))

    # -- validation -----------------------------------------------------------------------------

    def table_statistics(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"ReplicationTaskArn": self.task_arn}
        while True:
            page = self._call(self.dms, "describe_table_statistics", "reading DMS table statistics", **kwargs)
            out += page.get("TableStatistics", [])
            if not page.get("Marker"):
                return out
            kwargs["Marker"] = page["Marker"]

    def table_states(self) -> dict[str, str]:
        """Per table (schema.table): DMS's ``TableState`` (``Before load``, ``Full load``, ``Table completed``,
        ``Table error`` ...)."""
        return {f"{t['SchemaName']}.{t['TableName']}": t.get("TableState") or "unknown"
                for t in self.table_statistics()}

    def validation_state(self) -> dict[str, str]:
        """Per table (schema.table): DMS's validation state; anything but Validated is not done."""
        return {f"{t['SchemaName']}.{t['TableName']}": t.get("ValidationState", "Not enabled")
                for t in self.table_statistics()}

    def validation(self, *, check: bool = True, require_validated: bool = False) -> dict[str, TableValidation]:
        """Per table (schema.table): its validation from DescribeTableStatistics.

        With ``check``, raise :class:`VerificationError` (naming each table and its counts) if
        any table has failed or suspended records, or a failed validation or table state, or if
        DMS reports no table at all; with ``require_validated`` also if any table is not
        ``Validated`` yet (pending, not enabled, no primary key). The result is also in the
        error's ``context["tables"]``.
        """
        result: dict[str, TableValidation] = {}
        for t in self.table_statistics():
            name = f"{t['SchemaName']}.{t['TableName']}"
            result[name] = TableValidation(
                table=name, state=t.get("ValidationState") or "Not enabled", table_state=t.get("TableState"),
                failed_records=int(t.get("ValidationFailedRecords") or 0),
                suspended_records=int(t.get("ValidationSuspendedRecords") or 0),
                pending_records=int(t.get("ValidationPendingRecords") or 0),
                details=t.get("ValidationStateDetails"))
        if not check:
            return result
        if not result:
            raise VerificationError("DMS reports no table statistics: nothing was validated", tables=result)
        bad = {n: v.problem for n, v in result.items() if v.problem}
        if require_validated:
            bad.update({n: f"validation state {v.state!r}" for n, v in result.items()
                        if n not in bad and not v.validated})
        if bad:
            lines = [f"  {n}: {why}" for n, why in sorted(bad.items())]
            raise VerificationError(f"DMS validation failed for {len(bad)} of {len(result)} tables:\n"
                                    + "\n".join(lines), tables=result)
        return result

    # -- following the leader -------------------------------------------------------------------

    def endpoint(self, endpoint_arn: str) -> dict[str, Any]:
        """One endpoint as ``DescribeEndpoints`` shows it; a missing one is a clear :class:`ConfigError`."""
        try:
            found = self.dms.describe_endpoints(
                Filters=[{"Name": "endpoint-arn", "Values": [endpoint_arn]}])["Endpoints"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundFault":
                raise _client_error(exc, f"describing DMS endpoint {endpoint_arn}") from None
            found = []
        except BotoCoreError as exc:
            raise _client_error(exc, f"describing DMS endpoint {endpoint_arn}") from None
        if not found:
            raise ConfigError(f"DMS endpoint {endpoint_arn} not found (ResourceNotFoundFault): check the outputs' "
                              "dms.source_endpoint_arn / dms.target_endpoint_arn and region")
        return found[0]

    @staticmethod
    def _endpoint_secret(endpoint: dict[str, Any]) -> str | None:
        """The Secrets Manager secret a PostgreSQL endpoint takes its connection details from, if any."""
        return (endpoint.get("PostgreSQLSettings") or {}).get("SecretsManagerSecretId") or None

    def _read_secret(self, secret_id: str) -> dict[str, Any]:
        raw = self._call(self.secretsmanager, "get_secret_value", "reading the DMS source secret",
                         SecretId=secret_id).get("SecretString")
        try:
            current = json.loads(raw or "")
        except ValueError:
            current = None
        if not isinstance(current, dict):
            raise ConfigError("the DMS source secret is not a JSON object (username, password, host, port)")
        register_secret(str(current.get("password") or ""))
        return current

    def _source_endpoint_arn(self, task: dict[str, Any]) -> str:
        return self.source_endpoint_arn or task["SourceEndpointArn"]

    def source_address(self) -> tuple[str | None, int | None]:
        """Where the source endpoint points now: ``(host, port)`` from its secret (Secrets Manager) or from
        its ``ServerName`` / ``Port``; ``None`` for what it does not say."""
        endpoint = self.endpoint(self._source_endpoint_arn(self._describe()))
        secret_id = self._endpoint_secret(endpoint)
        if secret_id:
            current = self._read_secret(secret_id)
            host, port = current.get("host"), current.get("port")
        else:
            host, port = endpoint.get("ServerName"), endpoint.get("Port")
        return (str(host) if host else None), (int(port) if port not in (None, "") else None)

    def follow_leader(self, host: str, port: int, *, timeout: float = 300.0) -> dict[str, Any]:
        """Point the source endpoint at the EC2 leader ``host:port``, and prove DMS reaches it.

        The task must not run. The endpoint is read first (``DescribeEndpoints``): when it takes its
        connection details from a Secrets Manager secret (``PostgreSQLSettings.SecretsManagerSecretId``,
        as ``infra/dms.py`` declares it: DMS then takes host and port *from the secret*), that secret
        keeps its username, password and every other key and only ``host`` and ``port`` change;
        otherwise the endpoint itself is changed (``ModifyEndpoint`` ``ServerName``, ``Port``).
        Nothing is rewritten when it already names the leader. Then ``TestConnection`` from the
        replication instance to the source endpoint, waited (bounded) until ``successful``; ``failed``
        raises with DMS's ``LastFailureMessage``. Returns ``{"host", "port", "changed", "connection",
        "via"}`` (``via``: ``secret`` or ``endpoint``).
        """
        if not host or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ConfigError(f"follow_leader needs a host and a port in 1..65535, got {host!r}:{port!r}")
        task = self._describe()
        if task["Status"] not in ("stopped", "ready", "failed"):
            raise PreflightError(f"DMS task is {task['Status']}: stop it before repointing its source endpoint")
        instance_arn = self.replication_instance_arn or task["ReplicationInstanceArn"]
        endpoint_arn = self._source_endpoint_arn(task)
        endpoint = self.endpoint(endpoint_arn)
        secret_id = self._endpoint_secret(endpoint)
        if secret_id:
            current = self._read_secret(secret_id)
            missing = [k for k in ("username", "password") if not current.get(k)]
            if missing:
                raise ConfigError(f"the DMS source secret lacks {', '.join(missing)}")
            changed = current.get("host") != host or str(current.get("port")) != str(port)
            if changed:
                self._call(self.secretsmanager, "put_secret_value", "updating the DMS source secret",
                           SecretId=secret_id, SecretString=json.dumps({**current, "host": host, "port": port}))
            via = "secret"
        else:
            changed = endpoint.get("ServerName") != host or str(endpoint.get("Port")) != str(port)
            if changed:
                self._call(self.dms, "modify_endpoint", "repointing the DMS source endpoint",
                           EndpointArn=endpoint_arn, ServerName=host, Port=port)
            via = "endpoint"
        self._test_connection(instance_arn, endpoint_arn, f"{host}:{port}", timeout)
        return {"host": host, "port": port, "changed": changed, "connection": "successful", "via": via}

    def _test_connection(self, instance_arn: str, endpoint_arn: str, target: str, timeout: float) -> None:
        conn = self._call(self.dms, "test_connection", "testing the DMS source connection",
                          ReplicationInstanceArn=instance_arn, EndpointArn=endpoint_arn).get("Connection") or {}
        seen: list[dict[str, Any]] = [conn]

        def probe() -> bool:
            conns = self._call(self.dms, "describe_connections", "reading the DMS connection test",
                               Filters=[{"Name": "endpoint-arn", "Values": [endpoint_arn]},
                                        {"Name": "replication-instance-arn", "Values": [instance_arn]}]
                               ).get("Connections") or []
            mine = [c for c in conns if c.get("EndpointArn") == endpoint_arn
                    and c.get("ReplicationInstanceArn") == instance_arn] or conns
            c = mine[0] if mine else {}
            seen[:] = [c]
            status = c.get("Status")
            if status == "failed":
                raise RunbookError(redact(f"DMS cannot connect to the new source {target}: "
                                          f"{c.get('LastFailureMessage') or 'connection test failed'}"))
            return status == "successful"

        wait_until(probe, timeout=timeout, interval=self.poll_interval, clock=self.clock, sleep=self.sleep,
                   what=f"DMS's connection test to the source {target}",
                   last=lambda: f"status {seen[0].get('Status') or 'unknown'}")

    # -- lag ------------------------------------------------------------------------------------

    def cdc_latency(self, *, minutes: int = 5) -> dict[str, float | None]:
        """CDCLatencySource / CDCLatencyTarget (seconds): the latest datapoint of the last ``minutes``.

        No datapoint (no CDC yet, task stopped, metric not published) is None: unknown, never 0.
        """
        task = self._describe()
        instance_arn = task["ReplicationInstanceArn"]
        try:
            instances = self.dms.describe_replication_instances(
                Filters=[{"Name": "replication-instance-arn", "Values": [instance_arn]}])["ReplicationInstances"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundFault":
                raise _client_error(exc, "describing the DMS replication instance") from None
            instances = []
        except BotoCoreError as exc:
            raise _client_error(exc, "describing the DMS replication instance") from None
        instance_id = instances[0]["ReplicationInstanceIdentifier"] if instances else instance_arn.rsplit(":", 1)[-1]
        task_resource = self.task_arn.rsplit(":", 1)[-1]
        now = dt.datetime.now(dt.timezone.utc)
        out: dict[str, float | None] = {}
        for metric in ("CDCLatencySource", "CDCLatencyTarget"):
            points = self._call(
                self.cloudwatch, "get_metric_statistics", f"reading {metric} from CloudWatch",
                Namespace="AWS/DMS", MetricName=metric, StartTime=now - dt.timedelta(minutes=minutes), EndTime=now,
                Period=60, Statistics=["Maximum"],
                Dimensions=[{"Name": "ReplicationInstanceIdentifier", "Value": instance_id},
                            {"Name": "ReplicationTaskIdentifier", "Value": task_resource}]).get("Datapoints") or []
            points = [p for p in points if p.get("Maximum") is not None and p.get("Timestamp") is not None]
            out[metric] = float(max(points, key=lambda p: p["Timestamp"])["Maximum"]) if points else None
        return out

