"""Snapshot adapters against moto (the DMS adapter: test_dms.py)."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from runbook.adapters.aws_snapshots import AuroraSnapshots, EbsSnapshots
from runbook.contract import CommandChannel, Replica

REGION = "us-east-1"


@pytest.fixture
def aws():
    with mock_aws():
        yield


def replica(instance_id: str) -> Replica:
    return Replica(name="ec2-a", availability_zone="us-east-1a", host="10.0.0.1", database="app",
                   data_dir="/var/lib/postgresql/15/main", bin_dir="/usr/lib/postgresql/15/bin",
                   socket_dir="/var/run/postgresql",
                   commands=CommandChannel(kind="ssm", instance_id=instance_id, region=REGION))


def test_ebs_snapshot_of_the_data_volume_is_waited_and_idempotent(aws):
    ec2 = boto3.client("ec2", region_name=REGION)
    image = ec2.describe_images()["Images"][0]["ImageId"]
    inst = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, Placement={"AvailabilityZone": "us-east-1a"},
                             BlockDeviceMappings=[{"DeviceName": "/dev/xvdf",
                                                   "Ebs": {"VolumeSize": 50, "Encrypted": True}}])["Instances"][0]
    snaps = EbsSnapshots(replica(inst["InstanceId"]), ec2=ec2, sleep=lambda s: None)
    data = snaps.data_volume()
    root = inst["RootDeviceName"]
    attached = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in
                ec2.describe_instances(InstanceIds=[inst["InstanceId"]])["Reservations"][0]["Instances"][0]
                ["BlockDeviceMappings"]}
    assert data == attached["/dev/xvdf"] and data != attached.get(root)
    assert not snaps.exists("run-1")
    snap = snaps.create("run-1", timeout=30)
    assert snaps.exists("run-1")
    assert snaps.create("run-1", timeout=30) == snap      # the same snapshot, not a second one
    assert ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["VolumeId"] == data


def test_aurora_cluster_snapshot(aws):
    rds = boto3.client("rds", region_name=REGION)
    rds.create_db_cluster(DBClusterIdentifier="tern-aurora-cluster", Engine="aurora-postgresql",
                          MasterUsername="tern_master", MasterUserPassword="x" * 12)
    snaps = AuroraSnapshots("tern-aurora-cluster", rds=rds, sleep=lambda s: None)
    assert not snaps.exists("run_1")
    ident = snaps.create("run_1", timeout=30)
    assert ident == "tern-run-1" and snaps.exists("run_1")
    assert snaps.create("run_1", timeout=30) == ident
