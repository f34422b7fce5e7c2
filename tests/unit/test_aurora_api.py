"""The Aurora adapter: its statement filter, the RDS path (botocore Stubber, moto) and secrets kept out of errors."""

from __future__ import annotations

import copy
import doctest

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from runbook import contract
from runbook.adapters import aurora as aurora_mod
from runbook.adapters.aurora import (AURORA_PG15_EXTENSIONS, LocalAuroraApi, RdsAuroraApi, aurora_api_for,
                                     read_only_query_of, subscription_statement_of)
from runbook.errors import ConfigError, ContractError, DatabaseError, RunbookError, TimeoutExpired

REGION = "us-east-1"
CONN_PASSWORD = "repl-Pw-7f3c9e"
MASTER_PASSWORD = "master-Pw-51d0aa"
GOOD_SUB = f"CREATE SUBSCRIPTION tern_sub CONNECTION 'host=10.0.0.1 user=tern_replicator password={CONN_PASSWORD}' " \
           "PUBLICATION tern_pub WITH (connect = false)"

AURORA = {"writer_endpoint": "w.cluster", "reader_endpoint": "r.cluster", "port": 5432, "database": "app",
          "master_user": "tern_master", "master_password": "env:TERN_TEST_AURORA_MASTER"}
RDS_API = {"kind": "rds", "cluster_identifier": "tern-aurora-cluster", "parameter_group": "tern-aurora-params",
           "region": REGION}
LOCAL_API = {"kind": "local", "bin_dir": "/usr/lib/postgresql/15/bin", "data_dir": "/tmp/x/nodes/aurora/data",
             "socket_dir": "/tmp/x/nodes/aurora/run", "port": 55432, "os_user": "postgres", "superuser": "postgres"}


def aurora(api):
    return contract.Aurora.model_validate({**AURORA, "api": api})


def test_doctests():
    failures, tried = doctest.testmod(aurora_mod)
    assert tried >= 3 and failures == 0


# -- the statement filter ----------------------------------------------------------------------------

@pytest.mark.parametrize("sql, command", [
    (GOOD_SUB, "CREATE SUBSCRIPTION"),
    ("alter   subscription tern_sub DISABLE;", "ALTER SUBSCRIPTION"),
    ("-- tidy up\n/* nested /* comment; */ */ DROP SUBSCRIPTION IF EXISTS tern_sub ;  \n", "DROP SUBSCRIPTION"),
    ("CREATE SUBSCRIPTION s CONNECTION 'password=a;b''c' PUBLICATION p", "CREATE SUBSCRIPTION"),   # ; in a literal
    ("CREATE SUBSCRIPTION s CONNECTION $q$password=x; DROP TABLE y$q$ PUBLICATION p", "CREATE SUBSCRIPTION"),
    ('ALTER SUBSCRIPTION "we;ird" SET (slot_name = NONE)', "ALTER SUBSCRIPTION"),
    ("ALTER SUBSCRIPTION s CONNECTION E'password=it\\'s;x'", "ALTER SUBSCRIPTION"),
])
def test_subscription_statements_pass(sql, command):
    statement = subscription_statement_of(sql)
    assert statement.command == command
    assert not statement.text.rstrip().endswith(";")


@pytest.mark.parametrize("sql, message", [
    (GOOD_SUB + "; DROP TABLE y", "one SQL statement expected, got 2"),
    ("DROP SUBSCRIPTION s; DROP SUBSCRIPTION t", "one SQL statement expected, got 2"),
    ("DROP TABLE orders", "not DROP TABLE"),
    ("ALTER SYSTEM SET wal_level = logical", "not ALTER SYSTEM"),
    ("SELECT 1", "not SELECT"),
    ("CREATE PUBLICATION p FOR ALL TABLES", "not CREATE PUBLICATION"),
    ("-- CREATE SUBSCRIPTION\nDROP DATABASE app", "not DROP DATABASE"),
    ("/* CREATE SUBSCRIPTION */ ALTER ROLE tern_master SUPERUSER", "not ALTER ROLE"),
    ("", "got 0"),
    (" ; ", "got 0"),
    (GOOD_SUB + " \\! id", "backslash"),
    ("DROP SUBSCRIPTION :name", "psql variable"),
    ("DROP SUBSCRIPTION s \\gexec", "backslash"),
    ("CREATE SUBSCRIPTION s CONNECTION 'password=x PUBLICATION p", "unterminated string"),
    ("CREATE SUBSCRIPTION s /* CONNECTION", "unterminated /*"),
    ("CREATE SUBSCRIPTION s CONNECTION $a$x PUBLICATION p", "unterminated dollar"),
])
def test_everything_else_is_refused_without_echo(sql, message):
    with pytest.raises(ConfigError, match=message) as exc:
        subscription_statement_of(sql)
    assert CONN_PASSWORD not in str(exc.value) and "password=" not in str(exc.value)


def test_query_filter():
    assert read_only_query_of("WITH s AS (SELECT 1) SELECT * FROM s").command == "WITH S"
    assert read_only_query_of("select subname, subconninfo from pg_subscription").words[0] == "SELECT"
    for bad in ("DELETE FROM orders", "SELECT 1; SELECT 2", "UPDATE x SET y = 1", "COPY x TO PROGRAM 'id'"):
        with pytest.raises(ConfigError):
            read_only_query_of(bad)


class FakePg:
    """Stands in for the Aurora node's PgHost: records every script; answers the reload probe."""

    def __init__(self, *, fail: str | None = None, pending: bool = False):
        self.scripts: list[tuple[str, str]] = []
        self.fail, self.pending, self.loads = fail, pending, 0

    def psql(self, script, *, database=None, timeout=30):
        self.scripts.append((script, database))
        if self.fail:
            raise DatabaseError(f"aurora: SQL failed: {self.fail}")
        if "pg_reload_conf" in script:
            self.loads += 1
        return '[{"subname": "s", "subenabled": true}]\n'

    def query_one(self, select, **kw):
        if "pg_conf_load_time" in select:
            return {"loaded_at": f"t{self.loads}"}
        return {"pending": self.pending}


def local_api(fake: FakePg) -> LocalAuroraApi:
    api = LocalAuroraApi(aurora(LOCAL_API), sleep=lambda s: None)
    api.pg = fake
    return api


def test_local_refusal_runs_nothing_and_statement_runs_alone():
    fake = FakePg()
    api = local_api(fake)
    with pytest.raises(ConfigError):
        api.subscription_statement(GOOD_SUB + "; DROP TABLE y", "app")
    with pytest.raises(ConfigError, match="allow-list"):
        api.create_extension("adminpack", "app")
    assert fake.scripts == []
    api.subscription_statement(GOOD_SUB, "app", timeout=5)
    (script, database), = fake.scripts
    assert database == "app" and script.endswith(GOOD_SUB + ";\n") and "statement_timeout = 5000" in script
    assert api.query("SELECT subname, subenabled FROM pg_subscription", "app") == [{"subname": "s", "subenabled": True}]
    assert "BEGIN READ ONLY" in fake.scripts[-1][0]


def test_local_error_never_shows_the_connection_password():
    # psql echoes the failing line, CONNECTION string included
    fake = FakePg(fail=f"ERROR:  syntax error at or near \"PUBLICATIO\"\nLINE 1: CREATE SUBSCRIPTION tern_sub "
                       f"CONNECTION 'host=10.0.0.1 user=tern_replicator password={CONN_PASSWORD}' PUBLICATIO")
    with pytest.raises(DatabaseError) as exc:
        local_api(fake).subscription_statement(GOOD_SUB.replace("PUBLICATION", "PUBLICATIO"), "app")
    assert CONN_PASSWORD not in str(exc.value) and "syntax error" in str(exc.value)


def test_local_parameters_play_aurora_names_and_report_pending_restart():
    fake = FakePg(pending=True)
    api = local_api(fake)
    assert api.set_parameters({"rds.logical_replication": "1", "max_logical_replication_workers": "8"}) is True
    script = next(s for s, _ in fake.scripts if "ALTER SYSTEM" in s)
    assert "ALTER SYSTEM SET wal_level = 'logical';" in script
    assert "ALTER SYSTEM SET max_logical_replication_workers = '8';" in script
    with pytest.raises(ConfigError, match="does not emulate rds.force_ssl"):
        api.set_parameters({"rds.force_ssl": "1"})
    with pytest.raises(ConfigError, match="not a parameter name"):
        api.set_parameters({"wal_level = minimal; --": "x"})


# -- the contract and the factory -------------------------------------------------------------------

def test_contract_api_union_and_factory():
    with pytest.raises(ContractError, match="aurora.api is missing"):
        aurora_api_for(contract.Aurora.model_validate(AURORA))
    assert isinstance(aurora_api_for(aurora(LOCAL_API)), LocalAuroraApi)
    rds = boto3.client("rds", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    assert isinstance(aurora_api_for(aurora(RDS_API), rds=rds), RdsAuroraApi)
    bad = copy.deepcopy(RDS_API)
    del bad["parameter_group"]
    with pytest.raises(Exception, match="parameter_group"):
        aurora(bad)
    with pytest.raises(Exception, match="kind"):
        aurora({**RDS_API, "kind": "gcp"})


def test_allowed_extensions():
    api = LocalAuroraApi(aurora(LOCAL_API))
    allowed = api.allowed_extensions()
    assert {"plpgsql", "pg_stat_statements", "pgcrypto", "uuid-ossp", "hstore", "citext", "pg_trgm", "btree_gin",
            "btree_gist", "postgis", "amcheck"} <= allowed
    assert not {"adminpack", "file_fdw", "plpython3u", "pageinspect"} & allowed
    allowed.add("mutable")
    assert "mutable" not in AURORA_PG15_EXTENSIONS and "mutable" not in api.allowed_extensions()


# -- RDS ----------------------------------------------------------------------------------------------

def rds_client():
    return boto3.client("rds", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")


def cluster_response(status="in-sync"):
    return {"DBClusters": [{"DBClusterIdentifier": "tern-aurora-cluster", "DBClusterMembers": [
        {"DBInstanceIdentifier": "tern-aurora-2", "IsClusterWriter": False, "DBClusterParameterGroupStatus": status},
        {"DBInstanceIdentifier": "tern-aurora-1", "IsClusterWriter": True, "DBClusterParameterGroupStatus": status},
    ]}]}


def test_rds_set_parameters_static_pending_reboot_dynamic_immediate():
    rds = rds_client()
    stub = Stubber(rds)
    group = {"DBClusterParameterGroupName": "tern-aurora-params"}
    stub.add_response("describe_db_cluster_parameters", {"Parameters": [
        {"ParameterName": "rds.logical_replication", "ParameterValue": "0", "ApplyType": "static",
         "IsModifiable": True},
        {"ParameterName": "work_mem", "ApplyType": "dynamic", "IsModifiable": True}], "Marker": "m1"}, group)
    stub.add_response("describe_db_cluster_parameters", {"Parameters": [
        {"ParameterName": "max_logical_replication_workers", "ParameterValue": "8", "ApplyType": "static",
         "IsModifiable": True},
        {"ParameterName": "log_min_duration_statement", "ApplyType": "dynamic", "IsModifiable": True}]},
        {**group, "Marker": "m1"})
    stub.add_response("modify_db_cluster_parameter_group", {"DBClusterParameterGroupName": "tern-aurora-params"}, {
        **group, "Parameters": [
            {"ParameterName": "rds.logical_replication", "ParameterValue": "1", "ApplyMethod": "pending-reboot"},
            {"ParameterName": "log_min_duration_statement", "ParameterValue": "1000", "ApplyMethod": "immediate"}]})
    with stub:   # a static parameter changed: a reboot is needed, no need to ask the cluster
        api = RdsAuroraApi(aurora(RDS_API), rds=rds, sleep=lambda s: None)
        # max_logical_replication_workers already 8: not modified again
        assert api.set_parameters({"rds.logical_replication": "1", "max_logical_replication_workers": "8",
                                   "log_min_duration_statement": "1000"}) is True
        stub.assert_no_pending_responses()


def test_rds_set_parameters_already_set_and_errors():
    rds = rds_client()
    stub = Stubber(rds)
    params = {"Parameters": [
        {"ParameterName": "rds.logical_replication", "ParameterValue": "1", "ApplyType": "static", "IsModifiable": True},
        {"ParameterName": "wal_level", "ParameterValue": "logical", "ApplyType": "static", "IsModifiable": False}]}
    stub.add_response("describe_db_cluster_parameters", params)
    stub.add_response("describe_db_clusters", cluster_response("pending-reboot"))   # set earlier, not yet rebooted
    stub.add_response("describe_db_cluster_parameters", params)
    stub.add_response("describe_db_cluster_parameters", params)
    stub.add_client_error("describe_db_cluster_parameters", "DBParameterGroupNotFound", "group tern-x not found")
    with stub:
        api = RdsAuroraApi(aurora(RDS_API), rds=rds, sleep=lambda s: None)
        assert api.set_parameters({"rds.logical_replication": "1"}) is True
        with pytest.raises(ConfigError, match="no parameter rds.nonsense"):
            api.set_parameters({"rds.nonsense": "1"})
        with pytest.raises(ConfigError, match="not let these parameters be modified: wal_level"):
            api.set_parameters({"wal_level": "replica"})
        with pytest.raises(RunbookError, match="DBParameterGroupNotFound"):
            api.set_parameters({"work_mem": "1"})
        stub.assert_no_pending_responses()


def test_rds_reboot_waits_for_available_and_in_sync():
    rds = rds_client()
    stub = Stubber(rds)
    stub.add_response("describe_db_clusters", cluster_response("pending-reboot"))
    stub.add_response("reboot_db_instance", {"DBInstance": {"DBInstanceIdentifier": "tern-aurora-1",
                                                            "DBInstanceStatus": "rebooting"}},
                      {"DBInstanceIdentifier": "tern-aurora-1"})
    stub.add_response("describe_db_instances", {"DBInstances": [{"DBInstanceStatus": "rebooting"}]},
                      {"DBInstanceIdentifier": "tern-aurora-1"})
    stub.add_response("describe_db_instances", {"DBInstances": [{"DBInstanceStatus": "available"}]})
    stub.add_response("describe_db_clusters", cluster_response("in-sync"))
    slept = []
    with stub:
        RdsAuroraApi(aurora(RDS_API), rds=rds, sleep=slept.append, poll_interval=5).reboot(timeout=60)
        stub.assert_no_pending_responses()
    assert slept == [5]


def test_rds_reboot_is_bounded():
    rds = rds_client()
    stub = Stubber(rds)
    stub.add_response("describe_db_clusters", cluster_response())
    stub.add_response("reboot_db_instance", {"DBInstance": {"DBInstanceStatus": "rebooting"}})
    for _ in range(4):
        stub.add_response("describe_db_instances", {"DBInstances": [{"DBInstanceStatus": "rebooting"}]})
    t = [0.0]
    with stub:
        api = RdsAuroraApi(aurora(RDS_API), rds=rds, poll_interval=10, clock=lambda: t[0],
                           sleep=lambda s: t.__setitem__(0, t[0] + s))
        with pytest.raises(TimeoutExpired, match="tern-aurora-1 to reboot.*status rebooting"):
            api.reboot(timeout=30)


def test_rds_snapshot_through_moto():
    with mock_aws():
        rds = boto3.client("rds", region_name=REGION)
        rds.create_db_cluster(DBClusterIdentifier="tern-aurora-cluster", Engine="aurora-postgresql",
                              MasterUsername="tern_master", MasterUserPassword="x" * 12)
        api = RdsAuroraApi(aurora(RDS_API), rds=rds, sleep=lambda s: None)
        assert not api.snapshot_exists("hop2_before")
        ident = api.snapshot("hop2_before", timeout=30)
        assert ident == "tern-hop2-before" and api.snapshot_exists("hop2_before")
        assert api.snapshot("hop2_before", timeout=30) == ident
        snaps = rds.describe_db_cluster_snapshots(DBClusterIdentifier="tern-aurora-cluster",
                                                  SnapshotType="manual")["DBClusterSnapshots"]
        assert len(snaps) == 1


class FakeConn:
    def __init__(self, calls, fail=None, row=None):
        self.calls, self.fail, self.row = calls, fail, row

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, statement):
        self.calls.append(statement)
        if self.fail:
            raise self.fail
        return self

    @property
    def description(self):
        return None if self.row is None else [("json",)]

    def fetchone(self):
        return self.row


def test_rds_statements_run_as_master_and_errors_hide_every_password(monkeypatch):
    import psycopg

    monkeypatch.setenv("TERN_TEST_AURORA_MASTER", MASTER_PASSWORD)
    calls, opened = [], []

    def connect(url, *, purpose, timeout, options):
        opened.append((url, purpose, options))
        return FakeConn(calls)

    api = RdsAuroraApi(aurora(RDS_API), rds=rds_client(), connect=connect)
    api.subscription_statement(GOOD_SUB, "app", timeout=30)
    (url, purpose, options), = opened
    assert url.startswith("postgresql://tern_master:") and "@w.cluster:5432/app?sslmode=require" in url
    assert MASTER_PASSWORD in url and "statement_timeout=30000" in options and purpose == "aurora-subscription"
    assert calls == [GOOD_SUB]

    with pytest.raises(ConfigError):
        api.subscription_statement("DROP TABLE y", "app")
    assert len(calls) == 1

    def failing(url, **kw):
        # the server quotes the statement back; neither password may survive (not even outside "password=")
        return FakeConn(calls, fail=psycopg.errors.SyntaxError(
            f'syntax error at or near "{CONN_PASSWORD}"\nLINE 1: ...password={CONN_PASSWORD} (as {MASTER_PASSWORD})'))

    api = RdsAuroraApi(aurora(RDS_API), rds=rds_client(), connect=failing)
    with pytest.raises(DatabaseError) as exc:
        api.subscription_statement(GOOD_SUB, "app")
    text = str(exc.value)
    assert "SyntaxError" in text and CONN_PASSWORD not in text and MASTER_PASSWORD not in text


def test_rds_query_is_read_only_json(monkeypatch):
    monkeypatch.setenv("TERN_TEST_AURORA_MASTER", MASTER_PASSWORD)
    calls, opened = [], []

    def connect(url, *, purpose, timeout, options):
        opened.append(options)
        return FakeConn(calls, row=([{"subname": "s", "received_lsn": "0/1"}],))

    api = RdsAuroraApi(aurora(RDS_API), rds=rds_client(), connect=connect)
    assert api.query("SELECT subname, received_lsn FROM pg_stat_subscription", "app") == \
        [{"subname": "s", "received_lsn": "0/1"}]
    assert "default_transaction_read_only=on" in opened[0]
    assert calls[0].startswith("SELECT coalesce(json_agg(t), '[]'::json) FROM (SELECT subname")


def test_adapters_say_how_they_are_reached_so_plans_never_check_their_kind():
    """No adapter detail inside a plan: the TLS mode to Aurora and whether tern reaches a server's socket
    come from the adapters (the plans once compared ``kind == "local"``)."""
    import re
    from pathlib import Path

    from runbook.adapters.aurora import LocalAuroraApi, RdsAuroraApi
    from runbook.adapters.local_host import LocalHost
    from runbook.adapters.ssm_host import SsmHost

    assert (LocalAuroraApi.sslmode, RdsAuroraApi.sslmode) == ("prefer", "require")
    assert LocalHost.local_socket is True and SsmHost.local_socket is False
    plans = Path(__file__).resolve().parents[2] / "runbook" / "failover"
    offenders = [f"{p.name}:{n}" for p in plans.glob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"\.kind == ['\"]", line)]
    assert offenders == []
