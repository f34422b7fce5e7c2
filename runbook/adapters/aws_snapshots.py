"""Snapshots on AWS before a point of no return: EBS (a replica's data volume), Aurora cluster.

Both are waited on (bounded), tagged with the run's label, and idempotent: a snapshot
with the label already completed is not taken again.
"""

from __future__ import annotations

import time
from typing import Callable

from ..errors import RunbookError, TimeoutExpired


class EbsSnapshots:
    def __init__(self, replica, *, ec2=None, sleep: Callable[[float], None] = time.sleep,
                 poll_interval: float = 10.0) -> None:
        import boto3

        self.replica = replica
        self.instance_id = replica.commands.instance_id
        self.ec2 = ec2 or boto3.client("ec2", region_name=replica.commands.region)
        self.sleep = sleep
        self.poll_interval = poll_interval

    def data_volume(self) -> str:
        res = self.ec2.describe_instances(InstanceIds=[self.instance_id])["Reservations"]
        inst = res[0]["Instances"][0]
        root = inst.get("RootDeviceName")
        vols = [m["Ebs"]["VolumeId"] for m in inst.get("BlockDeviceMappings", []) if m["DeviceName"] != root]
        if not vols:
            raise RunbookError(f"{self.replica.name}: no data volume attached to {self.instance_id}")
        return vols[0]

    def _find(self, label: str) -> dict | None:
        snaps = self.ec2.describe_snapshots(OwnerIds=["self"], Filters=[
            {"Name": "tag:tern:label", "Values": [label]},
            {"Name": "tag:tern:replica", "Values": [self.replica.name]}])["Snapshots"]
        return snaps[0] if snaps else None

    def exists(self, label: str) -> bool:
        snap = self._find(label)
        return bool(snap and snap["State"] == "completed")

    def create(self, label: str, *, timeout: float) -> str:
        snap = self._find(label)
        if snap is None:
            snap = self.ec2.create_snapshot(
                VolumeId=self.data_volume(), Description=f"tern {label} {self.replica.name}",
                TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
                    {"Key": "tern:label", "Value": label}, {"Key": "tern:replica", "Value": self.replica.name}]}])
        snap_id = snap["SnapshotId"]
        deadline = time.monotonic() + timeout
        while True:
            state = self.ec2.describe_snapshots(SnapshotIds=[snap_id])["Snapshots"][0]["State"]
            if state == "completed":
                return snap_id
            if state == "error":
                raise RunbookError(f"{self.replica.name}: EBS snapshot {snap_id} failed")
            if time.monotonic() > deadline:
                raise TimeoutExpired(f"{self.replica.name}: EBS snapshot {snap_id} still {state} after {timeout:.0f}s")
            self.sleep(self.poll_interval)


class AuroraSnapshots:
    def __init__(self, cluster_id: str, *, region: str | None = None, rds=None,
                 sleep: Callable[[float], None] = time.sleep, poll_interval: float = 15.0) -> None:
        import boto3

        self.cluster_id = cluster_id
        self.rds = rds or boto3.client("rds", region_name=region)
        self.sleep = sleep
        self.poll_interval = poll_interval

    def _id(self, label: str) -> str:
        return f"tern-{label}".replace("_", "-").lower()[:63]

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
