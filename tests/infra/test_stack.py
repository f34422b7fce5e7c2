"""The Pulumi program under Pulumi's mocks, for both stack configs: policies and the outputs contract.

Every test is decorated with ``@pulumi.runtime.test`` and returns the Output it checks;
an undecorated test would pass without its assertions ever running.
"""

from __future__ import annotations

import json
from pathlib import Path

import pulumi
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET = "pw-from-config-secret-4f1c"


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[tuple[str, str, dict]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        name = args.name
        state.setdefault("arn", f"arn:aws:mock:us-east-1:123456789012:{name}")
        if args.typ == "aws:ec2/instance:Instance":
            state["private_ip"] = f"10.0.{len(self.resources) % 250}.10"
        if args.typ == "aws:rds/cluster:Cluster":
            state["endpoint"] = f"{name}.cluster-abc.us-east-1.rds.amazonaws.com"
            state["reader_endpoint"] = f"{name}.cluster-ro-abc.us-east-1.rds.amazonaws.com"
            state["master_user_secrets"] = [{"secret_arn": "arn:aws:secretsmanager:us-east-1:1:secret:rds!cluster-1",
                                             "secret_status": "active", "kms_key_id": "k"}]
        if args.typ == "aws:dms/replicationTask:ReplicationTask":
            state["replication_task_arn"] = f"arn:aws:dms:us-east-1:1:task:{name}"
        if args.typ == "aws:dms/replicationInstance:ReplicationInstance":
            state["replication_instance_arn"] = f"arn:aws:dms:us-east-1:1:rep:{name}"
        if args.typ == "aws:dms/endpoint:Endpoint":
            state["endpoint_arn"] = f"arn:aws:dms:us-east-1:1:endpoint:{name}"
        self.resources.append((args.typ, name, state))
        return f"{name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "architecture": "x86_64"}
        if args.token.startswith("heroku:app/getApp"):
            return {"id": "app-id", "uuid": "1f1f1f1f-0000-4000-8000-000000000001", "name": args.args.get("name")}
        return {}


def stack_config(stack: str):
    from infra.config import from_mapping

    data = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    values = {k: v for k, v in data.items() if k.startswith("tern:") and k != "tern:replication_password"}
    return from_mapping(values, replication_password=pulumi.Output.secret(SECRET))


@pytest.fixture(params=["dev", "prod"])
def built(request):
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="tern", stack=request.param, preview=False)
    from infra.stack import build

    stack = build(stack_config(request.param), request.param)
    return request.param, stack, mocks


def all_registered(stack) -> pulumi.Output:
    """An Output that resolves once every resource of the stack is registered."""
    resources = [stack.network.replicas, stack.network.aurora, stack.network.dms, stack.replicas.launch_template,
                 *stack.replicas.instances, stack.aurora.cluster, *stack.aurora.instances, stack.aurora.parameter_group,
                 stack.aurora.key, stack.dms.task, stack.dms.source, stack.dms.target, stack.dms.instance,
                 stack.heroku.staged, stack.replication_secret]
    return pulumi.Output.all(*[r.urn for r in resources])


def of_type(mocks, typ):
    return [(name, state) for t, name, state in mocks.resources if t == typ]


@pulumi.runtime.test
def test_outputs_are_the_runbook_contract(built):
    stack_name, stack, mocks = built
    from runbook.contract import parse

    def check(outputs):
        contract = parse(outputs, origin=f"stack {stack_name}")
        assert contract.stack == stack_name and contract.rehearsal is (stack_name == "dev")
        assert [r.commands.kind for r in contract.replicas] == ["ssm"] * len(contract.replicas)
        assert contract.aurora.master_password.startswith("aws-secretsmanager:")
        assert SECRET not in json.dumps(outputs)
        return True

    return pulumi.Output.from_input(stack.outputs).apply(check)


@pulumi.runtime.test
def test_no_world_open_ingress_and_no_ssh(built):
    _, stack, mocks = built

    def check(_):
        groups = of_type(mocks, "aws:ec2/securityGroup:SecurityGroup")
        assert len(groups) == 3
        for name, state in groups:
            for rule in state.get("ingress") or []:
                assert not set(rule.get("cidrBlocks") or []) & {"0.0.0.0/0"}, name
                assert not set(rule.get("ipv6CidrBlocks") or []) & {"::/0"}, name
                assert rule["fromPort"] == 5432 and rule["toPort"] == 5432, (name, rule)
                assert not (rule["fromPort"] <= 22 <= rule["toPort"]), name
        replicas = dict(groups)["tern-replicas"]["ingress"]
        assert any(r.get("self") for r in replicas), "replicas must reach each other"
        aurora = dict(groups)["tern-aurora"]["ingress"]
        assert all(r.get("self") is not True for r in aurora)
        return True

    return all_registered(stack).apply(check)


@pulumi.runtime.test
def test_encryption_imdsv2_no_public_ip(built):
    _, stack, mocks = built

    def check(_):
        (lt_name, lt), = of_type(mocks, "aws:ec2/launchTemplate:LaunchTemplate")
        assert lt["metadataOptions"]["httpTokens"] == "required"
        for bdm in lt["blockDeviceMappings"]:
            assert bdm["ebs"]["encrypted"] == "true" and bdm["ebs"]["volumeType"] == "gp3"
        for name, inst in of_type(mocks, "aws:ec2/instance:Instance"):
            assert inst["metadataOptions"]["httpTokens"] == "required", name
            assert inst["associatePublicIpAddress"] is False, name
            assert inst["rootBlockDevice"]["encrypted"] is True, name
        (c_name, cluster), = of_type(mocks, "aws:rds/cluster:Cluster")
        assert cluster["storageEncrypted"] is True and cluster["kmsKeyId"]
        assert cluster["manageMasterUserPassword"] is True and "masterPassword" not in cluster
        for name, inst in of_type(mocks, "aws:rds/clusterInstance:ClusterInstance"):
            assert inst["publiclyAccessible"] is False, name
        (pg_name, params), = of_type(mocks, "aws:rds/clusterParameterGroup:ClusterParameterGroup")
        values = {p["name"]: p["value"] for p in params["parameters"]}
        assert values["rds.force_ssl"] == "1" and values["rds.logical_replication"] == "1"
        return True

    return all_registered(stack).apply(check)


@pulumi.runtime.test
def test_dms_endpoints_and_task(built):
    stack_name, stack, mocks = built

    def check(_):
        endpoints = of_type(mocks, "aws:dms/endpoint:Endpoint")
        assert len(endpoints) == 2
        for name, ep in endpoints:
            assert ep["sslMode"] == "verify-full", name
            assert ep.get("password") is None and ep["secretsManagerArn"], name
        (i_name, inst), = of_type(mocks, "aws:dms/replicationInstance:ReplicationInstance")
        assert inst["publiclyAccessible"] is False
        assert inst["multiAz"] is (stack_name == "prod")
        (t_name, task), = of_type(mocks, "aws:dms/replicationTask:ReplicationTask")
        settings = json.loads(task["replicationTaskSettings"])
        assert task["migrationType"] == "full-load-and-cdc"
        assert settings["FullLoadSettings"]["TargetTablePrepMode"] == "DO_NOTHING"
        assert settings["TargetMetadata"]["FullLobMode"] is True          # never limited LOB mode
        assert settings["ValidationSettings"]["EnableValidation"] is True
        assert settings["Logging"]["EnableLogging"] is True
        rules = json.loads(task["tableMappings"])["rules"]
        assert rules[0]["object-locator"]["schema-name"] == "public"
        return True

    return all_registered(stack).apply(check)


@pulumi.runtime.test
def test_zones_protection_and_deletion_protection(built):
    stack_name, stack, mocks = built
    prod = stack_name == "prod"

    def check(_):
        assert len(set(stack.replicas.zones)) >= 2
        zones = [s["availabilityZone"] for _, s in of_type(mocks, "aws:rds/clusterInstance:ClusterInstance")]
        assert len(zones) >= 2 and len(set(zones)) >= 2
        (c_name, cluster), = of_type(mocks, "aws:rds/cluster:Cluster")
        assert cluster["deletionProtection"] is prod
        assert cluster["skipFinalSnapshot"] is (not prod)
        if prod:
            assert cluster["finalSnapshotIdentifier"]
        stateful = [*stack.replicas.instances, stack.aurora.cluster, *stack.aurora.instances, stack.aurora.key]
        assert all(r._protect is prod for r in stateful)
        return True

    return all_registered(stack).apply(check)


def test_config_guards():
    from infra.config import from_mapping

    data = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    values = {k: v for k, v in data.items() if k.startswith("tern:")}
    with pytest.raises(ValueError, match="must not open the databases to the world"):
        from_mapping({**values, "tern:app_source_cidrs": ["0.0.0.0/0"]})
    with pytest.raises(ValueError, match="replica_count must be at least 2"):
        from_mapping({**values, "tern:replica_count": 1})
    with pytest.raises(ValueError, match="missing tern:vpc_id"):
        from_mapping({k: v for k, v in values.items() if k != "tern:vpc_id"})
    with pytest.raises(ValueError, match="at least two availability zones"):
        from_mapping({**values, "tern:private_subnets": {"us-east-1a": "subnet-1"}})


def test_both_stack_files_set_every_key():
    import inspect

    import infra.config as cfgmod

    keys = [k for k in inspect.getsource(cfgmod.load).split("keys = [")[1].split("]")[0].replace("\n", "")
            .replace('"', "").replace(" ", "").split(",") if k]
    for stack in ("dev", "prod"):
        data = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
        missing = [k for k in keys if f"tern:{k}" not in data and k not in ("ami_id", "tags")]
        assert not missing, (stack, missing)
        assert "tern:replication_password" in data and "secure" in data["tern:replication_password"]


@pulumi.runtime.test
def test_replicas_may_read_only_the_replication_secret_and_the_archive(built):
    _, stack, mocks = built

    def check(_):
        policies = {name: json.loads(state["policy"]) for name, state in of_type(mocks, "aws:iam/rolePolicy:RolePolicy")}
        secret = policies["tern-replicas-replication-secret"]["Statement"]
        assert secret == [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
                           "Resource": "arn:aws:mock:us-east-1:123456789012:tern-replication"}]
        archive = policies["tern-replicas-archive-read"]["Statement"]
        assert {a for st in archive for a in st["Action"]} == {"s3:ListBucket", "s3:GetObject"}
        return True

    return pulumi.Output.all(all_registered(stack), stack.replicas.secret_read.urn).apply(check)
