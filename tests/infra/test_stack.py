"""The Pulumi program under Pulumi's mocks, for both stack configs: policies and the outputs contract.

Every test is decorated with ``@pulumi.runtime.test`` and returns the Output it checks;
an undecorated test would pass without its assertions ever running.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pulumi
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET = "pw-from-config-secret-4f1c"
ADMIN_SECRET = "admin-pw-from-config-secret-9d2b"
# tern:walg_sha256 is set by each operator, not committed (infra/binaries.py): the tests stand in a digest of their own
TEST_WALG_SHA256 = "93f1d5f2a78f14eda725ed8214446efa27487877abecd2fcec0ba7d97a3b6680"


class Mocks(pulumi.runtime.Mocks):
    def __init__(self) -> None:
        self.resources: list[tuple[str, str, dict]] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        name = args.name
        state.setdefault("arn", f"arn:aws:mock:us-east-1:123456789012:{name}")
        if args.typ == "aws:s3/bucket:Bucket":
            state.setdefault("bucket", f"{name}-8f2e1a")
            state["arn"] = f"arn:aws:s3:::{state['bucket']}"
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
        if args.typ == "aws:lb/loadBalancer:LoadBalancer":
            state["dns_name"] = f"{name}-0a1b2c3d4e.elb.us-east-1.amazonaws.com"
        self.resources.append((args.typ, name, state))
        return f"{name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        if args.token == "aws:ec2/getAmi:getAmi":
            return {"id": "ami-0123456789abcdef0", "architecture": "x86_64"}
        if args.token.startswith("heroku:app/getApp"):
            return {"id": "app-id", "uuid": "1f1f1f1f-0000-4000-8000-000000000001", "name": args.args.get("name")}
        return {}


def stack_config(stack: str, **overrides):
    from infra.config import from_mapping

    data = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    values = {k: v for k, v in data.items() if k.startswith("tern:") and k != "tern:replication_password"
              and k != "tern:pooler_admin_password"}
    values.update({f"tern:{k}": v for k, v in overrides.items()})
    return from_mapping(values, replication_password=pulumi.Output.secret(SECRET),
                        pooler_admin_password=pulumi.Output.secret(ADMIN_SECRET))


def build_with_mocks(stack_name: str, **overrides):
    overrides.setdefault("walg_sha256", TEST_WALG_SHA256)
    mocks = Mocks()
    pulumi.runtime.set_mocks(mocks, project="tern", stack=stack_name, preview=False)
    from infra.stack import build

    return build(stack_config(stack_name, **overrides), stack_name), mocks


@pytest.fixture(params=["dev", "prod"])
def built(request):
    stack, mocks = build_with_mocks(request.param)
    return request.param, stack, mocks


def children(component: pulumi.Resource) -> list[pulumi.Resource]:
    """The resources a component holds as attributes."""
    return [v for v in vars(component).values() if isinstance(v, pulumi.Resource)]


def all_registered(stack) -> pulumi.Output:
    """An Output that resolves once every resource of the stack is registered."""
    resources = [stack.network.replicas, stack.network.aurora, stack.network.dms, stack.replicas.launch_template,
                 *stack.replicas.instances, stack.aurora.cluster, *stack.aurora.instances, stack.aurora.parameter_group,
                 stack.aurora.key, stack.dms.task, stack.dms.source, stack.dms.target, stack.dms.instance,
                 stack.replication_secret, getattr(stack, "replication_secret_version", None),
                 *children(stack.heroku)]
    if stack.pooler is not None:
        resources += [stack.network.pooler, stack.network.pooler_lb, stack.network.pooler_lb_to_pooler,
                      stack.pooler_admin_secret, stack.pooler_admin_secret_version, *children(stack.pooler),
                      *stack.pooler.instances, *stack.pooler.attachments]
    return pulumi.Output.all(*[r.urn for r in resources if r is not None])


def of_type(mocks, typ):
    return [(name, state) for t, name, state in mocks.resources if t == typ]


def unsecret(value):
    """A mock input's plain value (secrets reach the mocks wrapped in Pulumi's secret signature)."""
    return value["value"] if isinstance(value, dict) and "value" in value and len(value) == 2 else value


@pulumi.runtime.test
def test_outputs_are_the_runbook_contract(built):
    stack_name, stack, mocks = built
    from runbook.contract import parse

    def check(outputs):
        contract = parse(outputs, origin=f"stack {stack_name}")
        assert contract.stack == stack_name and contract.rehearsal is (stack_name == "dev")
        assert [r.commands.kind for r in contract.replicas] == ["ssm"] * len(contract.replicas)
        assert contract.aurora.master_password.startswith("aws-secretsmanager:")
        api = contract.aurora.api
        assert api is not None and api.kind == "rds" and api.region == contract.region
        assert api.cluster_identifier == "tern-aurora-cluster-id" and api.parameter_group == "tern-aurora-params-id"
        assert SECRET not in json.dumps(outputs) and ADMIN_SECRET not in json.dumps(outputs)
        return True

    return pulumi.Output.from_input(stack.outputs).apply(check)


@pulumi.runtime.test
def test_no_world_open_ingress_and_no_ssh(built):
    _, stack, mocks = built

    def check(_):
        groups = of_type(mocks, "aws:ec2/securityGroup:SecurityGroup")
        assert len(groups) == 5          # replicas, aurora, dms; the pooler's load balancer and instances
        for name, state in groups:
            port = 6432 if name.startswith("tern-pooler") else 5432
            for rule in state.get("ingress") or []:
                assert not set(rule.get("cidrBlocks") or []) & {"0.0.0.0/0"}, name
                assert not set(rule.get("ipv6CidrBlocks") or []) & {"::/0"}, name
                assert rule["fromPort"] == port and rule["toPort"] == port, (name, rule)
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
            assert ep.get("password") is None and ep["secretsManagerArn"], name
        # the target (Aurora) is verified against the RDS CA; the source (EC2, self-signed) can only be `require`
        target = dict(endpoints)["tern-dms-target"]
        assert target["sslMode"] == "verify-full" and target["certificateArn"].startswith("arn:aws:dms:")
        source = dict(endpoints)["tern-dms-source"]
        assert source["sslMode"] == "require" and not source.get("certificateArn")
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
        assert settings["ChangeProcessingTuning"]["BatchApplyEnabled"] is False   # the sentinel proof: commit order
        assert settings["ControlTablesSettings"]["ControlSchema"] == "tern"       # left out of tern's verification
        rules = json.loads(task["tableMappings"])["rules"]
        assert rules[0]["object-locator"]["schema-name"] == "public"
        assert {"schema-name": "tern", "table-name": "sentinel"} in [r["object-locator"] for r in rules
                                                                     if r["rule-action"] == "include"]
        pg_source = source["postgresSettings"]
        assert pg_source["captureDdls"] is False and pg_source["pluginName"] == "test_decoding"
        assert not pg_source.get("heartbeatEnable")
        assert "session_replication_role = replica" in target["postgresSettings"]["afterConnectScript"]
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


@pulumi.runtime.test
def test_a_rehearsals_data_volumes_go_with_its_instances_prods_stay(built):
    """A rehearsal's `pulumi destroy` leaves no paid volume behind; prod's data outlives a termination."""
    stack_name, stack, mocks = built

    def check(_):
        (lt_name, lt), = of_type(mocks, "aws:ec2/launchTemplate:LaunchTemplate")
        volumes = {b["deviceName"]: b["ebs"]["deleteOnTermination"] for b in lt["blockDeviceMappings"]}
        assert volumes == {"/dev/xvda": "true", "/dev/xvdf": "false" if stack_name == "prod" else "true"}
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
    from infra.config import KEY_TYPES, OPERATOR_KEYS, OPTIONAL_KEYS

    for stack in ("dev", "prod"):
        data = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
        missing = [k for k in KEY_TYPES if f"tern:{k}" not in data and k not in OPTIONAL_KEYS + OPERATOR_KEYS]
        assert not missing, (stack, missing)
        # what each operator must set (the pinned WAL-G checksum) is never a committed stand-in value
        assert not [k for k in OPERATOR_KEYS if f"tern:{k}" in data], stack
        assert "tern:replication_password" in data and "secure" in data["tern:replication_password"]
        assert "tern:pooler_admin_password" in data and "secure" in data["tern:pooler_admin_password"]
        # the pooler's keys have defaults, but each stack file says what it runs
        assert {"tern:pooler", "tern:pgbouncer_version", "tern:pooler_instance_type", "tern:admin_cidrs"} <= set(data)


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


@pulumi.runtime.test
def test_command_output_goes_to_a_private_expiring_bucket_the_replicas_may_only_write(built):
    """SSM returns 24,000 characters of a command's output inline: the rest is read from this bucket."""
    stack_name, stack, mocks = built
    from runbook.contract import parse

    def check(values):
        contract = parse(values[0], origin=f"stack {stack_name}")
        assert {(r.commands.output_bucket, r.commands.output_prefix) for r in contract.replicas} == \
            {("tern-replicas-ssm-output-8f2e1a", "tern/ssm")}
        write = json.loads(dict(of_type(mocks, "aws:iam/rolePolicy:RolePolicy"))["tern-replicas-ssm-output-write"]
                           ["policy"])["Statement"]
        assert write == [{"Effect": "Allow", "Action": ["s3:PutObject"],
                          "Resource": "arn:aws:s3:::tern-replicas-ssm-output-8f2e1a/tern/ssm/*"},
                         {"Effect": "Allow", "Action": ["s3:GetEncryptionConfiguration"],
                          "Resource": "arn:aws:s3:::tern-replicas-ssm-output-8f2e1a"}]
        (_, private), = of_type(mocks, "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock")
        assert all(private[k] for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls",
                                        "restrictPublicBuckets"))
        (_, expiry), = of_type(mocks, "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration")
        assert expiry["rules"][0]["expiration"]["days"] == 7 and expiry["rules"][0]["filter"]["prefix"] == "tern/ssm/"
        (_, bucket), = of_type(mocks, "aws:s3/bucket:Bucket")
        assert bucket["forceDestroy"] is (stack_name == "dev")     # a rehearsal's bucket goes with its stack
        return True

    r = stack.replicas
    return pulumi.Output.all(pulumi.Output.from_input(stack.outputs), all_registered(stack), r.command_output_write.urn,
                             r.command_output_private.urn, r.command_output_expiry.urn).apply(check)


# -- config as the real CLI passes it ---------------------------------------------------------

def cli_config(stack: str) -> tuple[dict[str, str], list[str]]:
    """``PULUMI_CONFIG`` and ``PULUMI_CONFIG_SECRET_KEYS`` as the CLI hands them to a Python program.

    The CLI passes every value as text: strings as they are, numbers and booleans as their
    text, objects and lists as JSON; ``secure:`` values arrive decrypted (here: ``SECRET``).
    ``pulumi.runtime.config.get_config`` then reads the key from that JSON object.
    """
    data = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
    config: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            config[key] = SECRET
            secret_keys.append(key)
        elif isinstance(value, (dict, list)):
            config[key] = json.dumps(value)
        elif isinstance(value, bool):
            config[key] = "true" if value else "false"
        else:
            config[key] = str(value)
    return config, secret_keys


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
@pulumi.runtime.test
def test_load_reads_the_config_the_cli_passes(stack_name, monkeypatch):
    from dataclasses import replace

    from infra import config as cfgmod

    pulumi.runtime.set_mocks(Mocks(), project="tern", stack=stack_name, preview=False)
    config, secret_keys = cli_config(stack_name)
    assert config["tern:region"] == "us-east-1" and config["tern:replica_count"].isdigit()
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(config))
    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", json.dumps(secret_keys))
    for key in config:
        monkeypatch.delenv(pulumi.runtime.get_config_env_key(key), raising=False)
    assert not any(k.startswith("tern:") for k in pulumi.runtime.config.CONFIG.get())

    cfg = cfgmod.load()

    data = yaml.safe_load((ROOT / f"Pulumi.{stack_name}.yaml").read_text())["config"]
    assert cfg.region == data["tern:region"] and cfg.vpc_id == data["tern:vpc_id"]
    assert cfg.private_subnets == data["tern:private_subnets"]
    assert cfg.app_source_cidrs == data["tern:app_source_cidrs"] and cfg.app_source_security_groups == []
    assert cfg.replica_count == data["tern:replica_count"] and isinstance(cfg.replica_count, int)
    assert cfg.aurora_engine_version == "15.8"            # a string, never the float 15.8
    assert (cfg.ebs_size_gb, cfg.ebs_iops, cfg.pg_major) == (data["tern:ebs_size_gb"], data["tern:ebs_iops"], 15)
    assert cfg.rehearsal is data["tern:rehearsal"] and cfg.protect is data["tern:protect"]
    assert cfg.backup_retention_days == data["tern:backup_retention_days"]
    assert cfg.dms_ca_certificate_arn == data["tern:dms_ca_certificate_arn"]
    assert cfg.heroku_app == data["tern:heroku_app"] and cfg.database == data["tern:database"]
    assert cfg.dms_source_replica == data.get("tern:dms_source_replica")
    # every key the stack file sets is read exactly as the YAML-based loader reads it
    assert cfg.pooler is True and cfg.pgbouncer_version == data["tern:pgbouncer_version"] == "1.18.0-1+deb12u1"
    assert cfg.admin_cidrs == data["tern:admin_cidrs"]
    assert replace(cfg, replication_password=None, pooler_admin_password=None) == \
        replace(stack_config(stack_name), replication_password=None, pooler_admin_password=None)

    def check(args):
        password, is_secret, admin_password, admin_is_secret = args
        assert password == SECRET and is_secret
        assert admin_password == SECRET and admin_is_secret      # cli_config decrypts every secure value to SECRET
        return True

    return pulumi.Output.all(cfg.replication_password,
                             pulumi.Output.from_input(cfg.replication_password.is_secret()),
                             cfg.pooler_admin_password,
                             pulumi.Output.from_input(cfg.pooler_admin_password.is_secret())).apply(check)


# -- pulumi up leaves the running app alone --------------------------------------------------

@pulumi.runtime.test
def test_pulumi_up_never_touches_the_heroku_app(built):
    _, stack, mocks = built

    def check(_):
        heroku = [(t, name) for t, name, _ in mocks.resources if t.startswith("heroku:")]
        # any Heroku resource (ConfigVar, ConfigAssociation, Formation, the app itself...) would change the
        # running app; a config-var or formation change restarts every dyno
        assert heroku == [], heroku
        assert not any("config" in t.lower() or "formation" in t.lower() for t, _, _ in mocks.resources
                       if not t.startswith("aws:"))
        return True

    return all_registered(stack).apply(check)


# -- the replicas accept TCP only over TLS ---------------------------------------------------

@pulumi.runtime.test
def test_replicas_accept_tcp_only_over_tls(built):
    import base64
    import re
    import subprocess

    _, stack, mocks = built

    def check(outputs):
        (_, lt), = of_type(mocks, "aws:ec2/launchTemplate:LaunchTemplate")
        text = base64.b64decode(lt["userData"]).decode()
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, "user data is not valid bash"
        hba = [line.split() for line in text.splitlines()
               if re.match(r"(local|host|hostssl|hostnossl|hostgssenc|hostnogssenc)\s", line)]
        tcp = [line for line in hba if line[0] != "local"]
        assert tcp, "no TCP entry in pg_hba.conf"
        for line in tcp:
            assert line[0] == "hostssl" and line[-1] == "scram-sha-256", line
        settings = dict(re.findall(r"^(\w+) = (.+)$", text, re.M))
        assert settings["ssl"] == "on"
        cert, key = settings["ssl_cert_file"].strip("'"), settings["ssl_key_file"].strip("'")
        assert re.search(rf"openssl req -x509 .*-keyout {key} -out {cert}", text.replace("\\\n", " "))
        assert f"chmod 600 {key}" in text
        hba_file = settings["hba_file"].strip("'")
        assert f"cat > {hba_file} <<" in text
        # local trust reaches only the postgres user: the socket directory the runbook uses is 0700
        socket_dirs = {r["socket_dir"] for r in outputs["replicas"]}
        assert {settings["unix_socket_directories"].strip("'")} == socket_dirs
        for d in socket_dirs:
            assert re.search(rf"install -d -m 0700 -o postgres -g postgres {d}\b", text)
        assert settings["unix_socket_permissions"] == "0700"
        assert "d /run/postgresql 0700 postgres postgres" in text     # kept 0700 after a reboot
        return True

    return pulumi.Output.all(all_registered(stack), pulumi.Output.from_input(stack.outputs)).apply(
        lambda args: check(args[1]))


# -- the DMS source follows the leader --------------------------------------------------------

def _dms_source_points_at(mocks, replica: str) -> bool:
    ips = {name: state["private_ip"] for name, state in of_type(mocks, "aws:ec2/instance:Instance")}
    want = ips[f"tern-replicas-{replica}"]
    source = dict(of_type(mocks, "aws:dms/endpoint:Endpoint"))["tern-dms-source"]
    assert source["serverName"] == want, (source["serverName"], ips)
    # with a Secrets Manager secret, DMS takes host and port from the secret, not from the server name
    version = dict(of_type(mocks, "aws:secretsmanager/secretVersion:SecretVersion"))["tern-replication"]
    secret = json.loads(unsecret(version["secretString"]))
    assert (secret["host"], secret["port"]) == (want, 5432)
    assert secret["username"] and secret["password"] == SECRET
    return True


@pulumi.runtime.test
def test_dms_source_defaults_to_the_first_replica(built):
    _, stack, mocks = built
    return all_registered(stack).apply(lambda _: _dms_source_points_at(mocks, "ec2-a"))


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
@pulumi.runtime.test
def test_dms_source_follows_the_configured_replica(stack_name):
    stack, mocks = build_with_mocks(stack_name, dms_source_replica="ec2-b")
    return all_registered(stack).apply(lambda _: _dms_source_points_at(mocks, "ec2-b"))


def test_dms_source_must_name_a_replica():
    with pytest.raises(ValueError, match="dms_source_replica .*ec2-a, ec2-b"):
        build_with_mocks("dev", dms_source_replica="ec2-z")


# -- the pooler (issue #12): PgBouncer in front of the leader ---------------------------------

def pooler_instances(mocks) -> dict[str, dict]:
    return {name: state for name, state in of_type(mocks, "aws:ec2/instance:Instance")
            if name.startswith("tern-pooler-")}


@pulumi.runtime.test
def test_outputs_export_the_pooler_in_the_contracts_shape(built):
    stack_name, stack, mocks = built
    from runbook.contract import parse

    def check(args):
        outputs = args[0]
        pooler = parse(outputs, origin=f"stack {stack_name}").pooler
        assert pooler is not None and pooler.kind == "pgbouncer"
        assert pooler.host == "tern-pooler-nlb-0a1b2c3d4e.elb.us-east-1.amazonaws.com"
        assert (pooler.port, pooler.database, pooler.tls, pooler.admin_user) == (6432, "app", True, "tern_admin")
        # by reference only: the secret's ARN and its JSON key
        assert pooler.admin_password == "aws-secretsmanager:arn:aws:mock:us-east-1:123456789012:tern-pooler-admin#password"
        instances = pooler_instances(mocks)
        zones = sorted(stack_config(stack_name).private_subnets)
        assert len(pooler.nodes) == len(zones) >= 2
        assert [n.availability_zone for n in pooler.nodes] == zones            # one per zone, distinct
        assert [n.name for n in pooler.nodes] == [f"pooler-{z[-1]}" for z in zones]
        for node in pooler.nodes:
            inst = instances[f"tern-{node.name}"]
            assert node.admin_host == inst["private_ip"] and node.admin_port == 6432
            assert node.availability_zone == inst["availabilityZone"]
            assert node.commands.kind == "ssm" and node.commands.instance_id == f"tern-{node.name}-id"
            assert (node.commands.region, node.commands.os_user) == ("us-east-1", "postgres")
            assert (node.commands.output_bucket, node.commands.output_prefix) == \
                ("tern-replicas-ssm-output-8f2e1a", "tern/ssm")                # the replicas' bucket, reused
            assert node.databases_file == "/etc/pgbouncer/tern-databases.ini"
            assert node.auth_file == "/etc/pgbouncer/userlist.txt"    # where tern adds the app role's verifier
        assert ADMIN_SECRET not in json.dumps(outputs)
        return True

    return pulumi.Output.all(pulumi.Output.from_input(stack.outputs), all_registered(stack)).apply(check)


@pulumi.runtime.test
def test_pooler_security_groups(built):
    stack_name, stack, mocks = built

    def check(_):
        cfg = stack_config(stack_name)
        groups = dict(of_type(mocks, "aws:ec2/securityGroup:SecurityGroup"))
        pooler = groups["tern-pooler"]["ingress"]
        # the instances: the load balancer's group (clients, health checks) and tern's addresses; nothing else
        assert sorted((tuple(r.get("securityGroups") or []), tuple(r.get("cidrBlocks") or [])) for r in pooler) == \
            sorted([(("tern-pooler-lb-id",), ()), ((), tuple(cfg.admin_cidrs))])
        for rule in pooler + groups["tern-pooler-lb"]["ingress"]:
            assert (rule["protocol"], rule["fromPort"], rule["toPort"]) == ("tcp", 6432, 6432), rule
            assert not {"0.0.0.0/0", "::/0"} & set((rule.get("cidrBlocks") or []) + (rule.get("ipv6CidrBlocks") or []))
            assert not rule.get("self")
        # the load balancer: only the app's sources, and it may send only to the poolers, on 6432
        lb = groups["tern-pooler-lb"]
        assert cfg.app_source_cidrs and not cfg.app_source_security_groups
        assert [r.get("cidrBlocks") for r in lb["ingress"]] == [cfg.app_source_cidrs]
        assert not lb.get("egress")
        (_, egress), = of_type(mocks, "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule")
        assert (egress["securityGroupId"], egress["referencedSecurityGroupId"]) == ("tern-pooler-lb-id", "tern-pooler-id")
        assert (egress["ipProtocol"], egress["fromPort"], egress["toPort"]) == ("tcp", 6432, 6432)
        # PgBouncer's server connections: the replicas (hop 1) and Aurora (hop 2) accept 5432 from the pooler
        for target in ("tern-replicas", "tern-aurora"):
            assert any("tern-pooler-id" in (r.get("securityGroups") or []) and (r["fromPort"], r["toPort"]) == (5432, 5432)
                       for r in groups[target]["ingress"]), target
        return True

    return all_registered(stack).apply(check)


@pulumi.runtime.test
def test_pooler_load_balancer_is_internal_and_targets_every_node(built):
    stack_name, stack, mocks = built
    prod = stack_name == "prod"

    def check(_):
        cfg = stack_config(stack_name)
        (_, nlb), = of_type(mocks, "aws:lb/loadBalancer:LoadBalancer")
        assert nlb["internal"] is True and nlb["loadBalancerType"] == "network"
        assert nlb["enableCrossZoneLoadBalancing"] is True
        assert nlb["securityGroups"] == ["tern-pooler-lb-id"]
        assert sorted(nlb["subnets"]) == sorted(cfg.private_subnets.values())
        assert nlb["enableDeletionProtection"] is prod          # the app's DATABASE_URL names it
        (_, tg), = of_type(mocks, "aws:lb/targetGroup:TargetGroup")
        assert (tg["protocol"], tg["port"], tg["targetType"]) == ("TCP", 6432, "instance")
        assert tg["healthCheck"]["protocol"] == "TCP"
        assert tg["preserveClientIp"] == "true"                # the HBA file sees the client's address
        (_, listener), = of_type(mocks, "aws:lb/listener:Listener")
        assert (listener["protocol"], listener["port"]) == ("TCP", 6432)
        assert listener["defaultActions"] == [{"type": "forward", "targetGroupArn": tg["arn"]}]
        attachments = of_type(mocks, "aws:lb/targetGroupAttachment:TargetGroupAttachment")
        assert sorted(a["targetId"] for _, a in attachments) == sorted(f"{n}-id" for n in pooler_instances(mocks))
        assert {(a["port"], a["targetGroupArn"]) for _, a in attachments} == {(6432, tg["arn"])}
        assert stack.pooler.load_balancer._protect is prod
        assert all(i._protect is prod for i in stack.pooler.instances)
        return True

    return all_registered(stack).apply(check)


@pulumi.runtime.test
def test_pooler_instances_imdsv2_encrypted_private_and_least_privilege(built):
    stack_name, stack, mocks = built

    def check(_):
        cfg = stack_config(stack_name)
        instances = pooler_instances(mocks)
        assert len(instances) == len(cfg.zones) >= 2
        assert len({i["availabilityZone"] for i in instances.values()}) == len(instances)
        for name, inst in instances.items():
            assert inst["metadataOptions"]["httpTokens"] == "required", name
            assert inst["associatePublicIpAddress"] is False, name
            assert inst["rootBlockDevice"]["encrypted"] is True, name
            assert inst["subnetId"] == cfg.private_subnets[inst["availabilityZone"]], name
            assert inst["vpcSecurityGroupIds"] == ["tern-pooler-id"], name
            assert inst["iamInstanceProfile"], name
        policies = {name: json.loads(state["policy"]) for name, state in of_type(mocks, "aws:iam/rolePolicy:RolePolicy")}
        assert policies["tern-pooler-admin-secret"]["Statement"] == [
            {"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"],
             "Resource": "arn:aws:mock:us-east-1:123456789012:tern-pooler-admin"}]
        assert policies["tern-pooler-ssm-output-write"]["Statement"] == [
            {"Effect": "Allow", "Action": ["s3:PutObject"],
             "Resource": "arn:aws:s3:::tern-replicas-ssm-output-8f2e1a/tern/ssm/*"},
            {"Effect": "Allow", "Action": ["s3:GetEncryptionConfiguration"],
             "Resource": "arn:aws:s3:::tern-replicas-ssm-output-8f2e1a"}]
        assert sorted(n for n in policies if n.startswith("tern-pooler")) == \
            ["tern-pooler-admin-secret", "tern-pooler-ssm-output-write"]
        attached = {name: a["policyArn"] for name, a in of_type(mocks, "aws:iam/rolePolicyAttachment:RolePolicyAttachment")}
        assert attached["tern-pooler-ssm"] == "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
        # the secret's value, which the nodes read once at first boot, is stored from the config secret
        version = dict(of_type(mocks, "aws:secretsmanager/secretVersion:SecretVersion"))["tern-pooler-admin"]
        assert json.loads(unsecret(version["secretString"])) == {"username": "tern_admin", "password": ADMIN_SECRET}
        return True

    return all_registered(stack).apply(check)


def hba_decision(hba: str, database: str, user: str, address: str, tls: bool) -> str | None:
    """PgBouncer's first-match HBA evaluation (the subset the file uses); None when no line matches."""
    import ipaddress

    for line in hba.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        kind, db, who, cidr, method = fields
        if kind == "hostssl" and not tls:
            continue
        ip, net = ipaddress.ip_address(address), ipaddress.ip_network(cidr)
        if ip.version == net.version and ip in net and db in ("all", database) and who in ("all", user):
            return method
    return None


def pooler_user_data(mocks) -> str:
    texts = {state["userData"] for state in pooler_instances(mocks).values()}
    assert len(texts) == 1, "every pooler node boots the same way"
    return texts.pop()


@pulumi.runtime.test
def test_pooler_user_data_installs_the_pinned_pgbouncer_transaction_pooling_over_tls(built):
    import ipaddress
    import re
    import subprocess

    stack_name, stack, mocks = built

    def check(_):
        cfg = stack_config(stack_name)
        text = pooler_user_data(mocks)
        assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0, "user data is not valid bash"
        assert "apt-get install -y -q pgbouncer=1.18.0-1+deb12u1\n" in text and "apt-mark hold pgbouncer" in text
        ini = text.split("<<'INI'\n", 1)[1].split("\nINI\n", 1)[0]
        settings = dict(re.findall(r"^(\w+) = (.+)$", ini, re.M))
        assert settings["listen_port"] == "6432" and settings["pool_mode"] == "transaction"
        assert settings["auth_type"] == "hba"         # auth_hba_file is read only with auth_type = hba
        assert settings["auth_file"] == "/etc/pgbouncer/userlist.txt" and settings["admin_users"] == "tern_admin"
        assert settings["client_tls_sslmode"] == "require" and settings["server_tls_sslmode"] == "require"
        assert settings["query_wait_timeout"] == "120"
        assert settings["ignore_startup_parameters"] == "extra_float_digits,options"
        assert "%include /etc/pgbouncer/tern-databases.ini" in ini.splitlines()
        assert "printf '[databases]\\n' > /etc/pgbouncer/tern-databases.ini" in text
        assert "chown postgres:postgres /etc/pgbouncer/tern-databases.ini" in text
        assert "install -m 0640 -o postgres -g postgres /dev/null /etc/pgbouncer/userlist.txt" in text
        # postgres replaces its files by rename (the runbook's write_file); the sticky bit keeps root's files
        assert "chown root:postgres /etc/pgbouncer/tern-hba.conf /etc/pgbouncer/pgbouncer.ini" in text
        assert "chmod 1770 /etc/pgbouncer\n" in text
        key, cert = settings["client_tls_key_file"], settings["client_tls_cert_file"]
        assert re.search(rf"openssl req -x509 .*-keyout {key} -out {cert}", text.replace("\\\n", " "))
        assert f"chmod 600 {key}" in text
        # the admin password: read from its secret with the instance role, stored as a SCRAM verifier
        assert "--secret-id 'arn:aws:mock:us-east-1:123456789012:tern-pooler-admin'" in text
        assert "python3 /usr/local/lib/tern/pooler_admin_userlist.py tern_admin /etc/pgbouncer/userlist.txt" in text
        assert ADMIN_SECRET not in text and SECRET not in text
        assert "systemctl enable pgbouncer" in text and "systemctl restart pgbouncer" in text
        # the admin console only from tern's addresses, over TLS with SCRAM; everything else hostssl SCRAM
        hba_file = settings["auth_hba_file"]
        hba = text.split(f"cat > {hba_file} <<'HBA'\n", 1)[1].split("\nHBA\n", 1)[0]
        admin = str(next(ipaddress.ip_network(cfg.admin_cidrs[0]).hosts()))
        outside = "10.99.0.7"
        assert hba_decision(hba, "pgbouncer", "tern_admin", admin, tls=True) == "scram-sha-256"
        assert hba_decision(hba, "pgbouncer", "tern_admin", admin, tls=False) == "reject"
        assert hba_decision(hba, "pgbouncer", "tern_admin", outside, tls=True) == "reject"
        assert hba_decision(hba, "pgbouncer", "app", admin, tls=True) == "reject"
        assert hba_decision(hba, "pgbouncer", "tern_admin", "2001:db8::1", tls=True) == "reject"
        assert hba_decision(hba, "app", "app", outside, tls=True) == "scram-sha-256"
        assert hba_decision(hba, "app", "app", outside, tls=False) is None            # no TLS: refused
        for line in hba.splitlines():
            fields = line.split()
            if fields and not fields[0].startswith("#") and fields[-1] != "reject":
                assert fields[0] == "hostssl" and fields[-1] == "scram-sha-256", line
        return True

    return all_registered(stack).apply(check)


def test_pooler_admin_verifier_is_postgresqls_scram():
    """The RFC 7677 example: the verifier proves the same client proof and server signature."""
    import base64
    import hashlib
    import hmac

    from infra.pooler import USERLIST_PY

    script: dict = {}
    exec(compile(USERLIST_PY, "pooler_admin_userlist.py", "exec"), script)
    verifier = script["scram_verifier"]("pencil", base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ=="))
    head, keys = verifier.split("$", 1)[1].split("$")
    assert verifier.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    stored_key, server_key = (base64.b64decode(k) for k in keys.split(":"))
    nonce = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
    auth = f"n=user,r=rOprNGfwEbeRWgbNEkqO,r={nonce},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r={nonce}".encode()
    # the server checks a client proof against StoredKey, and signs with ServerKey
    proof = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
    client_key = bytes(a ^ b for a, b in zip(proof, hmac.new(stored_key, auth, "sha256").digest()))
    assert hashlib.sha256(client_key).digest() == stored_key
    assert base64.b64encode(hmac.new(server_key, auth, "sha256").digest()).decode() == \
        "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_pooler_admin_userlist_script_keeps_other_lines_and_refuses_what_scram_would_not_match(tmp_path):
    import subprocess
    import sys

    from infra.pooler import USERLIST_PY

    script = tmp_path / "pooler_admin_userlist.py"
    script.write_text(USERLIST_PY)
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"app" "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5"\n"tern_admin" "old"\n')

    def run(password):
        return subprocess.run([sys.executable, str(script), "tern_admin", str(userlist)], text=True,
                              input=json.dumps({"username": "tern_admin", "password": password}), capture_output=True)

    done = run("s3cret pass")
    assert done.returncode == 0, done.stderr
    lines = userlist.read_text().splitlines()
    assert lines[0] == '"app" "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5"' and len(lines) == 2
    assert lines[1].startswith('"tern_admin" "SCRAM-SHA-256$4096:') and "s3cret" not in lines[1]
    assert "s3cret" not in done.stdout + done.stderr
    before = userlist.read_text()
    refused = run("pässword")
    assert refused.returncode != 0 and "printable ASCII" in refused.stderr
    assert userlist.read_text() == before


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
@pulumi.runtime.test
def test_pooler_off_leaves_no_pooler(stack_name):
    stack, mocks = build_with_mocks(stack_name, pooler=False)
    from runbook.contract import parse

    def check(args):
        outputs = args[0]
        assert "pooler" not in outputs and parse(outputs).pooler is None
        assert stack.pooler is None and stack.pooler_admin_secret is None
        assert not pooler_instances(mocks)
        assert not [t for t, _, _ in mocks.resources if t.startswith("aws:lb/")]
        groups = dict(of_type(mocks, "aws:ec2/securityGroup:SecurityGroup"))
        assert sorted(groups) == ["tern-aurora", "tern-dms", "tern-replicas"]
        assert not any(r["fromPort"] == 6432 for g in groups.values() for r in g.get("ingress") or [])
        assert list(dict(of_type(mocks, "aws:secretsmanager/secret:Secret"))) == ["tern-replication"]
        return True

    return pulumi.Output.all(pulumi.Output.from_input(stack.outputs), all_registered(stack)).apply(check)


def test_pooler_needs_two_zones():
    from infra.config import from_mapping
    from infra.pooler import Poolers, PoolersArgs

    data = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    values = {k: v for k, v in data.items() if k.startswith("tern:")}

    with pytest.raises(ValueError, match="private_subnets needs subnets in at least two availability zones"):
        from_mapping({**values, "tern:private_subnets": {"us-east-1a": "subnet-1"}}, pooler_admin_password="x")
    # the component refuses on its own too, naming the key
    pulumi.runtime.set_mocks(Mocks(), project="tern", stack="dev", preview=False)
    args = PoolersArgs(zones=["us-east-1a"], subnets={"us-east-1a": "subnet-1"}, vpc_id="vpc-1",
                       security_group_id="sg-1", lb_security_group_id="sg-2", instance_type="c6i.large",
                       ami_id="ami-1", region="us-east-1", pgbouncer_version="1.18.0-1+deb12u1",
                       admin_cidrs=["10.0.0.0/24"], admin_secret_arn="arn:secret", command_output_bucket="b")
    with pytest.raises(ValueError, match=r"tern:private_subnets .*tern:pooler.* at least two"):
        Poolers("tern-pooler", args)


def test_pooler_config_guards():
    from infra.config import PGBOUNCER_VERSION, from_mapping

    data = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    values = {k: v for k, v in data.items() if k.startswith("tern:") and not k.endswith("_password")}
    ok = dict(values)
    assert from_mapping(ok, pooler_admin_password="x").pgbouncer_version == "1.18.0-1+deb12u1"
    defaults = {k: v for k, v in ok.items() if k not in ("tern:pooler", "tern:pgbouncer_version")}
    cfg = from_mapping(defaults, pooler_admin_password="x")
    assert cfg.pooler is True and cfg.pgbouncer_version == PGBOUNCER_VERSION == "1.18.0-1+deb12u1"
    for version in ("1.18.*", "1.18.0", "1.18.0-1 ; curl evil", "latest", ""):
        with pytest.raises(ValueError, match="pgbouncer_version must name one exact Debian package version"):
            from_mapping({**ok, "tern:pgbouncer_version": version or " "}, pooler_admin_password="x")
    with pytest.raises(ValueError, match="admin_cidrs is required when tern:pooler is on"):
        from_mapping({**ok, "tern:admin_cidrs": []}, pooler_admin_password="x")
    for world in ("0.0.0.0/0", "::/0"):
        with pytest.raises(ValueError, match="must not open the admin console to the world"):
            from_mapping({**ok, "tern:admin_cidrs": ["10.1.0.0/24", world]}, pooler_admin_password="x")
    for bad in ("10.1.0.5/24", "tern-host", "10.1.0.0/24 md5"):
        with pytest.raises(ValueError, match="is not a network address"):
            from_mapping({**ok, "tern:admin_cidrs": [bad]}, pooler_admin_password="x")
    with pytest.raises(ValueError, match="missing tern:pooler_admin_password"):
        from_mapping(ok)
    # off: none of the pooler's keys is needed
    off = from_mapping({**ok, "tern:pooler": False, "tern:admin_cidrs": []})
    assert off.pooler is False and off.pooler_admin_password is None


# -- what the replicas download is pinned and verified before it is installed (infra/binaries.py) ---------------

def replica_user_data(mocks) -> str:
    import base64

    (_, lt), = of_type(mocks, "aws:ec2/launchTemplate:LaunchTemplate")
    return base64.b64decode(lt["userData"]).decode()


@pulumi.runtime.test
def test_replica_user_data_installs_only_what_its_pins_verify(built):
    import re

    from infra import binaries

    _, stack, mocks = built

    def check(_):
        text = replica_user_data(mocks)
        lines = text.splitlines()

        def at(pattern: str) -> int:
            found = [i for i, line in enumerate(lines) if re.search(pattern, line)]
            assert len(found) == 1, (pattern, found)
            return found[0]

        # WAL-G: downloaded, checked against the configured SHA-256, only then unpacked and installed
        get = at(r"^curl .* -o /tmp/wal-g\.tar\.gz 'https://github\.com/wal-g/wal-g/releases/download/v3\.0\.5/"
                 r"wal-g-pg-ubuntu-22\.04-amd64\.tar\.gz'$")
        pin = at(rf"^echo '{TEST_WALG_SHA256}  /tmp/wal-g\.tar\.gz' > /tmp/wal-g\.tar\.gz\.sha256$")
        verify = at(r"^sha256sum -c /tmp/wal-g\.tar\.gz\.sha256 \|\| \{ echo .*>&2; exit 1; \}$")
        unpack = at(r"^tar -xzf /tmp/wal-g\.tar\.gz ")
        install = at(r"^install -m 0755 .* /usr/local/bin/wal-g$")
        assert get < pin < verify < unpack < install
        # PGDG's key: kept only when its fingerprint is the pinned one, before apt is pointed at the repository
        key = at(r"^curl .* -o /tmp/pgdg\.asc https://www\.postgresql\.org/media/keys/ACCC4CF8\.asc$")
        fpr = at(rf'^\[ "\$fpr" = "{binaries.PGDG_KEY_FINGERPRINT}" \] \|\| \{{ echo .*>&2; exit 1; \}}$')
        keep = at(rf"^install -m 0644 /tmp/pgdg\.asc {binaries.PGDG_KEYRING} ")
        repo = at(r"^echo \"deb \[signed-by=/usr/share/postgresql-common/pgdg/apt\.postgresql\.org\.asc\]")
        assert key < fpr < keep < repo
        # nothing else is fetched outside apt, and the script stops at the first failure
        assert [i for i, line in enumerate(lines) if re.search(r"(^|[;&|(]\s*)(curl|wget)\s", line)] == [key, get]
        assert "set -euo pipefail" in lines[:3]
        return True

    return all_registered(stack).apply(check)


@pytest.mark.parametrize("stack_name", ["dev", "prod"])
@pulumi.runtime.test
def test_walg_mirror_and_version_come_from_the_config(stack_name):
    stack, mocks = build_with_mocks(stack_name, walg_version="v3.0.7",
                                    walg_url="https://mirror.example.internal/tern/wal-g-v3.0.7.tar.gz")

    def check(_):
        text = replica_user_data(mocks)
        assert "curl -fsSL --retry 5 --retry-connrefused -o /tmp/wal-g.tar.gz " \
               "'https://mirror.example.internal/tern/wal-g-v3.0.7.tar.gz'" in text
        assert "github.com" not in text and "# WAL-G v3.0.7, pinned" in text
        return True

    return all_registered(stack).apply(check)


def test_no_walg_checksum_no_stack_and_bad_pins_are_refused():
    from infra.config import from_mapping

    with pytest.raises(ValueError, match=r"tern:walg_sha256 is not set.*pulumi config set tern:walg_sha256"):
        build_with_mocks("dev", walg_sha256=None)
    data = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    values = {k: v for k, v in data.items() if k.startswith("tern:") and not k.endswith("_password")}
    for bad in ("abc", "g" * 64, TEST_WALG_SHA256 + "0", "sha256:" + TEST_WALG_SHA256):
        with pytest.raises(ValueError, match="tern:walg_sha256 must be the 64 hex digits"):
            from_mapping({**values, "tern:walg_sha256": bad}, pooler_admin_password="x")
    assert from_mapping({**values, "tern:walg_sha256": TEST_WALG_SHA256.upper()},
                        pooler_admin_password="x").walg_sha256 == TEST_WALG_SHA256
    for bad in ("http://mirror.example/wal-g.tar.gz", "https://m.example/w.tar.gz'; curl evil", "s3://bucket/w.tgz"):
        with pytest.raises(ValueError, match="tern:walg_url must be a plain https:// URL"):
            from_mapping({**values, "tern:walg_url": bad}, pooler_admin_password="x")
    with pytest.raises(ValueError, match="tern:walg_version must be a release tag"):
        from_mapping({**values, "tern:walg_version": "latest"}, pooler_admin_password="x")


@pytest.fixture
def fake_curl(tmp_path, monkeypatch):
    """``curl ... -o FILE URL`` that writes what the test put in ``served`` instead of going to the network."""
    served = tmp_path / "served"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
                                  f'cp {served} "$out"\n')
    (bin_dir / "curl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return served


def run_bash(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], capture_output=True, text=True, timeout=60)


def test_walg_is_installed_only_when_the_download_matches_its_sha256(tmp_path, fake_curl):
    import hashlib
    import io
    import tarfile

    from infra.binaries import WALG_ASSET, walg_install

    binary = b"#!/bin/sh\necho wal-g v3.0.5\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(WALG_ASSET)
        info.size, info.mode = len(binary), 0o755
        tar.addfile(info, io.BytesIO(binary))
    fake_curl.write_bytes(buf.getvalue())
    good = hashlib.sha256(buf.getvalue()).hexdigest()
    work, dest = tmp_path / "work", tmp_path / "wal-g"
    work.mkdir()

    # a download that is not the pinned one (tampered, truncated, another version): the boot stops, nothing installed
    res = run_bash(walg_install(version="v3.0.5", sha256=hashlib.sha256(b"other").hexdigest(), workdir=str(work),
                                dest=str(dest)) + "echo after\n")
    assert res.returncode == 1 and "after" not in res.stdout
    assert "does not match tern:walg_sha256" in res.stderr and "WAL-G NOT installed, boot stopped" in res.stderr
    assert not dest.exists() and not (work / WALG_ASSET).exists()

    res = run_bash(walg_install(version="v3.0.5", sha256=good, workdir=str(work), dest=str(dest)))
    assert res.returncode == 0, res.stderr
    assert dest.read_bytes() == binary and os.stat(dest).st_mode & 0o777 == 0o755
    assert sorted(p.name for p in work.iterdir()) == []          # the tarball and its checksum file are gone


def test_the_pgdg_key_is_kept_only_when_it_is_the_pinned_one(tmp_path, fake_curl):
    from infra.binaries import pgdg_key_install

    dest = tmp_path / "keys" / "apt.postgresql.org.asc"
    work = tmp_path / "work"
    work.mkdir()
    script = pgdg_key_install(workdir=str(work), dest=str(dest)) + "echo after\n"
    # another key (as a compromised download or a man in the middle would serve) and something that is no key
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "Not PGDG <x@example.invalid>", "ed25519",
                    "sign", "never"], env=env, check=True, capture_output=True, timeout=60)
    other = subprocess.run(["gpg", "--armor", "--export", "x@example.invalid"], env=env, check=True,
                           capture_output=True, timeout=60).stdout
    for served in (other, b"<html>captive portal</html>"):
        fake_curl.write_bytes(served)
        res = run_bash(script)
        assert res.returncode == 1 and "after" not in res.stdout, res.stderr
        assert "is not the pinned PGDG key B97B0AFCAA1A47F044F244A07FCC7D46ACCC4CF8" in res.stderr
        assert not dest.exists()
    # the real key, as Debian's postgresql-common ships it: kept
    shipped = Path("/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc")
    if not shipped.exists():
        pytest.skip("postgresql-common's copy of the PGDG key is not installed here")
    fake_curl.write_bytes(shipped.read_bytes())
    res = run_bash(script)
    assert res.returncode == 0 and "after" in res.stdout, res.stderr
    assert dest.read_bytes() == shipped.read_bytes()


@pulumi.runtime.test
def test_walg_env_dir_is_the_one_the_replicas_user_data_writes(built):
    """restore runs ``envdir <archive.env_dir> wal-g ...`` on the replicas: the directory the outputs name is the
    one the user data fills (WALG_S3_PREFIX with the configured bucket and prefix), and envdir is installed."""
    import re

    stack_name, stack, mocks = built
    from runbook.contract import parse

    def check(values):
        archive = parse(values[0], origin=f"stack {stack_name}").source.archive
        text = replica_user_data(mocks)
        assert archive.kind == "s3"
        prefix = re.search(rf'^echo "(s3://[^"]+)" > {re.escape(archive.env_dir)}/WALG_S3_PREFIX$', text, re.M)
        assert prefix and prefix.group(1) == archive.location, (archive, prefix)
        assert re.search(rf"^echo \"[a-z0-9-]+\" > {re.escape(archive.env_dir)}/AWS_REGION$", text, re.M)
        assert re.search(r"^apt-get install .*\bdaemontools\b", text, re.M)    # envdir
        return True

    return pulumi.Output.all(stack.outputs, all_registered(stack)).apply(check)


@pulumi.runtime.test
def test_the_example_outputs_file_has_the_shape_the_program_exports():
    """examples/outputs.example.json (README: try the runbook offline) names every key a deployed dev stack
    exports, and no other: a key added to infra/stack.py must be added there too."""
    stack, _ = build_with_mocks("dev")
    example = json.loads((ROOT / "examples" / "outputs.example.json").read_text())

    def shape(value):
        if isinstance(value, dict):
            return {k: shape(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shape(value[0])] if value and isinstance(value[0], (dict, list)) else "list"
        return "value"

    def check(outputs):
        assert shape(example) == shape(outputs)
        return True

    return pulumi.Output.from_input(stack.outputs).apply(check)


@pulumi.runtime.test
def test_replicas_admit_terns_certificate_only_from_admin_cidrs(built):
    """The outputs carry tern:admin_cidrs (restore writes the replicas' certificate hba line for these
    networks only, runbook/client_tls.py), and the replicas' group lets tern reach 5432 from them."""
    stack_name, stack, mocks = built

    def check(outputs):
        cfg = stack_config(stack_name)
        assert cfg.admin_cidrs and outputs["admin_cidrs"] == cfg.admin_cidrs
        replicas = dict(of_type(mocks, "aws:ec2/securityGroup:SecurityGroup"))["tern-replicas"]["ingress"]
        tern = [r for r in replicas if "client certificate" in (r.get("description") or "")]
        assert [(r.get("cidrBlocks"), r["fromPort"], r["toPort"]) for r in tern] == [(cfg.admin_cidrs, 5432, 5432)]
        return True

    return pulumi.Output.all(pulumi.Output.from_input(stack.outputs), all_registered(stack)).apply(
        lambda args: check(args[0]))
