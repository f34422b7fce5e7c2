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
    values = {k: v for k, v in data.items() if k.startswith("tern:") and k != "tern:replication_password"}
    values.update({f"tern:{k}": v for k, v in overrides.items()})
    return from_mapping(values, replication_password=pulumi.Output.secret(SECRET))


def build_with_mocks(stack_name: str, **overrides):
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
    from infra.config import KEY_TYPES, OPTIONAL_KEYS

    for stack in ("dev", "prod"):
        data = yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]
        missing = [k for k in KEY_TYPES if f"tern:{k}" not in data and k not in OPTIONAL_KEYS]
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
    assert replace(cfg, replication_password=None) == replace(stack_config(stack_name), replication_password=None)

    def check(args):
        password, is_secret = args
        assert password == SECRET and is_secret
        return True

    return pulumi.Output.all(cfg.replication_password,
                             pulumi.Output.from_input(cfg.replication_password.is_secret())).apply(check)


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
    (_, version), = of_type(mocks, "aws:secretsmanager/secretVersion:SecretVersion")
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
