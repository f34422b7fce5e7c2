"""The replication engine interface, and the DMS engine against moto and botocore's Stubber with DMS's
documented responses (moto ignores StartReplicationTaskType, never fails a task, has no table statistics,
no ModifyEndpoint): first start vs resume, fail fast on failed-move / FATAL_ERROR / LOW_MEMORY, validation
counts refusing, ResourceNotFoundFault, the source endpoint following the leader (not the first instance)."""

from __future__ import annotations

import datetime as dt
import inspect
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from runbook.adapters.dms import DmsTask
from runbook.errors import (ConfigError, NotPromoted, PreflightError, RunbookError, StepError, TimeoutExpired,
                            VerificationError)
from runbook.journal import Journal
from runbook.replication import engines, risks, setup
from runbook.replication.engines import DmsEngine, Engine, NativeEngine

REGION = "us-east-1"
ARN = "arn:aws:dms:us-east-1:123456789012:task:ABCDEF"
INSTANCE = "arn:aws:dms:us-east-1:123456789012:rep:INST"
SOURCE = "arn:aws:dms:us-east-1:123456789012:endpoint:SRC"
TARGET = "arn:aws:dms:us-east-1:123456789012:endpoint:TGT"
SECRET = "arn:aws:secretsmanager:us-east-1:123456789012:secret:tern-replication-AbCdEf"
PASSWORD = "s3cret-Replication-pw"
T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
DESCRIBE = {"Filters": [{"Name": "replication-task-arn", "Values": [ARN]}], "WithoutSettings": True}
DESCRIBE_SETTINGS = {"Filters": [{"Name": "replication-task-arn", "Values": [ARN]}], "WithoutSettings": False}
ENDPOINT = {"Filters": [{"Name": "endpoint-arn", "Values": [SOURCE]}]}
CONN_FILTERS = {"Filters": [{"Name": "endpoint-arn", "Values": [SOURCE]},
                            {"Name": "replication-instance-arn", "Values": [INSTANCE]}]}
STATS = {"ReplicationTaskArn": ARN}


# -- fakes: a clock, the outputs, a run's context, the leader -----------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


def offline(service: str):
    return boto3.client(service, region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")


def outputs(**dms):
    """Two EC2 replicas: the first (ec2-a) is NOT the leader; failover-ec2 promoted ec2-b."""
    d = {"region": REGION, "replication_task_arn": ARN, "replication_instance_arn": INSTANCE,
         "source_endpoint_arn": SOURCE, "target_endpoint_arn": TARGET, **dms}
    return SimpleNamespace(
        stack="rehearsal", dms=SimpleNamespace(**d),
        replicas=[SimpleNamespace(name="ec2-a", host="10.0.1.10", port=5432, database="app"),
                  SimpleNamespace(name="ec2-b", host="10.0.2.20", port=5433, database="app")],
        credentials=SimpleNamespace(replication_password=f"aws-secretsmanager:{SECRET}#password"))


class FakeLeader:
    """The EC2 leader as PgHost answers the engine's catalog queries (tables, slots)."""

    def __init__(self, tables=("public.orders", "public.items", "tern.sentinel"), slots=None, slot_state=None):
        self.tables = list(tables)
        self.slots = slots if slots is not None else [{"name": "abc_00016393_dms", "role": "tern_replicator"}]
        self.slot_state = slot_state or {"now": "0/3000100", "slot": True, "confirmed": "0/3000000", "active": True,
                                         "wal_status": "reserved", "safe_wal_size": 1 << 30}

    def query(self, select, *, database=None, timeout=30):
        if "pg_partition_root" in select:
            return [{"t": t, "root": None} for t in self.tables]
        if "pg_stat_activity a ON a.pid = s.active_pid" in select:
            return list(self.slots)
        raise AssertionError(f"unexpected query: {select[:80]}")

    def query_one(self, select, **kw):
        assert "pg_replication_slots" in select
        return dict(self.slot_state)


class FakeCtx:
    def __init__(self, out, *, leader="ec2-b", pg=None, state_dir=None, **settings):
        self.outputs = out
        self.settings = SimpleNamespace(**{"restore_timeout": 600.0, "catchup_timeout": 120.0,
                                           "max_lag_bytes": 64 << 20, "full_verification": "witness",
                                           "gate_sample_timeout": 10.0, "connect_timeout": 5.0,
                                           "state_dir": state_dir, **settings})
        self.data = {"leader": leader, "final_lsn": "0/3000000"}
        self.progress = None
        self.journal = SimpleNamespace(run_id="failover-aurora-20260501T120000-1", kind="failover-aurora")
        self._pg = pg or FakeLeader()
        self.checkpoints: list[dict] = []

    def replica(self, name):
        return next(r for r in self.outputs.replicas if r.name == name)

    def pg(self, name):
        return self._pg

    def say(self, message):
        pass

    def checkpoint(self, **fields):
        self.checkpoints.append(fields)
        self.data.update(fields)


def task_for(dms, clock=None, **kw) -> DmsTask:
    clock = clock or FakeClock()
    return DmsTask(ARN, dms=dms, sleep=clock.sleep, clock=clock, poll_interval=1.0, **kw)


def described(status, *, started=True, stop_reason=None, failure=None, percent=100, loading=0, queued=0, errored=0,
              stopped_at=None):
    """A DescribeReplicationTasks answer as DMS documents it."""
    stats = {"FullLoadProgressPercent": percent if started else 0, "TablesLoaded": 3, "TablesLoading": loading,
             "TablesQueued": queued, "TablesErrored": errored}
    task = {"ReplicationTaskArn": ARN, "ReplicationTaskIdentifier": "tern-dms-task", "Status": status,
            "MigrationType": "full-load-and-cdc", "ReplicationInstanceArn": INSTANCE, "SourceEndpointArn": SOURCE,
            "TargetEndpointArn": TARGET, "ReplicationTaskStats": stats}
    if started:
        task["ReplicationTaskStartDate"] = T0
        stats.update(FullLoadStartDate=T0, StartDate=T0)
    if stopped_at:
        stats["StopDate"] = stopped_at
    if stop_reason:
        task["StopReason"] = stop_reason
    if failure:
        task["LastFailureMessage"] = failure
    return {"ReplicationTasks": [task]}


def source_endpoint(*, secret=True, host="10.0.1.10", port=5432):
    ep = {"EndpointArn": SOURCE, "EndpointIdentifier": "tern-dms-source", "EndpointType": "SOURCE",
          "EngineName": "postgres", "DatabaseName": "app", "Status": "active"}
    if secret:
        ep["PostgreSQLSettings"] = {"SecretsManagerSecretId": SECRET, "CaptureDdls": False,
                                    "PluginName": "test_decoding"}
    else:
        ep.update(ServerName=host, Port=port)
    return ep


def table(name, state="Validated", schema="public", table_state="Table completed", **counts):
    return {"SchemaName": schema, "TableName": name, "ValidationState": state, "TableState": table_state,
            "FullLoadRows": 10, **counts}


def tables_ok():
    return [table("orders"), table("items"), table("sentinel", schema="tern")]


# -- the interface ----------------------------------------------------------------------------------------------
def test_both_engines_implement_the_whole_interface_with_its_signatures():
    abstract = Engine.__abstractmethods__
    assert {"start", "wait_synchronised", "status", "check_ready", "verify_full", "release", "applied_final",
            "forward_running", "stop_forward", "slot_name"} <= abstract
    with pytest.raises(TypeError):
        Engine(outputs())                        # the interface itself cannot run anything
    for cls in (NativeEngine, DmsEngine):
        engine = cls(outputs())                  # instantiable: no abstract method left out
        assert isinstance(engine, Engine) and engine.name in ("native", "dms")
        for name in abstract | {"risks", "lag_text"}:
            mine, base = inspect.signature(getattr(cls, name)), inspect.signature(getattr(Engine, name))
            assert list(mine.parameters) == list(base.parameters), (cls.__name__, name)
        assert isinstance(cls.needs_witness, bool) and isinstance(cls.publishes, bool)
    assert NativeEngine.publishes and NativeEngine.needs_witness and not DmsEngine.publishes


def test_the_plans_go_through_the_engine_and_native_keeps_its_steps():
    assert [s.name for s in setup.plan("native")] == ["preflight", "prepare_leader", "aurora_role", "schema",
                                                      "subscribe", "initial_sync", "schema_after", "ddl_guard"]
    assert [s.name for s in setup.plan("dms")] == ["preflight", "prepare_leader", "aurora_role", "schema",
                                                   "start_task", "full_load", "schema_after", "validation",
                                                   "ddl_guard"]
    assert engines.engine_named("native", outputs()).name == "native"
    with pytest.raises(ConfigError, match="outputs.dms"):
        engines.engine_named("dms", SimpleNamespace(stack="local", dms=None))
    with pytest.raises(ConfigError, match="unknown engine"):
        engines.engine_named("pglogical", outputs())


def _journal(state_dir: Path, engine: str, *, steps=("preflight", "prepare_leader"), outcome=None, age=0.0):
    j = Journal.create(state_dir, "replicate-aurora", engine=engine)
    for s in steps:
        j.record(s, "start")
    if outcome:
        j.finish(outcome, "why")
    os.utime(j.path, (time.time() - age, time.time() - age))
    # distinct run ids within one second
    new = j.path.parent.with_name(j.path.parent.name + f"-{engine}-{len(list(j.path.parents[1].iterdir()))}")
    j.path.parent.rename(new)
    return new.name


def test_the_engine_recorded_at_replicate_time_is_the_one_status_and_failover_use(tmp_path):
    assert engines.recorded(tmp_path) is None
    assert engines.for_status(outputs(), tmp_path).name == "native"          # never replicated: native
    _journal(tmp_path, "dms", age=30)
    assert engines.recorded(tmp_path)["engine"] == "dms"
    assert engines.for_status(outputs(), tmp_path).name == "dms"
    # a later run refused at its preflight changed nothing: the DMS setup still stands
    _journal(tmp_path, "native", steps=("preflight",), outcome="refused", age=10)
    assert engines.for_status(outputs(), tmp_path).name == "dms"
    ctx = FakeCtx(outputs(), state_dir=tmp_path)
    assert engines.for_run(ctx).name == "dms" and engines.for_run(ctx) is engines.for_run(ctx)
    # a stack without a DMS task reports native, whatever a stray journal says
    assert engines.for_status(SimpleNamespace(stack="local", dms=None), tmp_path).name == "native"


# -- starting: the source follows the leader; start-replication once, resume-processing after (moto) ----------
@pytest.fixture
def aws():
    with mock_aws():
        yield


def dms_stack():
    sm = boto3.client("secretsmanager", region_name=REGION)
    secret = sm.create_secret(Name="tern-replication", SecretString=json.dumps(
        {"username": "tern_replicator", "password": PASSWORD, "host": "10.0.1.10", "port": 5432}))["ARN"]
    dms = boto3.client("dms", region_name=REGION)
    instance = dms.create_replication_instance(ReplicationInstanceIdentifier="tern-dms-instance",
                                               ReplicationInstanceClass="dms.t3.medium")["ReplicationInstance"][
        "ReplicationInstanceArn"]
    source = dms.create_endpoint(EndpointIdentifier="tern-dms-source", EndpointType="source", EngineName="postgres",
                                 DatabaseName="app", PostgreSQLSettings={"SecretsManagerSecretId": secret})[
        "Endpoint"]["EndpointArn"]
    arn = dms.create_replication_task(
        ReplicationTaskIdentifier="tern-dms-task", SourceEndpointArn=source, TargetEndpointArn=source,
        ReplicationInstanceArn=instance, MigrationType="full-load-and-cdc",
        TableMappings='{"rules": []}')["ReplicationTask"]["ReplicationTaskArn"]
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dms.models import dms_backends

    dms_backends[DEFAULT_ACCOUNT_ID][REGION].replication_tasks[arn].ready()   # DMS: creating -> ready by itself
    sent: list[str] = []
    dms.meta.events.register("provide-client-params.dms.StartReplicationTask",
                             lambda params, **_: sent.append(params["StartReplicationTaskType"]))
    out = outputs(replication_task_arn=arn, replication_instance_arn=instance, source_endpoint_arn=source,
                  target_endpoint_arn=source)
    out.credentials.replication_password = f"aws-secretsmanager:{secret}#password"
    return sm, dms, secret, out, sent


def retest_allowed() -> None:
    """DMS runs TestConnection again for the same endpoint and instance whenever asked; moto 5.2 fails a second
    test of the same pair (UnboundLocalError in its backend): forget the first, as DMS itself would not."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.dms.models import dms_backends

    dms_backends[DEFAULT_ACCOUNT_ID][REGION].connections.clear()


def test_start_follows_the_leader_not_the_first_instance_then_resumes_never_restarts(aws):
    sm, dms, secret, out, sent = dms_stack()
    clock = FakeClock()
    task = DmsTask.from_outputs(out, dms=dms, secretsmanager=sm, sleep=clock.sleep, clock=clock, poll_interval=1.0)
    engine = DmsEngine(out, task=task)
    ctx = FakeCtx(out)                                   # leader: ec2-b, the second replica
    first = engine.start(ctx)
    assert first["dms_start"] == "start-replication" and first["dms_source"] == "10.0.2.20:5433"
    assert "moved to ec2-b (10.0.2.20:5433, through its secret)" in first["detail"]
    kept = json.loads(sm.get_secret_value(SecretId=secret)["SecretString"])
    assert kept == {"username": "tern_replicator", "password": PASSWORD, "host": "10.0.2.20", "port": 5433}
    assert engine.start(ctx)["dms_start"] == "already running"          # running: nothing sent again
    task.stop(timeout=5)
    retest_allowed()
    again = engine.start(ctx)
    assert again["dms_start"] == "resume-processing" and "already at ec2-b" in again["detail"]
    assert sent == ["start-replication", "resume-processing"]            # start-replication only the first time
    assert PASSWORD not in json.dumps([first, again])


def test_a_task_that_ran_against_another_node_is_not_resumed_from_the_leader(aws):
    sm, dms, secret, out, sent = dms_stack()
    clock = FakeClock()
    task = DmsTask.from_outputs(out, dms=dms, secretsmanager=sm, sleep=clock.sleep, clock=clock, poll_interval=1.0)
    task.start()                      # it ran against ec2-a (the secret's host) ...
    task.stop(timeout=5)
    with pytest.raises(PreflightError, match="ran against 10.0.1.10:5432 before, not the EC2 leader ec2-b"):
        DmsEngine(out, task=task).start(FakeCtx(out))
    assert json.loads(sm.get_secret_value(SecretId=secret)["SecretString"])["host"] == "10.0.1.10"   # unchanged
    assert sent == ["start-replication"]


def test_follow_leader_modifies_an_endpoint_without_a_secret_to_the_leaders_host():
    dms = offline("dms")
    conn = {"ReplicationInstanceArn": INSTANCE, "EndpointArn": SOURCE, "Status": "successful"}
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("ready", started=False), DESCRIBE)   # start()
        stub.add_response("describe_replication_tasks", described("ready", started=False), DESCRIBE)   # where now
        stub.add_response("describe_endpoints", {"Endpoints": [source_endpoint(secret=False)]}, ENDPOINT)
        stub.add_response("describe_replication_tasks", described("ready", started=False), DESCRIBE)   # follow
        stub.add_response("describe_endpoints", {"Endpoints": [source_endpoint(secret=False)]}, ENDPOINT)
        stub.add_response("modify_endpoint", {"Endpoint": source_endpoint(secret=False, host="10.0.2.20", port=5433)},
                          {"EndpointArn": SOURCE, "ServerName": "10.0.2.20", "Port": 5433})
        stub.add_response("test_connection", {"Connection": {**conn, "Status": "testing"}},
                          {"ReplicationInstanceArn": INSTANCE, "EndpointArn": SOURCE})
        stub.add_response("describe_connections", {"Connections": [conn]}, CONN_FILTERS)
        stub.add_response("describe_replication_tasks", described("ready", started=False), DESCRIBE)   # task.start
        stub.add_response("start_replication_task", {"ReplicationTask": {"ReplicationTaskArn": ARN,
                                                                         "Status": "starting"}},
                          {"ReplicationTaskArn": ARN, "StartReplicationTaskType": "start-replication"})
        result = DmsEngine(outputs(), task=task_for(dms)).start(FakeCtx(outputs()))
        stub.assert_no_pending_responses()
    assert result["dms_start"] == "start-replication" and "through its endpoint" in result["detail"]


# -- failing fast, with DMS's reason ------------------------------------------------------------------------------
def test_a_missing_task_is_a_clear_config_error():
    dms = offline("dms")
    with Stubber(dms) as stub:
        stub.add_client_error("describe_replication_tasks", "ResourceNotFoundFault",
                              "No Tasks found matching provided filters", expected_params=DESCRIBE)
        with pytest.raises(ConfigError, match="DMS task .* not found .*ResourceNotFoundFault") as err:
            DmsEngine(outputs(), task=task_for(dms)).start(FakeCtx(outputs()))
    assert err.value.exit_code == 2 and "botocore" not in str(err.value)


def test_a_failed_move_task_is_refused_before_anything_changes():
    dms, sm = offline("dms"), offline("secretsmanager")
    value = {"username": "tern_replicator", "password": PASSWORD, "host": "10.0.2.20", "port": 5433}
    with Stubber(dms) as stub, Stubber(sm) as s_stub:
        stub.add_response("describe_replication_tasks", described("failed-move", failure="Move failed"), DESCRIBE)
        stub.add_response("describe_replication_tasks", described("failed-move"), DESCRIBE)
        stub.add_response("describe_endpoints", {"Endpoints": [source_endpoint()]}, ENDPOINT)
        s_stub.add_response("get_secret_value", {"ARN": SECRET, "SecretString": json.dumps(value)}, {"SecretId": SECRET})
        with pytest.raises(PreflightError, match="failed state .*failed-move.*Move failed"):
            DmsEngine(outputs(), task=task_for(dms, secretsmanager=sm)).start(FakeCtx(outputs()))
        stub.assert_no_pending_responses()        # no put_secret_value, no test_connection, no start
        s_stub.assert_no_pending_responses()


@pytest.mark.parametrize("status, reason", [
    ("stopped", "Stop Reason FATAL_ERROR Error Level FATAL"),
    ("stopped", "Stop Reason STOPPED_DUE_TO_LOW_MEMORY"),
    ("failed-move", None),
    ("failed", None),
])
def test_the_full_load_wait_fails_at_once_with_dms_reason(status, reason):
    dms = offline("dms")
    clock = FakeClock()
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("starting", percent=0), DESCRIBE)
        stub.add_response("describe_replication_tasks", described("running", percent=40, loading=2), DESCRIBE)
        stub.add_response("describe_replication_tasks", described(
            status, stop_reason=reason, failure="Last Error ODBC general error. Task error notification received",
            stopped_at=T0 + dt.timedelta(minutes=5)), DESCRIBE)
        with pytest.raises(RunbookError) as err:
            DmsEngine(outputs(), task=task_for(dms, clock)).wait_synchronised(FakeCtx(outputs()), timeout=3600)
        stub.assert_no_pending_responses()
    assert not isinstance(err.value, TimeoutExpired)
    assert status in str(err.value) and "ODBC general error" in str(err.value)
    if reason:
        assert reason in str(err.value)
    assert clock() <= 2.0                                 # three looks, not an hour


def test_a_task_stopped_after_its_full_load_is_not_replicating_changes():
    dms = offline("dms")
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described(
            "stopped", stop_reason="Stop Reason STOPPED_AFTER_FULL_LOAD", stopped_at=T0), DESCRIBE)
        with pytest.raises(RunbookError, match="STOPPED_AFTER_FULL_LOAD.*instead of replicating changes"):
            DmsEngine(outputs(), task=task_for(dms)).wait_synchronised(FakeCtx(outputs()), timeout=600)


def test_full_load_then_every_leader_table_completed_and_dms_slot_found():
    dms = offline("dms")
    leader = FakeLeader(slots=[{"name": "old_unrelated_slot", "role": None},
                               {"name": "abc_00016393_dms", "role": "tern_replicator"}])
    ctx = FakeCtx(outputs(), pg=leader)
    ctx.data["slots_before"] = ["old_unrelated_slot"]
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("running", percent=60, loading=1), DESCRIBE)
        stub.add_response("describe_replication_tasks", described("running", percent=100), DESCRIBE)
        stub.add_response("describe_table_statistics", {"TableStatistics": tables_ok()}, STATS)
        engine = DmsEngine(outputs(), task=task_for(dms))
        result = engine.wait_synchronised(ctx, timeout=600)
        stub.assert_no_pending_responses()
    assert result["dms_slot"] == "abc_00016393_dms" == engine.slot_name()
    assert "3 tables loaded by DMS" in result["detail"]


def test_a_leader_table_dms_does_not_carry_is_refused_by_name():
    dms = offline("dms")
    ctx = FakeCtx(outputs(), pg=FakeLeader(tables=("public.orders", "public.items", "billing.invoices",
                                                    "tern.sentinel")))
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        stub.add_response("describe_table_statistics", {"TableStatistics": tables_ok()}, STATS)
        with pytest.raises(RunbookError, match="does not replicate 1 tables of the leader: billing.invoices"):
            DmsEngine(outputs(), task=task_for(dms)).wait_synchronised(ctx, timeout=600)


# -- validation: the counts, not only the states -------------------------------------------------------------------
def test_validation_failed_records_refuse_replicate_and_failover():
    dms = offline("dms")
    stats = [table("orders", "Pending records", ValidationFailedRecords=3, ValidationPendingRecords=12),
             table("items"), table("sentinel", schema="tern")]
    with Stubber(dms) as stub:
        for _ in range(2):
            stub.add_response("describe_table_statistics", {"TableStatistics": stats}, STATS)
        engine = DmsEngine(outputs(), task=task_for(dms))
        ctx = FakeCtx(outputs())
        with pytest.raises(VerificationError, match="public.orders: 3 failed records"):
            engine.check_validation(ctx)
        with pytest.raises(VerificationError, match="public.orders: 3 failed records") as err:
            engine.verify_full(ctx)
    # the report keeps what DMS found, through the run's checkpoint (only the runner journals)
    assert ctx.checkpoints[-1]["verification_full"]["ok"] is False
    assert ctx.checkpoints[-1]["verification_full"]["failed_records"] == 3
    assert "Nothing was frozen" in str(err.value)


def test_validation_passes_only_when_every_table_is_validated_or_under_validation():
    dms = offline("dms")
    good = [table("orders"), table("items", "Pending records", ValidationPendingRecords=40),
            table("sentinel", schema="tern")]
    off = [table("orders"), table("items", "Not enabled"), table("sentinel", schema="tern")]
    with Stubber(dms) as stub:
        stub.add_response("describe_table_statistics", {"TableStatistics": good}, STATS)
        stub.add_response("describe_table_statistics", {"TableStatistics": good}, STATS)
        stub.add_response("describe_table_statistics", {"TableStatistics": off}, STATS)
        stub.add_response("describe_table_statistics", {"TableStatistics": off}, STATS)
        engine = DmsEngine(outputs(), task=task_for(dms))
        ctx = FakeCtx(outputs())
        assert engine.check_validation(ctx)["validation"] == {"validated": 2, "failed_records": 0,
                                                              "suspended_records": 0, "pending_records": 40}
        full = engine.verify_full(ctx)["verification_full"]
        assert full["ok"] is True and full["tables"] == 3 and full["differences"] == []
        with pytest.raises(VerificationError, match="does not validate 1 tables .*public.items"):
            engine.check_validation(ctx)
        with pytest.raises(VerificationError, match="public.items: not validated by DMS .Not enabled."):
            engine.verify_full(ctx)


def test_failover_preflight_refuses_on_failed_records_and_on_a_lagging_cdc():
    dms, cw = offline("dms"), offline("cloudwatch")
    definition = {**described("running")["ReplicationTasks"][0], "TableMappings": json.dumps(INFRA_MAPPINGS),
                  "ReplicationTaskSettings": json.dumps(INFRA_SETTINGS)}
    now = dt.datetime.now(dt.timezone.utc)
    with Stubber(dms) as stub, Stubber(cw) as c_stub:
        # 1. failed records: refused, naming the table
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        stub.add_response("describe_replication_tasks", {"ReplicationTasks": [definition]}, DESCRIBE_SETTINGS)
        stub.add_response("describe_table_statistics", {"TableStatistics": tables_ok()}, STATS)
        stub.add_response("describe_table_statistics", {"TableStatistics": [
            table("orders", "Mismatched records", ValidationFailedRecords=7)]}, STATS)
        # 2. all validated, but CDC 90 s behind with a 120 s catch-up: refused
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        stub.add_response("describe_replication_tasks", {"ReplicationTasks": [definition]}, DESCRIBE_SETTINGS)
        stub.add_response("describe_table_statistics", {"TableStatistics": tables_ok()}, STATS)
        stub.add_response("describe_table_statistics", {"TableStatistics": tables_ok()}, STATS)
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)   # cdc_latency
        stub.add_response("describe_replication_instances", {"ReplicationInstances": [
            {"ReplicationInstanceIdentifier": "tern-dms-instance"}]})
        c_stub.add_response("get_metric_statistics", {"Datapoints": [{"Timestamp": now, "Maximum": 3.0}]},
                            {"Namespace": "AWS/DMS", "MetricName": "CDCLatencySource", "StartTime": ANY,
                             "EndTime": ANY, "Period": 60, "Statistics": ["Maximum"], "Dimensions": ANY})
        c_stub.add_response("get_metric_statistics", {"Datapoints": [{"Timestamp": now, "Maximum": 90.0}]})
        engine = DmsEngine(outputs(), task=task_for(dms, cloudwatch=cw), slot="abc_00016393_dms")
        ctx = FakeCtx(outputs())
        with pytest.raises(PreflightError, match="public.orders: 7 failed records"):
            engine.check_ready(ctx, ctx.replica("ec2-b"))
        with pytest.raises(PreflightError, match="90 s behind the leader .CDCLatencyTarget."):
            engine.check_ready(ctx, ctx.replica("ec2-b"))
        stub.assert_no_pending_responses()


# -- failover-aurora: catch-up proof and the switch-over -------------------------------------------------------
def test_catch_up_proof_is_the_sentinel_and_a_failed_task_or_lost_slot_fails_at_once(monkeypatch):
    dms = offline("dms")
    seen = iter([False, True])
    monkeypatch.setattr(engines, "sentinel_on_aurora", lambda ctx: next(seen))
    clock = FakeClock()
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        stub.add_response("describe_replication_tasks", described(
            "stopped", stop_reason="Stop Reason FATAL_ERROR", failure="could not receive data from WAL stream"),
            DESCRIBE)
        engine = DmsEngine(outputs(), task=task_for(dms), slot="abc_00016393_dms", clock=clock)
        ctx = FakeCtx(outputs())
        assert engine.applied_final(ctx) is None                    # the sentinel not there yet
        clock.t += 0.5
        proof = engine.applied_final(ctx)                           # the task is looked at every 2 s, not 50 ms
        assert proof and "sentinel failover-aurora-20260501T120000-1 on Aurora" in proof
        clock.t += 5
        with pytest.raises(StepError, match="DMS task failed .*FATAL_ERROR.*WAL stream.*Falling back"):
            engine.applied_final(ctx)
        stub.assert_no_pending_responses()
    lost = FakeCtx(outputs(), pg=FakeLeader(slot_state={"now": "0/5000000", "slot": True, "confirmed": "0/3000000",
                                                         "active": False, "wal_status": "lost", "safe_wal_size": 0}))
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        with pytest.raises(StepError, match="slot abc_00016393_dms on the EC2 leader is lost"):
            DmsEngine(outputs(), task=task_for(dms), slot="abc_00016393_dms").applied_final(lost)


def test_switch_over_stops_the_task_and_a_failed_one_is_not_crossed():
    dms = offline("dms")
    clock = FakeClock()
    with Stubber(dms) as stub:
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)       # forward_running
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)       # stop
        stub.add_response("stop_replication_task", {"ReplicationTask": {"ReplicationTaskArn": ARN,
                                                                        "Status": "stopping"}},
                          {"ReplicationTaskArn": ARN})
        stub.add_response("describe_replication_tasks", described("stopping"), DESCRIBE)
        stub.add_response("describe_replication_tasks", described(
            "stopped", stop_reason="Stop Reason NORMAL", stopped_at=T0), DESCRIBE)
        stub.add_response("describe_replication_tasks", described(
            "stopped", stop_reason="Stop Reason NORMAL", stopped_at=T0), DESCRIBE)               # resumed run
        stub.add_response("describe_replication_tasks", described(
            "failed", failure="Last Error Replication task out of memory"), DESCRIBE)
        engine = DmsEngine(outputs(), task=task_for(dms, clock))
        ctx = FakeCtx(outputs())
        assert engine.forward_running(ctx) is True
        assert engine.stop_forward(ctx) == "DMS task stopped"
        assert engine.forward_running(ctx) is False          # a resumed switch_over does not stop it twice
        with pytest.raises(NotPromoted, match="out of memory"):
            engine.forward_running(ctx)
        stub.assert_no_pending_responses()


# -- status ---------------------------------------------------------------------------------------------------------
def test_status_reports_tables_validation_and_lag_through_the_interface(monkeypatch):
    import runbook.status

    dms, cw = offline("dms"), offline("cloudwatch")
    leader = FakeLeader()
    monkeypatch.setattr(runbook.status, "replica_host", lambda r: leader)
    now = dt.datetime.now(dt.timezone.utc)
    with Stubber(dms) as stub, Stubber(cw) as c_stub:
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        stub.add_response("describe_table_statistics", {"TableStatistics": [
            *tables_ok()[:2], table("sentinel", "Pending records", schema="tern", ValidationPendingRecords=2)]}, STATS)
        stub.add_response("describe_table_statistics", {"TableStatistics": tables_ok()}, STATS)
        stub.add_response("describe_replication_tasks", described("running"), DESCRIBE)
        stub.add_response("describe_replication_instances", {"ReplicationInstances": [
            {"ReplicationInstanceIdentifier": "tern-dms-instance"}]})
        c_stub.add_response("get_metric_statistics", {"Datapoints": [{"Timestamp": now, "Maximum": 1.0}]})
        c_stub.add_response("get_metric_statistics", {"Datapoints": [{"Timestamp": now, "Maximum": 2.5}]})
        out = DmsEngine(outputs(), task=task_for(dms, cloudwatch=cw)).status(outputs().replicas[1], timeout=5,
                                                                               sample_seconds=2)
        stub.assert_no_pending_responses()
    assert set(out) == set(engines.STATUS_KEYS)
    assert out["state"] == "streaming" and out["engine"] == "dms" and out["leader"] == "ec2-b"
    assert out["tables_ready"] == out["tables_total"] == 3 and out["tables"]["public.orders"] == "Table completed"
    assert out["validation"]["summary"] == {"validated": 2, "failed_records": 0, "suspended_records": 0,
                                            "pending_records": 2}
    assert out["lag_seconds"] == 2.5 and out["cdc_latency"]["CDCLatencySource"] == 1.0
    assert out["slot"] == "abc_00016393_dms" and out["lag_bytes"] == 0x100 and out["slot_active"] is True
    assert out["error"] is None


def test_status_of_a_failed_task_says_why_and_never_raises():
    dms = offline("dms")
    with Stubber(dms) as stub:
        stub.add_client_error("describe_replication_tasks", "AccessDeniedFault", "not authorized")
        out = DmsEngine(outputs(), task=task_for(dms)).status(outputs().replicas[1], timeout=5, sample_seconds=2)
    assert out["state"] == "unreachable" and "AccessDeniedFault" in out["error"]


# -- the DMS risk register (pure) -----------------------------------------------------------------------------------
INFRA_SETTINGS = {"TargetMetadata": {"SupportLobs": True, "FullLobMode": True, "LobChunkSize": 64,
                                     "LimitedSizeLobMode": False, "LobMaxSize": 0},
                  "FullLoadSettings": {"TargetTablePrepMode": "DO_NOTHING"},
                  "ValidationSettings": {"EnableValidation": True}, "ChangeProcessingTuning": {"BatchApplyEnabled": False},
                  "ControlTablesSettings": {"ControlSchema": "tern"}}
INFRA_MAPPINGS = {"rules": [
    {"rule-type": "selection", "rule-id": "1", "rule-name": "schema-public", "rule-action": "include",
     "object-locator": {"schema-name": "public", "table-name": "%"}},
    {"rule-type": "selection", "rule-id": "2", "rule-name": "tern-sentinel", "rule-action": "include",
     "object-locator": {"schema-name": "tern", "table-name": "sentinel"}}]}
FACTS = {"lob_columns": ["public.orders.notes (text)", "public.orders.meta (jsonb)"],
         "json_max_bytes": {"public.orders.meta": 300 * 1024}, "odd_types": [], "pglogical": False,
         "tables": ["public.orders", "public.items", "tern.sentinel"], "triggers": ["public.orders: audit"]}
DEFINITION = {"migration_type": "full-load-and-cdc", "settings": INFRA_SETTINGS, "mappings": INFRA_MAPPINGS}
SOURCE_EP = {"PostgreSQLSettings": {"CaptureDdls": False, "PluginName": "test_decoding"}}
TARGET_EP = {"PostgreSQLSettings": {"AfterConnectScript": "SET session_replication_role = replica"}}


def blocks(findings):
    return {f.risk for f in findings if f.severity == "block"}


def test_the_declared_task_passes_and_each_dms_pitfall_is_named():
    findings = risks.dms_findings(FACTS, DEFINITION, SOURCE_EP, TARGET_EP)
    assert blocks(findings) == set()
    by_risk = {f.risk: f for f in findings}
    assert by_risk["LOB columns (DMS)"].severity == "info" and "full LOB mode" in by_risk["LOB columns (DMS)"].action
    assert by_risk["JSON(B) values above 100 KB (DMS)"].severity == "warn"
    assert by_risk["DDL"].severity == "info"

    limited = {**DEFINITION, "settings": {**INFRA_SETTINGS, "TargetMetadata": {
        "SupportLobs": True, "FullLobMode": False, "LimitedSizeLobMode": True, "LobMaxSize": 32}}}
    assert {"LOB columns (DMS)", "JSON(B) values above 100 KB (DMS)"} <= blocks(
        risks.dms_findings(FACTS, limited, SOURCE_EP, TARGET_EP))
    batch = {**DEFINITION, "settings": {**INFRA_SETTINGS, "ChangeProcessingTuning": {"BatchApplyEnabled": True}}}
    assert "DMS batch apply" in blocks(risks.dms_findings(FACTS, batch, SOURCE_EP, TARGET_EP))
    public_only = {**DEFINITION, "mappings": {"rules": INFRA_MAPPINGS["rules"][:1]}}
    assert "tern's sentinel table not in the DMS task" in blocks(
        risks.dms_findings(FACTS, public_only, SOURCE_EP, TARGET_EP))
    other_schema = {**FACTS, "tables": FACTS["tables"] + ["billing.invoices"]}
    found = risks.dms_findings(other_schema, DEFINITION, SOURCE_EP, TARGET_EP)
    assert [f.objects for f in found if f.risk == "tables the DMS task does not select"] == [["billing.invoices"]]
    default_control = {**DEFINITION, "settings": {k: v for k, v in INFRA_SETTINGS.items() if k != "ControlTablesSettings"}}
    assert "DMS control tables on Aurora" in blocks(risks.dms_findings(FACTS, default_control, SOURCE_EP, TARGET_EP))
    assert "DMS DDL capture on the leader" in blocks(risks.dms_findings(FACTS, DEFINITION, {}, TARGET_EP))
    assert "DMS decoding plugin" in blocks(risks.dms_findings(
        FACTS, DEFINITION, {"PostgreSQLSettings": {"CaptureDdls": False, "PluginName": "pglogical"}}, TARGET_EP))
    assert "triggers that would fire on DMS's writes" in blocks(risks.dms_findings(FACTS, DEFINITION, SOURCE_EP, {}))
    assert "DMS target table preparation" in blocks(risks.dms_findings(FACTS, {**DEFINITION, "settings": {
        **INFRA_SETTINGS, "FullLoadSettings": {"TargetTablePrepMode": "DROP_AND_CREATE"}}}, SOURCE_EP, TARGET_EP))
    assert "native subscription on Aurora" in blocks(risks.dms_findings(FACTS, DEFINITION, SOURCE_EP, TARGET_EP,
                                                                        native_subscription=True))
    never = SimpleNamespace(status="ready", never_started=True, failure=None)
    assert "Aurora's tables hold rows" in blocks(risks.dms_findings(FACTS, DEFINITION, SOURCE_EP, TARGET_EP,
                                                                    task_status=never, aurora_has_rows=True))
    failed = SimpleNamespace(status="failed-move", never_started=False, failure="status failed-move")
    assert "DMS task state" in blocks(risks.dms_findings(FACTS, DEFINITION, SOURCE_EP, TARGET_EP, task_status=failed))


# -- native through the same interface: status unchanged -----------------------------------------------------------
def test_status_dispatches_to_the_recorded_engine_and_native_reports_as_before(monkeypatch, tmp_path):
    import contextlib

    import runbook.status
    from runbook.replication import native

    look = {"slot": True, "lag_bytes": 0, "active": True, "wal_status": "reserved", "leader_lsn": "0/3000000",
            "confirmed_lsn": "0/3000000", "applied_lsn": "0/3000000", "replay_lag": None, "safe_wal_size": 1 << 30,
            "at": 100.0}
    monkeypatch.setattr(native, "master_connection", lambda url, timeout: contextlib.nullcontext(object()))
    monkeypatch.setattr(native, "subscription_enabled", lambda m: True)
    monkeypatch.setattr(native, "table_states", lambda m: {"public.orders": "r", "tern.sentinel": "r"})
    monkeypatch.setattr(native, "sample", lambda pg, seconds, sleep: ({**look, "at": 98.0}, look))
    monkeypatch.setattr(runbook.status, "replica_host", lambda r: object())
    monkeypatch.setattr(engines, "aurora_master_url", lambda o: "postgresql://aurora/app")
    out = outputs()
    monkeypatch.setattr(setup, "leader", lambda app, o: o.replicas[1])
    monkeypatch.setattr(setup, "app_for", lambda app: None)
    out.app = None
    rep = setup.replication_status(out, timeout=5, sample_seconds=2, state_dir=tmp_path)
    assert rep["engine"] == "native" and rep["state"] == "streaming" and rep["subscription"] == "tern_aurora"
    assert rep["tables_ready"] == rep["tables_total"] == 2 and rep["lag_bytes"] == 0 and rep["lag_seconds"] == 0.0
    assert rep["task"] is None and rep["validation"] is None and set(rep) == set(engines.STATUS_KEYS)
    # once replicate-aurora ran with DMS on this stack, status asks the DMS engine
    _journal(tmp_path, "dms")
    asked = []
    monkeypatch.setattr(DmsEngine, "status", lambda self, leader, **kw: asked.append(leader.name) or {"engine": "dms"})
    assert setup.replication_status(out, timeout=5, sample_seconds=2, state_dir=tmp_path) == {"engine": "dms"}
    assert asked == ["ec2-b"]
