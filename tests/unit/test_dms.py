"""The DMS adapter against moto, and botocore's Stubber with the documented responses where moto is
kinder than DMS (it ignores StartReplicationTaskType, never fails a task, has no table statistics)."""

from __future__ import annotations

import datetime as dt
import json
import logging
from types import SimpleNamespace

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from runbook.adapters.dms import DmsTask, TableValidation, secret_arn_of
from runbook.errors import ConfigError, PreflightError, RunbookError, TimeoutExpired, VerificationError

REGION = "us-east-1"
ARN = "arn:aws:dms:us-east-1:123456789012:task:ABCDEF"
INSTANCE = "arn:aws:dms:us-east-1:123456789012:rep:INST"
SOURCE = "arn:aws:dms:us-east-1:123456789012:endpoint:SRC"
PASSWORD = "s3cret-Replication-pw"
T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def task_for(dms, arn=ARN, **kw) -> DmsTask:
    clock = FakeClock()
    return DmsTask(arn, dms=dms, cloudwatch=kw.pop("cloudwatch", None), sleep=clock.sleep, clock=clock,
                   poll_interval=1.0, **kw)


def offline(service: str):
    return boto3.client(service, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")


def described(status: str, *, stop_reason: str | None = None, failure: str | None = None, started: bool = True,
              stopped_at: dt.datetime | None = None) -> dict:
    """A DescribeReplicationTasks answer as DMS documents it."""
    task = {"ReplicationTaskArn": ARN, "ReplicationTaskIdentifier": "tern-dms-task", "Status": status,
            "MigrationType": "full-load-and-cdc", "ReplicationInstanceArn": INSTANCE, "SourceEndpointArn": SOURCE,
            "TargetEndpointArn": "arn:aws:dms:us-east-1:123456789012:endpoint:TGT",
            "ReplicationTaskStats": {"FullLoadProgressPercent": 100 if started else 0, "TablesLoaded": 2,
                                     "TablesErrored": 0}}
    if started:
        task["ReplicationTaskStartDate"] = T0
        task["ReplicationTaskStats"].update(FullLoadStartDate=T0, StartDate=T0)
    if stopped_at:
        task["ReplicationTaskStats"]["StopDate"] = stopped_at
    if stop_reason:
        task["StopReason"] = stop_reason
    if failure:
        task["LastFailureMessage"] = failure
    return {"ReplicationTasks": [task]}


DESCRIBE = {"Filters": [{"Name": "replication-task-arn", "Values": [ARN]}], "WithoutSettings": True}


def expect_start(stub: Stubber, start_type: str) -> None:
    stub.add_response("start_replication_task", {"ReplicationTask": {"ReplicationTaskArn": ARN, "Status": "starting"}},
                      {"ReplicationTaskArn": ARN, "StartReplicationTaskType": start_type})


# -- starting: moto, with the start types recorded ----------------------------------------------------


@pytest.fixture
def aws():
    with mock_aws():
        yield


def make_task(ready: bool = True):
    dms = boto3.client("dms", region_name=REGION)
    arn = dms.create_replication_task(
        ReplicationTaskIdentifier="tern-dms-task", SourceEndpointArn="arn:aws:dms:us-east-1:1:endpoint:SRC",
        TargetEndpointArn="arn:aws:dms:us-east-1:1:endpoint:TGT",
        ReplicationInstanceArn="arn:aws:dms:us-east-1:1:rep:INSTANCE", MigrationType="full-load-and-cdc",
        TableMappings='{"rules": []}')["ReplicationTask"]["ReplicationTaskArn"]
    if ready:   # DMS: creating -> ready by itself; moto's task stays "creating"
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.dms.models import dms_backends

        dms_backends[DEFAULT_ACCOUNT_ID][REGION].replication_tasks[arn].ready()
    sent: list[str] = []
    dms.meta.events.register("provide-client-params.dms.StartReplicationTask",
                             lambda params, **_: sent.append(params["StartReplicationTaskType"]))
    return dms, arn, sent


def test_start_replication_only_first_then_resume_and_reload_only_when_asked(aws):
    dms, arn, sent = make_task()
    task = task_for(dms, arn)
    st = task.status()
    assert st.status == "ready" and st.never_started
    assert task.start() == "start-replication"
    assert task.wait_for({"running"}, timeout=5).status == "running"
    assert task.start() is None and task.resume() is None       # running already: no second call
    task.stop(timeout=5)
    assert task.status().status == "stopped"
    task.stop(timeout=5)                                          # stopped already: no-op
    assert task.start() == "resume-processing"                    # never start-replication twice
    task.stop(timeout=5)
    assert task.start("start-replication") == "resume-processing"
    with pytest.raises(PreflightError, match="stop it before a full reload"):
        task.reload()
    task.stop(timeout=5)
    assert task.reload() == "reload-target"
    assert sent == ["start-replication", "resume-processing", "resume-processing", "reload-target"]
    with pytest.raises(RunbookError, match="unknown DMS start type"):
        task.start("sideways")


def test_missing_task_is_a_clear_runbook_error(aws):
    dms, arn, _ = make_task()
    with pytest.raises(ConfigError, match="not found"):
        task_for(dms, arn + "x").status()
    # DMS itself answers a filter that matches nothing with ResourceNotFoundFault (moto: an empty list)
    real = offline("dms")
    with Stubber(real) as stub:
        stub.add_client_error("describe_replication_tasks", "ResourceNotFoundFault",
                              "No Tasks found matching provided filters", expected_params=DESCRIBE)
        with pytest.raises(ConfigError, match="DMS task .* not found") as err:
            task_for(real).start()
        assert "botocore" not in str(err.value) and err.value.__cause__ is None


def test_waits_are_bounded(aws):
    dms, arn, _ = make_task(ready=False)          # moto's task stays "creating"
    task = task_for(dms, arn)
    with pytest.raises(TimeoutExpired, match="settle"):
        task.start(settle_timeout=30)
    with pytest.raises(TimeoutExpired, match="wanted"):
        task.wait_for({"stopped"}, timeout=0)
    assert task.clock() <= 31


# -- starting and waiting: DMS's documented failure states (Stubber) -------------------------------


def test_a_ready_task_that_ran_before_is_resumed_not_started_again():
    dms = offline("dms")
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("ready", started=False), DESCRIBE)
        expect_start(stub, "start-replication")
        stub.add_response("describe_replication_tasks", described("ready", started=True), DESCRIBE)   # after a modify
        expect_start(stub, "resume-processing")
        stub.add_response("describe_replication_tasks", described("ready", started=False), DESCRIBE)
        expect_start(stub, "start-replication")                     # a reload on a first run is a first run
        task = task_for(dms)
        assert task.start() == "start-replication"
        assert task.start() == "resume-processing"
        assert task.reload() == "start-replication"


@pytest.mark.parametrize("status, reason", [
    ("stopped", "Stop Reason FATAL_ERROR Error Level FATAL"),
    ("stopped", "Stop Reason STOPPED_DUE_TO_LOW_MEMORY"),
    ("failed", None),
    ("failed-move", None),
])
def test_wait_fails_fast_with_the_reason(status, reason):
    dms = offline("dms")
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("starting"), DESCRIBE)
        stub.add_response("describe_replication_tasks", described(
            status, stop_reason=reason, failure="Last Error ODBC general error. Task error notification received",
            stopped_at=T0 + dt.timedelta(minutes=5)), DESCRIBE)
        task = task_for(dms)
        with pytest.raises(RunbookError) as err:
            task.wait_for({"running"}, timeout=600)
        assert not isinstance(err.value, TimeoutExpired)
        assert status in str(err.value) and "ODBC general error" in str(err.value)
        if reason:
            assert reason in str(err.value)
        assert task.clock() <= 1.0                                    # failed at once, not after 600 s
        stub.assert_no_pending_responses()


def test_a_normal_stop_is_no_failure_and_a_fatal_one_is_waited_as_stopped():
    dms = offline("dms")
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("stopped", stop_reason="Stop Reason NORMAL"),
                          DESCRIBE)
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        stub.add_response("describe_replication_tasks", described(
            "stopped", stop_reason="Stop Reason FATAL_ERROR Error Level FATAL"), DESCRIBE)
        task = task_for(dms)
        assert task.wait_for({"running"}, timeout=60).status == "running"
        assert task.wait_for({"stopped"}, timeout=60).fatal_stop       # stopping to repoint after a failover


def test_start_refuses_a_failed_task_unless_recovering():
    dms = offline("dms")
    fatal = described("stopped", stop_reason="Stop Reason FATAL_ERROR Error Level FATAL",
                      failure="could not connect to server: Connection refused", stopped_at=T0)
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", fatal, DESCRIBE)
        stub.add_response("describe_replication_tasks", described("failed-move"), DESCRIBE)
        stub.add_response("describe_replication_tasks", described("failed-move"), DESCRIBE)
        # recover=True: resumed; the stop it resumed from, still shown for a moment, is not a new failure
        stub.add_response("describe_replication_tasks", fatal, DESCRIBE)
        expect_start(stub, "resume-processing")
        stub.add_response("describe_replication_tasks", fatal, DESCRIBE)
        stub.add_response("describe_replication_tasks", described("running", stop_reason=fatal["ReplicationTasks"][0]
                                                                  ["StopReason"]), DESCRIBE)
        task = task_for(dms)
        with pytest.raises(RunbookError, match="FATAL_ERROR.*Connection refused.*recover=True"):
            task.start()
        with pytest.raises(RunbookError, match="failed-move"):
            task.start()
        with pytest.raises(RunbookError, match="failed-move"):
            task.start(recover=True)
        assert task.ensure_running(timeout=60, recover=True).status == "running"
        stub.assert_no_pending_responses()


# -- validation: per table, from DescribeTableStatistics (Stubber: moto has none) ---------------------


def table(name, state, **counts):
    return {"SchemaName": "public", "TableName": name, "ValidationState": state, "TableState": counts.pop(
        "table_state", "Table completed"), "FullLoadRows": 10, **counts}


def test_validation_reads_the_failed_and_suspended_counts_per_table():
    dms = offline("dms")
    page1 = [table("orders", "Validated", ValidationFailedRecords=0, ValidationSuspendedRecords=0),
             table("items", "Pending records", ValidationFailedRecords=3, ValidationPendingRecords=40),
             table("users", "Suspended records", ValidationSuspendedRecords=2)]
    page2 = [table("audit_events", "No primary key"),
             table("payments", "Table error", table_state="Table error"),
             table("ledger", "Validated", table_state="Table error")]
    with Stubber(dms) as stub:
        for _ in range(2):
            stub.add_response("describe_table_statistics", {"TableStatistics": page1, "Marker": "m1"},
                              {"ReplicationTaskArn": ARN})
            stub.add_response("describe_table_statistics", {"TableStatistics": page2},
                              {"ReplicationTaskArn": ARN, "Marker": "m1"})
        task = task_for(dms)
        result = task.validation(check=False)
        assert set(result) == {"public.orders", "public.items", "public.users", "public.audit_events",
                               "public.payments", "public.ledger"}
        assert result["public.items"] == TableValidation("public.items", "Pending records", "Table completed",
                                                         failed_records=3, suspended_records=0, pending_records=40)
        assert result["public.orders"].validated and result["public.orders"].problem is None
        assert result["public.audit_events"].problem is None and not result["public.audit_events"].validated
        assert "2 suspended records" in result["public.users"].problem
        with pytest.raises(VerificationError) as err:
            task.validation()
        msg = str(err.value)
        for bad in ("public.items: 3 failed records", "public.users: 2 suspended records", "public.payments",
                    "public.ledger: table state 'Table error'"):
            assert bad in msg
        assert "public.orders" not in msg and "public.audit_events" not in msg
        assert set(err.value.context["tables"]) == set(result)


def test_validation_passes_only_on_tables_checked():
    dms = offline("dms")
    with Stubber(dms) as stub:
        stub.add_response("describe_table_statistics", {"TableStatistics": [
            table("orders", "Validated"), table("audit_events", "No primary key")]}, {"ReplicationTaskArn": ARN})
        stub.add_response("describe_table_statistics", {"TableStatistics": [
            table("orders", "Validated"), table("audit_events", "No primary key")]}, {"ReplicationTaskArn": ARN})
        stub.add_response("describe_table_statistics", {"TableStatistics": []}, {"ReplicationTaskArn": ARN})
        task = task_for(dms)
        assert set(task.validation()) == {"public.orders", "public.audit_events"}
        with pytest.raises(VerificationError, match="audit_events: validation state 'No primary key'"):
            task.validation(require_validated=True)
        with pytest.raises(VerificationError, match="no table statistics"):
            task.validation()


# -- following the leader -------------------------------------------------------------------------


def dms_stack():
    """moto: the replication secret, a replication instance, the source endpoint and a task on them."""
    sm = boto3.client("secretsmanager", region_name=REGION)
    secret = sm.create_secret(Name="tern-replication", SecretString=json.dumps(
        {"username": "tern_replicator", "password": PASSWORD, "host": "10.0.1.10", "port": 5432}))["ARN"]
    dms = boto3.client("dms", region_name=REGION)
    instance = dms.create_replication_instance(ReplicationInstanceIdentifier="tern-dms-instance",
                                               ReplicationInstanceClass="dms.t3.medium",
                                               )["ReplicationInstance"]["ReplicationInstanceArn"]
    source = dms.create_endpoint(EndpointIdentifier="tern-dms-source", EndpointType="source", EngineName="postgres",
                                 DatabaseName="app", PostgreSQLSettings={"SecretsManagerSecretId": secret})[
        "Endpoint"]["EndpointArn"]
    arn = dms.create_replication_task(
        ReplicationTaskIdentifier="tern-dms-task", SourceEndpointArn=source, TargetEndpointArn=source,
        ReplicationInstanceArn=instance, MigrationType="full-load-and-cdc",
        TableMappings='{"rules": []}')["ReplicationTask"]["ReplicationTaskArn"]
    outputs = SimpleNamespace(stack="rehearsal", dms=SimpleNamespace(
        region=REGION, replication_task_arn=arn, replication_instance_arn=instance, source_endpoint_arn=source,
        target_endpoint_arn=source), credentials=SimpleNamespace(replication_password=f"aws-secretsmanager:{secret}#password"))
    return sm, dms, secret, outputs


def test_follow_leader_rewrites_host_and_port_keeps_credentials_and_tests_the_connection(aws, caplog):
    caplog.set_level(logging.DEBUG, logger="runbook")   # (botocore itself logs request bodies at DEBUG)
    sm, dms, secret, outputs = dms_stack()
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dms.models import dms_backends

    dms_backends[DEFAULT_ACCOUNT_ID][REGION].replication_tasks[outputs.dms.replication_task_arn].ready()
    clock = FakeClock()
    task = DmsTask.from_outputs(outputs, dms=dms, secretsmanager=sm, sleep=clock.sleep, clock=clock,
                                poll_interval=1.0)
    assert task.source_secret.startswith("aws-secretsmanager:") and secret_arn_of(task.source_secret) == secret
    result = task.follow_leader("10.0.2.20", 5433, timeout=30)
    assert result == {"host": "10.0.2.20", "port": 5433, "changed": True, "connection": "successful", "via": "secret"}
    assert json.loads(sm.get_secret_value(SecretId=secret)["SecretString"]) == {
        "username": "tern_replicator", "password": PASSWORD, "host": "10.0.2.20", "port": 5433}
    conns = dms.describe_connections()["Connections"]
    assert [(c["ReplicationInstanceArn"], c["EndpointArn"]) for c in conns] == [
        (outputs.dms.replication_instance_arn, outputs.dms.source_endpoint_arn)]
    assert PASSWORD not in caplog.text and PASSWORD not in repr(result)


def test_follow_leader_refuses_a_running_task_and_changes_nothing(aws):
    sm, dms, secret, outputs = dms_stack()
    dms.start_replication_task(ReplicationTaskArn=outputs.dms.replication_task_arn,
                               StartReplicationTaskType="start-replication")
    task = DmsTask.from_outputs(outputs, dms=dms, secretsmanager=sm, sleep=lambda s: None)
    with pytest.raises(PreflightError, match="running: stop it before repointing"):
        task.follow_leader("10.0.2.20", 5432)
    assert json.loads(sm.get_secret_value(SecretId=secret)["SecretString"])["host"] == "10.0.1.10"
    with pytest.raises(ConfigError, match="no DMS task"):
        DmsTask.from_outputs(SimpleNamespace(stack="local", dms=None), dms=dms)


ENDPOINT = {"Filters": [{"Name": "endpoint-arn", "Values": [SOURCE]}]}


def endpoint_with_secret(secret: str | None, **kw) -> dict:
    """A DescribeEndpoints entry for the source, as DMS documents it (a secret, or ServerName/Port)."""
    ep = {"EndpointArn": SOURCE, "EndpointIdentifier": "tern-dms-source", "EndpointType": "SOURCE",
          "EngineName": "postgres", "DatabaseName": "app", "Status": "active", **kw}
    if secret:
        ep["PostgreSQLSettings"] = {"SecretsManagerSecretId": secret,
                                    "SecretsManagerAccessRoleArn": "arn:aws:iam::123456789012:role/tern-dms-secrets"}
    return ep


def test_follow_leader_fails_with_the_connection_tests_message_never_the_password():
    dms, sm = offline("dms"), offline("secretsmanager")
    secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:tern-replication-AbCdEf"
    value = {"username": "tern_replicator", "password": PASSWORD, "host": "10.0.2.20", "port": 5432, "dbname": "app"}
    conn = {"ReplicationInstanceArn": INSTANCE, "EndpointArn": SOURCE, "EndpointIdentifier": "tern-dms-source",
            "ReplicationInstanceIdentifier": "tern-dms-instance"}
    filters = {"Filters": [{"Name": "endpoint-arn", "Values": [SOURCE]},
                           {"Name": "replication-instance-arn", "Values": [INSTANCE]}]}
    with Stubber(dms) as d_stub, Stubber(sm) as s_stub:
        # the secret already names the new leader: not rewritten, but the connection is still proven
        d_stub.add_response("describe_replication_tasks", described("stopped"), DESCRIBE)
        d_stub.add_response("describe_endpoints", {"Endpoints": [endpoint_with_secret(secret)]}, ENDPOINT)
        s_stub.add_response("get_secret_value", {"ARN": secret, "SecretString": json.dumps(value)},
                            {"SecretId": secret})
        d_stub.add_response("test_connection", {"Connection": {**conn, "Status": "testing"}},
                            {"ReplicationInstanceArn": INSTANCE, "EndpointArn": SOURCE})
        d_stub.add_response("describe_connections", {"Connections": [{**conn, "Status": "testing"}]}, filters)
        d_stub.add_response("describe_connections", {"Connections": [{**conn, "Status": "failed", "LastFailureMessage":
            f"FATAL: password authentication failed for user tern_replicator (password={PASSWORD})"}]}, filters)
        # a new leader: rewritten (every other key kept), then a test that never finishes: bounded
        d_stub.add_response("describe_replication_tasks", described("failed"), DESCRIBE)
        d_stub.add_response("describe_endpoints", {"Endpoints": [endpoint_with_secret(secret)]}, ENDPOINT)
        s_stub.add_response("get_secret_value", {"ARN": secret, "SecretString": json.dumps(value)},
                            {"SecretId": secret})
        s_stub.add_response("put_secret_value", {"ARN": secret}, {"SecretId": secret, "SecretString": json.dumps(
            {**value, "host": "10.0.3.30", "port": 5432})})
        d_stub.add_response("test_connection", {"Connection": {**conn, "Status": "testing"}},
                            {"ReplicationInstanceArn": INSTANCE, "EndpointArn": SOURCE})
        for _ in range(4):
            d_stub.add_response("describe_connections", {"Connections": [{**conn, "Status": "testing"}]}, filters)
        task = task_for(dms, secretsmanager=sm, source_secret=f"aws-secretsmanager:{secret}#password")
        with pytest.raises(RunbookError, match="cannot connect to the new source 10.0.2.20:5432: FATAL: password "
                                               "authentication failed") as err:
            task.follow_leader("10.0.2.20", 5432)
        assert PASSWORD not in str(err.value)
        with pytest.raises(TimeoutExpired, match="connection test .*10.0.3.30.*testing"):
            task.follow_leader("10.0.3.30", 5432, timeout=3)
        d_stub.assert_no_pending_responses()
        s_stub.assert_no_pending_responses()
    with pytest.raises(ConfigError, match="aws-secretsmanager"):
        secret_arn_of("file:/tmp/secrets.json#replication_password")


# -- lag ----------------------------------------------------------------------------------------------


def cdc_stubs(dms_stub: Stubber) -> None:
    dms_stub.add_response("describe_replication_tasks", {"ReplicationTasks": [
        {"ReplicationTaskArn": ARN, "Status": "running", "ReplicationInstanceArn": INSTANCE}]})
    dms_stub.add_response("describe_replication_instances", {"ReplicationInstances": [
        {"ReplicationInstanceIdentifier": "tern-dms-instance"}]})


def test_cdc_latency_is_the_latest_datapoint_and_none_when_missing():
    dms, cw = offline("dms"), offline("cloudwatch")
    now = dt.datetime.now(dt.timezone.utc)
    dims = [{"Name": "ReplicationInstanceIdentifier", "Value": "tern-dms-instance"},
            {"Name": "ReplicationTaskIdentifier", "Value": "ABCDEF"}]
    with Stubber(dms) as d_stub, Stubber(cw) as c_stub:
        cdc_stubs(d_stub)
        c_stub.add_response("get_metric_statistics", {"Datapoints": [
            {"Timestamp": now - dt.timedelta(minutes=2), "Maximum": 99.0}, {"Timestamp": now, "Maximum": 2.0}]},
            {"Namespace": "AWS/DMS", "MetricName": "CDCLatencySource", "StartTime": ANY, "EndTime": ANY,
             "Period": 60, "Statistics": ["Maximum"], "Dimensions": dims})
        c_stub.add_response("get_metric_statistics", {"Datapoints": []})
        cdc_stubs(d_stub)
        c_stub.add_response("get_metric_statistics", {"Datapoints": []})
        c_stub.add_response("get_metric_statistics", {"Datapoints": [{"Timestamp": now, "Maximum": 0.0}]})
        task = task_for(dms, cloudwatch=cw)
        assert task.cdc_latency() == {"CDCLatencySource": 2.0, "CDCLatencyTarget": None}
        assert task.cdc_latency() == {"CDCLatencySource": None, "CDCLatencyTarget": 0.0}
