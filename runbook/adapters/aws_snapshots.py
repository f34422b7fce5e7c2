"""Snapshots on AWS before a point of no return: EBS (a replica's data volume), Aurora cluster.

EBS: "the snapshot is created immediately, but it remains in the pending state until all of data
has been transferred to Amazon S3. This can take several hours [...] The snapshot includes only the
data that was written to the volume at the time the snapshot was requested" (EBS user guide). So
:meth:`EbsSnapshots.create` returns as soon as the snapshot exists and has not failed - the fallback
point is taken - and never waits for ``completed`` (hours for 1.4 TB, and the EC2 plan may take one
inside the downtime window when it switches candidates). :meth:`EbsSnapshots.completed` is the
separate, later check that it finished (before the snapshot is relied on, or the run is closed).
The EC2 API is eventually consistent: ``InvalidSnapshot.NotFound`` right after CreateSnapshot is
retried with back-off, as the EC2 guide prescribes. Every call goes through
:func:`~runbook.adapters.aws_calls.aws_call` (throttling retried, errors become RunbookError).

Both kinds are tagged with the run's label and idempotent: a snapshot with the label (pending or
completed) is not taken again.
"""

from __future__ import annotations

import time
from typing import Callable

from ..errors import RunbookError, TimeoutExpired
from ..polling import wait_until
from .aws_calls import aws_call, client as aws_client, error_code, refused, transient

NOT_FOUND = "InvalidSnapshot.NotFound"


def aurora_snapshot_id(label: str) -> str:
    """The Aurora cluster snapshot's identifier for a run's label."""
    return f"tern-{label}".replace("_", "-").lower()[:63]


class EbsSnapshots:
    def __init__(self, replica, *, ec2=None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, poll_interval: float = 10.0,
                 api_attempts: int = 8, api_first_wait: float = 1.0, api_max_wait: float = 30.0) -> None:
        self.replica = replica
        self.instance_id = replica.commands.instance_id
        self.ec2 = ec2 if ec2 is not None else aws_client("ec2", replica.commands.region)
        self.sleep = sleep
        self.clock = clock
        self.poll_interval = poll_interval
        self._retry = {"attempts": api_attempts, "first_wait": api_first_wait, "max_wait": api_max_wait,
                       "sleep": sleep}

    def _call(self, fn, what: str, **kwargs):
        return aws_call(fn, what=f"{self.replica.name}: EC2 {what}", **self._retry, **kwargs)

    def data_volume(self) -> str:
        res = self._call(self.ec2.describe_instances, "DescribeInstances", InstanceIds=[self.instance_id])
        inst = res["Reservations"][0]["Instances"][0]
        root = inst.get("RootDeviceName")
        vols = [m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", []) if m["DeviceName"] != root]
        if not vols:
            raise RunbookError(f"{self.replica.name}: no data volume attached to {self.instance_id}")
        return vols[0]

    def _find(self, label: str) -> dict | None:
        snaps = self._call(self.ec2.describe_snapshots, "DescribeSnapshots", OwnerIds=["self"], Filters=[
            {"Name": "tag:tern:label", "Values": [label]},
            {"Name": "tag:tern:replica", "Values": [self.replica.name]},
            {"Name": "status", "Values": ["pending", "completed"]}])["Snapshots"]
        return snaps[0] if snaps else None

    def _describe(self, snap_id: str) -> dict:
        """The snapshot; ``InvalidSnapshot.NotFound`` (not visible yet) is retried with back-off."""
        snaps = self._call(self.ec2.describe_snapshots, f"DescribeSnapshots {snap_id}",
                           retry_on=lambda exc: transient(exc) or error_code(exc) == NOT_FOUND,
                           SnapshotIds=[snap_id])["Snapshots"]
        if not snaps:
            raise RunbookError(f"{self.replica.name}: EBS snapshot {snap_id} is not listed")
        return snaps[0]

    def exists(self, label: str) -> bool:
        """Taken (pending or completed): the point in time is fixed once the snapshot exists."""
        return self._find(label) is not None

    def create(self, label: str, *, timeout: float) -> str:
        """Take the snapshot (or find the one already taken) and return its id once EC2 shows it and it has
        not failed; never waits for ``completed`` (see :meth:`completed`). ``timeout`` is not waited: the
        retries of the visibility check are bounded by themselves."""
        snap = self._find(label)
        if snap is not None:
            return snap["SnapshotId"]
        created = self._call(self.ec2.create_snapshot, "CreateSnapshot", retry_on=refused,
                             VolumeId=self.data_volume(), Description=f"tern {label} {self.replica.name}",
                             TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
                                 {"Key": "tern:label", "Value": label},
                                 {"Key": "tern:replica", "Value": self.replica.name}]}])
        snap_id = created["SnapshotId"]
        state = self._describe(snap_id)["State"]
        if state == "error":
            raise RunbookError(f"{self.replica.name}: EBS snapshot {snap_id} failed")
        return snap_id

    def completed(self, label: str, *, timeout: float) -> str:
        """The later check: wait (bounded) until the label's snapshot is ``completed``; its id."""
        snap = self._find(label)
        if snap is None:
            raise RunbookError(f"{self.replica.name}: no EBS snapshot labelled {label}")
        snap_id, seen = snap["SnapshotId"], {"state": snap["State"], "progress": snap.get("Progress", "")}

        def done() -> bool:
            current = self._describe(snap_id)
            seen.update(state=current["State"], progress=current.get("Progress", ""))
            if seen["state"] == "error":
                raise RunbookError(f"{self.replica.name}: EBS snapshot {snap_id} failed")
            return seen["state"] == "completed"

        wait_until(done, timeout=timeout, interval=self.poll_interval,
                   what=f"EBS snapshot {snap_id} of {self.replica.name} to complete",
                   last=lambda: f"{seen['state']} {seen['progress']}".strip(), clock=self.clock, sleep=self.sleep)
        return snap_id


class AuroraSnapshots:
    def __init__(self, cluster_id: str, *, region: str | None = None, rds=None,
                 sleep: Callable[[float], None] = time.sleep, poll_interval: float = 15.0) -> None:
        import boto3

        self.cluster_id = cluster_id
        self.rds = rds or boto3.client("rds", region_name=region)
        self.sleep = sleep
        self.poll_interval = poll_interval

    def _id(self, label: str) -> str:
        return aurora_snapshot_id(label)

    def _state(self, label: str) -> str | None:
        try:
            snaps = self.rds.describe_db_cluster_snapshots(DBClusterSnapshotIdentifier=self._id(label))
        except self.rds.exceptions.DBClusterSnapshotNotFoundFault:
            return None
        return snaps["DBClusterSnapshots"][0]["Status"] if snaps["DBClusterSnapshots"] else None

    def exists(self, label: str) -> bool:
        return self._state(label) == "available"

    def create(self, label: str, *, timeout: float) -> str:
        if self._state(label) is None:
            self.rds.create_db_cluster_snapshot(DBClusterSnapshotIdentifier=self._id(label),
                                                DBClusterIdentifier=self.cluster_id,
                                                Tags=[{"Key": "tern:label", "Value": label}])
        deadline = time.monotonic() + timeout
        while True:
            state = self._state(label)
            if state == "available":
                return self._id(label)
            if state in ("failed", "incompatible-restore"):
                raise RunbookError(f"Aurora snapshot {self._id(label)} is {state}")
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"Aurora snapshot {self._id(label)} still {state} after {timeout:.0f}s")
            self.sleep(self.poll_interval)


def delete_labelled(labels: list[str], *, region: str | None, ec2=None, rds=None,
                    sleep: Callable[[float], None] = time.sleep) -> dict[str, list[str]]:
    """Delete the snapshots tern took under ``labels`` (each a failover run's id: its ``tern:label`` tag,
    and the Aurora snapshot's identifier): EBS snapshots and Aurora cluster snapshots are kept by AWS, and
    paid for, after their volume or cluster is destroyed. Only these labels' are touched; one already
    gone is skipped (idempotent). Returns the ids deleted, by kind; RunbookError names what is left."""
    deleted: dict[str, list[str]] = {"ebs": [], "aurora": []}
    if not labels:
        return deleted
    ec2 = ec2 if ec2 is not None else aws_client("ec2", region)
    retry = {"sleep": sleep, "attempts": 6}
    snaps = aws_call(ec2.describe_snapshots, what="EC2 DescribeSnapshots", OwnerIds=["self"],
                     Filters=[{"Name": "tag:tern:label", "Values": list(labels)}], **retry)["Snapshots"]
    for snap in snaps:
        aws_call(ec2.delete_snapshot, what=f"EC2 DeleteSnapshot {snap['SnapshotId']}", absent=(NOT_FOUND,),
                 SnapshotId=snap["SnapshotId"], **retry)
        deleted["ebs"].append(snap["SnapshotId"])
    rds = rds if rds is not None else aws_client("rds", region)
    for label in labels:
        snap_id = aurora_snapshot_id(label)
        found = aws_call(rds.describe_db_cluster_snapshots, what=f"RDS DescribeDBClusterSnapshots {snap_id}",
                         absent=("DBClusterSnapshotNotFoundFault",), DBClusterSnapshotIdentifier=snap_id, **retry)
        if not found or not found.get("DBClusterSnapshots"):
            continue
        aws_call(rds.delete_db_cluster_snapshot, what=f"RDS DeleteDBClusterSnapshot {snap_id}",
                 absent=("DBClusterSnapshotNotFoundFault",), DBClusterSnapshotIdentifier=snap_id, **retry)
        deleted["aurora"].append(snap_id)
    return deleted
