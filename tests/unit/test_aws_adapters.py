"""DMS and snapshot adapters against moto, and botocore's Stubber where moto lacks an operation."""

from __future__ import annotations

import datetime as dt

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from runbook.adapters.aws_snapshots import AuroraSnapshots, EbsSnapshots
from runbook.adapters.dms import DmsTask
from runbook.contract import CommandChannel, Replica
from runbook.errors import RunbookError, TimeoutExpired

REGION = "us-east-1"


@pytest.fixture
def aws():
    with mock_aws():
        yield


def make_task():
    dms = boto3.client("dms", region_name=REGION)
    arn = dms.create_replication_task(
        ReplicationTaskIdentifier="tern-dms-task", SourceEndpointArn="arn:aws:dms:us-east-1:1:endpoint:SRC",
        TargetEndpointArn="arn:aws:dms:us-east-1:1:endpoint:TGT",
        ReplicationInstanceArn="arn:aws:dms:us-east-1:1:rep:INSTANCE", MigrationType="full-load-and-cdc",
        TableMappings='{"rules": []}')["ReplicationTask"]["ReplicationTaskArn"]
    return dms, arn


def test_dms_start_stop_status_idempotent(aws):
    dms, arn = make_task()
    task = DmsTask(arn, dms=dms, cloudwatch=boto3.client("cloudwatch", region_name=REGION), sleep=lambda s: None)
    assert task.status().status in ("ready", "creating")
    task.start()
    assert task.status().status in ("running", "starting")
    task.start()   # already running: no second start
    assert task.wait_for({"running"}, timeout=5).status == "running"
    task.stop()
    assert task.status().status in ("stopped", "stopping")
    task.stop()
    with pytest.raises(RunbookError, match="unknown DMS start type"):
        task.start("sideways")
    with pytest.raises(RunbookError, match="not found"):
        DmsTask(arn + "x", dms=dms, cloudwatch=None, sleep=lambda s: None).status()


def test_dms_wait_is_bounded(aws):
    dms, arn = make_task()
    task = DmsTask(arn, dms=dms, cloudwatch=None, sleep=lambda s: None)
    with pytest.raises(TimeoutExpired, match="wanted"):
        task.wait_for({"stopped"}, timeout=0)


def test_dms_table_statistics_validation_and_cdc_latency():
    dms = boto3.client("dms", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    cw = boto3.client("cloudwatch", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    arn = "arn:aws:dms:us-east-1:123456789012:task:ABCDEF"
    d_stub, c_stub = Stubber(dms), Stubber(cw)
    d_stub.add_response("describe_table_statistics", {"TableStatistics": [
        {"SchemaName": "public", "TableName": "orders", "FullLoadRows": 10, "ValidationState": "Validated"}],
        "Marker": "m1"}, {"ReplicationTaskArn": arn})
    d_stub.add_response("describe_table_statistics", {"TableStatistics": [
        {"SchemaName": "public", "TableName": "audit_events", "ValidationState": "No primary key"}]},
        {"ReplicationTaskArn": arn, "Marker": "m1"})
    d_stub.add_response("describe_replication_tasks", {"ReplicationTasks": [
        {"ReplicationTaskArn": arn, "Status": "running",
         "ReplicationInstanceArn": "arn:aws:dms:us-east-1:123456789012:rep:INST"}]})
    d_stub.add_response("describe_replication_instances", {"ReplicationInstances": [
        {"ReplicationInstanceIdentifier": "tern-dms-instance"}]})
    now = dt.datetime.now(dt.timezone.utc)
    for value in (2.0, 7.5):
        c_stub.add_response("get_metric_statistics", {"Datapoints": [
            {"Timestamp": now - dt.timedelta(minutes=2), "Maximum": 99.0},
            {"Timestamp": now, "Maximum": value}]})
    with d_stub, c_stub:
        task = DmsTask(arn, dms=dms, cloudwatch=cw, sleep=lambda s: None)
        assert task.validation_state() == {"public.orders": "Validated", "public.audit_events": "No primary key"}
        assert task.cdc_latency() == {"CDCLatencySource": 2.0, "CDCLatencyTarget": 7.5}


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
