"""The whole stack from a :class:`~infra.config.StackConfig`, and the outputs contract it exports.

The exported keys are exactly the runbook's outputs contract (``runbook/contract.py``):
a test resolves them under Pulumi's mocks and validates them with the runbook's schema.
No credential is exported: only references to Secrets Manager.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from .aurora import Aurora, AuroraArgs
from .config import StackConfig
from .dms import Dms, DmsArgs
from .heroku import HerokuApp, HerokuArgs
from .network import POOLER_PORT, Network, NetworkArgs
from .pooler import ADMIN_USER, DATABASES_FILE, USERLIST_FILE, Poolers, PoolersArgs
from .replicas import COMMAND_OUTPUT_PREFIX, WALG_ENV_DIR, Replicas, ReplicasArgs

SCHEMA_VERSION = 1


@dataclass
class Stack:
    network: Network
    replicas: Replicas
    aurora: Aurora
    dms: Dms
    heroku: HerokuApp
    replication_secret: aws.secretsmanager.Secret
    outputs: dict[str, Any]
    replication_secret_version: aws.secretsmanager.SecretVersion | None = None
    # tern:pooler (default on): PgBouncer in front of the leader, and its admin password's secret
    pooler: Poolers | None = None
    pooler_admin_secret: aws.secretsmanager.Secret | None = None
    pooler_admin_secret_version: aws.secretsmanager.SecretVersion | None = None


def build(cfg: StackConfig, stack_name: str) -> Stack:
    tags = {"project": "tern", "stack": stack_name, **cfg.tags}
    production = not cfg.rehearsal
    subnets = [cfg.private_subnets[z] for z in cfg.zones]
    network = Network("tern", NetworkArgs(vpc_id=cfg.vpc_id, app_source_security_groups=cfg.app_source_security_groups,
                                          app_source_cidrs=cfg.app_source_cidrs, pooler=cfg.pooler,
                                          admin_cidrs=cfg.admin_cidrs, tags=tags))
    ami = cfg.ami_id or aws.ec2.get_ami_output(
        most_recent=True, owners=["136693071363"],  # Debian
        filters=[aws.ec2.GetAmiFilterArgs(name="name", values=["debian-12-amd64-*"])]).id
    # the replication role's password: a config secret, stored in Secrets Manager, exported by reference only
    replication_secret = aws.secretsmanager.Secret("tern-replication", description="tern replication role",
                                                   recovery_window_in_days=0 if cfg.rehearsal else 7, tags=tags)
    replicas = Replicas("tern-replicas", ReplicasArgs(
        count=cfg.replica_count, zones=cfg.zones, subnets=cfg.private_subnets, security_group_id=network.replicas.id,
        instance_type=cfg.instance_type, ebs_size_gb=cfg.ebs_size_gb, ebs_iops=cfg.ebs_iops, pg_major=cfg.pg_major,
        ami_id=ami, region=cfg.region, wal_archive_bucket=cfg.wal_archive_bucket,
        wal_archive_prefix=cfg.wal_archive_prefix, replication_secret_arn=replication_secret.arn,
        protect=cfg.protect, rehearsal=cfg.rehearsal, tags=tags, walg_sha256=cfg.walg_sha256,
        walg_version=cfg.walg_version, walg_url=cfg.walg_url))
    aurora = Aurora("tern-aurora", AuroraArgs(
        engine_version=cfg.aurora_engine_version, instance_class=cfg.aurora_instance_class,
        instance_count=cfg.aurora_instance_count, zones=cfg.zones, subnet_ids=subnets,
        security_group_id=network.aurora.id, database=cfg.database, backup_retention_days=cfg.backup_retention_days,
        production=production, protect=cfg.protect, tags=tags))
    # DMS reads from the replica named by tern:dms_source_replica (default the first); the runbook repoints
    # the endpoint after a failover (see infra/dms.py) - nothing here is fixed to replica 0
    source_name = cfg.dms_source_replica or replicas.names[0]
    if source_name not in replicas.names:
        raise ValueError(f"tern:dms_source_replica is {source_name!r}; the replicas are {', '.join(replicas.names)}")
    dms_source = replicas.instances[replicas.names.index(source_name)]
    replication_secret_version = None
    if cfg.replication_password is not None:
        # username/password for the replicas' passfile; host/port for the DMS source endpoint (DMS takes them
        # from the secret, not from the endpoint's server name)
        replication_secret_version = aws.secretsmanager.SecretVersion(
            "tern-replication", secret_id=replication_secret.id,
            secret_string=pulumi.Output.all(pulumi.Output.secret(cfg.replication_password), dms_source.private_ip)
            .apply(lambda v: json.dumps({"username": "tern_replicator", "password": v[0], "host": v[1],
                                         "port": 5432})))
    dms = Dms("tern-dms", DmsArgs(
        instance_class=cfg.dms_instance_class, subnet_ids=subnets, security_group_id=network.dms.id,
        source_host=dms_source.private_ip, target_host=aurora.cluster.endpoint, database=cfg.database,
        certificate_arn=cfg.dms_ca_certificate_arn, source_secret_arn=replication_secret.arn,
        target_secret_arn=aurora.master_secret_arn, production=production, protect=cfg.protect, tags=tags))
    pooler = pooler_admin_secret = pooler_admin_secret_version = None
    if cfg.pooler:
        # the admin console's password: like the replication role's, a config secret kept in Secrets Manager,
        # exported by reference only; the poolers read it at first boot
        pooler_admin_secret = aws.secretsmanager.Secret("tern-pooler-admin", description="tern PgBouncer admin console",
                                                        recovery_window_in_days=0 if cfg.rehearsal else 7, tags=tags)
        pooler_admin_secret_version = aws.secretsmanager.SecretVersion(
            "tern-pooler-admin", secret_id=pooler_admin_secret.id,
            secret_string=pulumi.Output.secret(cfg.pooler_admin_password).apply(
                lambda pw: json.dumps({"username": ADMIN_USER, "password": pw})))
        assert network.pooler is not None and network.pooler_lb is not None
        pooler = Poolers("tern-pooler", PoolersArgs(
            zones=cfg.zones, subnets=cfg.private_subnets, vpc_id=cfg.vpc_id, security_group_id=network.pooler.id,
            lb_security_group_id=network.pooler_lb.id, instance_type=cfg.pooler_instance_type, ami_id=ami,
            region=cfg.region, pgbouncer_version=cfg.pgbouncer_version, admin_cidrs=cfg.admin_cidrs,
            # the secret's ARN once its value is stored: a node reads the password once, at first boot
            admin_secret_arn=pulumi.Output.all(pooler_admin_secret.arn, pooler_admin_secret_version.id)
            .apply(lambda v: v[0]),
            command_output_bucket=replicas.command_output.bucket,
            protect=cfg.protect, tags=tags))
    # a read-only lookup: nothing in `pulumi up` touches the running app (a config-var change restarts every dyno)
    heroku_app = HerokuApp("tern-heroku", HerokuArgs(app_name=cfg.heroku_app))

    data_dir = f"/var/lib/postgresql/{cfg.pg_major}/main"
    outputs: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "stack": stack_name,
        "rehearsal": cfg.rehearsal,
        "region": cfg.region,
        "source": {"heroku_app": cfg.heroku_app, "database_url_var": "DATABASE_URL", "pg_major": cfg.pg_major,
                   "archive": {"kind": "s3", "location": f"s3://{cfg.wal_archive_bucket}/{cfg.wal_archive_prefix.strip('/')}",
                               "base_backup": "LATEST", "env_dir": WALG_ENV_DIR}},
        "app": {"kind": "heroku", "name": cfg.heroku_app, "api_key": "env:HEROKU_API_KEY"},
        "replicas": [
            {"name": name, "availability_zone": zone, "host": inst.private_ip, "port": 5432, "database": cfg.database,
             "data_dir": data_dir, "bin_dir": f"/usr/lib/postgresql/{cfg.pg_major}/bin",
             "socket_dir": "/var/run/postgresql",
             "commands": {"kind": "ssm", "instance_id": inst.id, "region": cfg.region, "os_user": "postgres",
                          "output_bucket": replicas.command_output.bucket, "output_prefix": COMMAND_OUTPUT_PREFIX}}
            for name, zone, inst in zip(replicas.names, replicas.zones, replicas.instances)],
        "aurora": {"writer_endpoint": aurora.cluster.endpoint, "reader_endpoint": aurora.cluster.reader_endpoint,
                   "port": 5432, "database": cfg.database, "master_user": "tern_master",
                   "master_password": aurora.master_secret_arn.apply(lambda arn: f"aws-secretsmanager:{arn}#password"),
                   # what only the RDS API does (parameter group, reboot, snapshots): runbook/adapters/aurora.py
                   "api": {"kind": "rds", "cluster_identifier": aurora.cluster_identifier,
                           "parameter_group": aurora.parameter_group_name, "region": cfg.region}},
        "dms": {"region": cfg.region, "replication_task_arn": dms.task.replication_task_arn,
                "replication_instance_arn": dms.instance.replication_instance_arn,
                "source_endpoint_arn": dms.source.endpoint_arn, "target_endpoint_arn": dms.target.endpoint_arn},
        "credentials": {"replication_password": replication_secret.arn.apply(
            lambda arn: f"aws-secretsmanager:{arn}#password")},
        # where tern runs: restore admits tern's client certificate on the replicas from these only
        "admin_cidrs": list(cfg.admin_cidrs),
    }
    if pooler is not None and pooler_admin_secret is not None:
        # the app's one endpoint (the NLB) and, per node, what tern needs to PAUSE, repoint and RESUME it
        outputs["pooler"] = {
            "kind": "pgbouncer", "host": pooler.load_balancer.dns_name, "port": POOLER_PORT, "database": cfg.database,
            "tls": True, "admin_user": ADMIN_USER,
            "admin_password": pooler_admin_secret.arn.apply(lambda arn: f"aws-secretsmanager:{arn}#password"),
            "nodes": [
                {"name": name, "availability_zone": zone, "admin_host": inst.private_ip, "admin_port": POOLER_PORT,
                 "commands": {"kind": "ssm", "instance_id": inst.id, "region": cfg.region, "os_user": "postgres",
                              "output_bucket": replicas.command_output.bucket, "output_prefix": COMMAND_OUTPUT_PREFIX},
                 "databases_file": DATABASES_FILE, "auth_file": USERLIST_FILE}
                for name, zone, inst in zip(pooler.names, pooler.zones, pooler.instances)],
        }
    return Stack(network, replicas, aurora, dms, heroku_app, replication_secret, outputs,
                 replication_secret_version=replication_secret_version, pooler=pooler,
                 pooler_admin_secret=pooler_admin_secret, pooler_admin_secret_version=pooler_admin_secret_version)
