"""AWS DMS task control and observation (the replication adapter for hop 2 when DMS is used).

Every wait is bounded and its sleep injectable. Nothing here holds a credential: the
endpoints take theirs from Secrets Manager (see ``infra/dms.py``).
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import RunbookError, TimeoutExpired

START_TYPES = ("start-replication", "resume-processing", "reload-target")


@dataclass
class TaskStatus:
    status: str
    full_load_percent: int | None
    tables_loaded: int | None
    tables_errored: int | None
    stop_reason: str | None
    last_failure: str | None


class DmsTask:
    def __init__(self, task_arn: str, *, region: str | None = None, dms=None, cloudwatch=None,
                 sleep: Callable[[float], None] = time.sleep, poll_interval: float = 5.0) -> None:
        import boto3

        self.task_arn = task_arn
        self.region = region
        self.dms = dms or boto3.client("dms", region_name=region)
        self._cloudwatch = cloudwatch
        self.sleep = sleep
        self.poll_interval = poll_interval

    @property
    def cloudwatch(self):
        if self._cloudwatch is None:
            import boto3

            self._cloudwatch = boto3.client("cloudwatch", region_name=self.region)
        return self._cloudwatch

    def _describe(self) -> dict[str, Any]:
        tasks = self.dms.describe_replication_tasks(
            Filters=[{"Name": "replication-task-arn", "Values": [self.task_arn]}])["ReplicationTasks"]
        if not tasks:
            raise RunbookError(f"DMS task {self.task_arn} not found")
        return tasks[0]

    def status(self) -> TaskStatus:
        t = self._describe()
        stats = t.get("ReplicationTaskStats") or {}
        return TaskStatus(t["Status"], stats.get("FullLoadProgressPercent"), stats.get("TablesLoaded"),
                          stats.get("TablesErrored"), t.get("StopReason"), t.get("LastFailureMessage"))

    def start(self, start_type: str = "start-replication") -> None:
        if start_type not in START_TYPES:
            raise RunbookError(f"unknown DMS start type {start_type!r}; one of {', '.join(START_TYPES)}")
        current = self.status().status
        if current in ("running", "starting"):
            return  # already done
        self.dms.start_replication_task(ReplicationTaskArn=self.task_arn, StartReplicationTaskType=start_type)

    def resume(self) -> None:
        self.start("resume-processing")

    def stop(self) -> None:
        if self.status().status in ("stopped", "stopping", "ready", "failed"):
            return
        self.dms.stop_replication_task(ReplicationTaskArn=self.task_arn)

    def wait_for(self, wanted: set[str], *, timeout: float, failed: set[str] = frozenset({"failed"})) -> TaskStatus:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st.status in wanted:
                return st
            if st.status in failed:
                raise RunbookError(f"DMS task failed: {st.last_failure or st.stop_reason or st.status}")
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"DMS task still {st.status} after {timeout:.0f}s (wanted {sorted(wanted)})")
            self.sleep(self.poll_interval)

    def table_statistics(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"ReplicationTaskArn": self.task_arn}
        while True:
            page = self.dms.describe_table_statistics(**kwargs)
            out += page.get("TableStatistics", [])
            if not page.get("Marker"):
                return out
            kwargs["Marker"] = page["Marker"]

    def validation_state(self) -> dict[str, str]:
        """Per table (schema.table): DMS's validation state; anything but Validated is not done."""
        return {f"{t['SchemaName']}.{t['TableName']}": t.get("ValidationState", "Not enabled")
                for t in self.table_statistics()}

    def cdc_latency(self, *, minutes: int = 5) -> dict[str, float | None]:
        """CDCLatencySource / CDCLatencyTarget (seconds), the latest datapoint of the last minutes."""
        task = self._describe()
        instance_arn = task["ReplicationInstanceArn"]
        instances = self.dms.describe_replication_instances(
            Filters=[{"Name": "replication-instance-arn", "Values": [instance_arn]}])["ReplicationInstances"]
        instance_id = instances[0]["ReplicationInstanceIdentifier"] if instances else instance_arn.rsplit(":", 1)[-1]
        task_resource = self.task_arn.rsplit(":", 1)[-1]
        now = dt.datetime.now(dt.timezone.utc)
        out: dict[str, float | None] = {}
        for metric in ("CDCLatencySource", "CDCLatencyTarget"):
            points = self.cloudwatch.get_metric_statistics(
                Namespace="AWS/DMS", MetricName=metric, StartTime=now - dt.timedelta(minutes=minutes), EndTime=now,
                Period=60, Statistics=["Maximum"],
                Dimensions=[{"Name": "ReplicationInstanceIdentifier", "Value": instance_id},
                            {"Name": "ReplicationTaskIdentifier", "Value": task_resource}])["Datapoints"]
            out[metric] = max(points, key=lambda p: p["Timestamp"])["Maximum"] if points else None
        return out
