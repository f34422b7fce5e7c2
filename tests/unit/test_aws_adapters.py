"""Snapshot adapters against moto (the DMS adapter: test_dms.py). moto completes an EBS snapshot at once
and shows it at once; the service does neither, so botocore's event hooks make moto's answers say what
EC2 says: ``pending`` for hours, ``InvalidSnapshot.NotFound`` right after CreateSnapshot, throttling."""

from __future__ import annotations

import doctest

import boto3
import pytest
from moto import mock_aws

from runbook.adapters import aws_calls
from runbook.adapters.aws_snapshots import AuroraSnapshots, EbsSnapshots
from runbook.contract import CommandChannel, Replica
from runbook.errors import RunbookError, TimeoutExpired

REGION = "us-east-1"


@pytest.fixture(scope="module")
def aws():
    with mock_aws():                     # one mock for the module: moto's EC2 is slow to start
        yield


@pytest.fixture(scope="module")
def ec2(aws):
    return boto3.client("ec2", region_name=REGION)


@pytest.fixture(scope="module")
def instance(ec2):
    return ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1,
                             Placement={"AvailabilityZone": "us-east-1a"},
                             BlockDeviceMappings=[{"DeviceName": "/dev/xvdf",
                                                   "Ebs": {"VolumeSize": 50, "Encrypted": True}}])["Instances"][0]


class FakeClock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def hooks(ec2):
    """Register botocore event handlers on the module's client for one test."""
    registered = []

    def add(event, handler):
        ec2.meta.events.register(event, handler)
        registered.append((event, handler))

    yield add
    for event, handler in registered:
        ec2.meta.events.unregister(event, handler)


def replica(instance_id: str, name: str = "ec2-a") -> Replica:
    return Replica(name=name, availability_zone="us-east-1a", host="10.0.0.1", database="app",
                   data_dir="/var/lib/postgresql/15/main", bin_dir="/usr/lib/postgresql/15/bin",
                   socket_dir="/var/run/postgresql",
                   commands=CommandChannel(kind="ssm", instance_id=instance_id, region=REGION))


def snapshots(ec2, instance, clock, name="ec2-a", **kw) -> EbsSnapshots:
    return EbsSnapshots(replica(instance["InstanceId"], name), ec2=ec2, sleep=clock.sleep, clock=clock, **kw)


class ErrorResponse:
    status_code = 400


def error(code: str):
    return ErrorResponse(), {"Error": {"Code": code, "Message": f"{code} (injected)"},
                             "ResponseMetadata": {"HTTPStatusCode": 400}}


def by_id(params) -> bool:
    """A DescribeSnapshots request naming snapshot ids (EC2's query protocol: SnapshotId.1=...)."""
    return any(key.startswith("SnapshotId") for key in params.get("body", {}))


def test_aws_calls_doctests():
    failures, tried = doctest.testmod(aws_calls)
    assert tried and not failures


def test_ebs_snapshot_of_the_data_volume_is_idempotent(ec2, instance, clock):
    snaps = snapshots(ec2, instance, clock)
    data = snaps.data_volume()
    root = instance["RootDeviceName"]
    attached = {m["DeviceName"]: m["Ebs"]["VolumeId"] for m in
                ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0]["Instances"][0]
                ["BlockDeviceMappings"]}
    assert data == attached["/dev/xvdf"] and data != attached.get(root)
    assert not snaps.exists("run-1")
    snap = snaps.create("run-1", timeout=30)
    assert snaps.exists("run-1")
    assert snaps.create("run-1", timeout=30) == snap      # the same snapshot, not a second one
    assert ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["VolumeId"] == data
    assert snaps.completed("run-1", timeout=30) == snap


def test_a_snapshot_that_stays_pending_does_not_block(ec2, instance, clock, hooks):
    def pending(parsed, **kwargs):
        for snap in parsed.get("Snapshots", []):
            snap.update(State="pending", Progress="3%")

    hooks("after-call.ec2.DescribeSnapshots", pending)
    snaps = snapshots(ec2, instance, clock)
    snap = snaps.create("run-2", timeout=3600)
    assert clock.sleeps == []                               # taken, not waited for
    assert snaps.exists("run-2")                            # pending counts: the point in time is fixed
    assert snaps.create("run-2", timeout=3600) == snap      # and a resumed step does not take another
    with pytest.raises(TimeoutExpired, match=rf"EBS snapshot {snap} of ec2-a to complete \(pending 3%\)"):
        snaps.completed("run-2", timeout=60)                # the later check is bounded
    ec2.meta.events.unregister("after-call.ec2.DescribeSnapshots", pending)
    assert snaps.completed("run-2", timeout=60) == snap


def test_not_found_right_after_create_is_retried(ec2, instance, clock, hooks):
    misses = [2]

    def not_yet(params, **kwargs):
        if by_id(params) and misses[0] > 0:                    # the describe of the new id
            misses[0] -= 1
            return error("InvalidSnapshot.NotFound")
        return None

    hooks("before-call.ec2.DescribeSnapshots", not_yet)
    snaps = snapshots(ec2, instance, clock)
    snap = snaps.create("run-3", timeout=3600)
    assert misses == [0] and len(clock.sleeps) == 2 and clock.sleeps[1] > clock.sleeps[0]    # backed off
    assert ec2.describe_snapshots(SnapshotIds=[snap])["Snapshots"][0]["SnapshotId"] == snap


def test_not_found_for_ever_is_a_clear_error(ec2, instance, clock, hooks):
    hooks("before-call.ec2.DescribeSnapshots",
          lambda params, **kw: error("InvalidSnapshot.NotFound") if by_id(params) else None)
    snaps = snapshots(ec2, instance, clock, api_attempts=4)
    with pytest.raises(RunbookError, match=r"ec2-a: EC2 DescribeSnapshots snap-\w+: InvalidSnapshot.NotFound: "
                                           r".*\(gave up after 4 attempts\)"):
        snaps.create("run-4", timeout=3600)


def test_a_throttled_create_is_sent_again_and_a_failed_snapshot_is_an_error(ec2, instance, clock, hooks):
    throttled = [1]

    def throttle(**kwargs):
        if throttled[0]:
            throttled[0] -= 1
            return error("RequestLimitExceeded")
        return None

    hooks("before-call.ec2.CreateSnapshot", throttle)
    snaps = snapshots(ec2, instance, clock, name="ec2-b")
    snaps.create("run-5", timeout=3600)
    tagged = ec2.describe_snapshots(Filters=[{"Name": "tag:tern:label", "Values": ["run-5"]}])["Snapshots"]
    assert throttled == [0] and len(tagged) == 1

    def failed(parsed, **kwargs):
        for snap in parsed.get("Snapshots", []):
            snap["State"] = "error"

    hooks("after-call.ec2.DescribeSnapshots", failed)
    with pytest.raises(RunbookError, match="EBS snapshot snap-\\w+ failed"):
        snaps.create("run-6", timeout=3600)


def test_aurora_cluster_snapshot(aws):
    rds = boto3.client("rds", region_name=REGION)
    rds.create_db_cluster(DBClusterIdentifier="tern-aurora-cluster", Engine="aurora-postgresql",
                          MasterUsername="tern_master", MasterUserPassword="x" * 12)
    snaps = AuroraSnapshots("tern-aurora-cluster", rds=rds, sleep=lambda s: None)
    assert not snaps.exists("run_1")
    ident = snaps.create("run_1", timeout=30)
    assert ident == "tern-run-1" and snaps.exists("run_1")
    assert snaps.create("run_1", timeout=30) == ident
