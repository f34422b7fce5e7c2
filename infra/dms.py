"""AWS DMS: the EC2 leader to the Aurora writer, full load and CDC, TLS, validation on.

TLS: the target (Aurora) is ``verify-full`` against the RDS CA bundle; the source (an EC2
replica with a certificate self-signed at boot, see ``replicas.py``) is ``require``:
encrypted, but DMS cannot verify a certificate no CA it trusts has signed.

The source follows the leader. ``source_host`` is the replica chosen by stack config
(``tern:dms_source_replica``, default the first; nothing is fixed to replica 0). The
endpoints authenticate through Secrets Manager, and then DMS takes host and port *from the
secret* (AWS: secret or ServerName/Port, not both; the provider sends no ServerName), so the
stack writes the chosen replica's address into the source secret (``host``, ``port``) and
keeps ``server_name`` equal to it for the reader and the diff. After hop 1 promotes another
replica, the runbook's DMS adapter repoints the source before the task (re)starts: task
stopped, ``secretsmanager.put_secret_value`` on the replication secret (its ARN is in the
outputs' ``credentials.replication_password`` reference) with the new leader's ``host``,
username and password kept; then ``dms.test_connection`` (outputs ``dms.replication_instance_arn``
and ``dms.source_endpoint_arn``) before resuming. The operator then sets
``tern:dms_source_replica`` to the new leader so a later ``pulumi up`` does not point DMS
back at the old one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

TASK_SETTINGS = {
    "TargetMetadata": {
        # the runbook creates the schema on Aurora; DMS must not drop or recreate tables
        "SupportLobs": True, "FullLobMode": True, "LobChunkSize": 64, "LimitedSizeLobMode": False,
        "LobMaxSize": 0,
    },
    "FullLoadSettings": {"TargetTablePrepMode": "DO_NOTHING", "MaxFullLoadSubTasks": 8},
    "ValidationSettings": {"EnableValidation": True, "ValidationMode": "ROW_LEVEL", "ThreadCount": 5,
                           "FailureMaxCount": 10000, "HandleCollationDiff": True},
    "Logging": {"EnableLogging": True},
    # DMS's control tables on Aurora (awsdms_apply_exceptions, awsdms_validation_failures_v1) go in tern's own
    # schema, which tern's verification leaves out (elsewhere they would count as differences)
    "ControlTablesSettings": {"ControlSchema": "tern"},
    "ChangeProcessingTuning": {"CommitTimeout": 1, "BatchApplyEnabled": False},
}


@dataclass
class DmsArgs:
    instance_class: str
    subnet_ids: list[str]
    security_group_id: pulumi.Input[str]
    source_host: pulumi.Input[str]
    target_host: pulumi.Input[str]
    database: str
    certificate_arn: str
    source_secret_arn: pulumi.Input[str]            # a secret holding username, password, host, port
    target_secret_arn: pulumi.Input[str]
    schemas: list[str] = field(default_factory=lambda: ["public"])
    production: bool = False
    protect: bool = False
    tags: dict[str, str] = field(default_factory=dict)


class Dms(pulumi.ComponentResource):
    def __init__(self, name: str, args: DmsArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tern:infra:Dms", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        self.secrets_role = aws.iam.Role(f"{name}-secrets-role", assume_role_policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "dms.amazonaws.com"}, "Action": "sts:AssumeRole"}],
        }), tags=args.tags, opts=child)
        self.secrets_policy = aws.iam.RolePolicy(
            f"{name}-secrets-read", role=self.secrets_role.id,
            policy=pulumi.Output.all(args.source_secret_arn, args.target_secret_arn).apply(lambda arns: json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": list(arns)}],
            })), opts=child)
        self.subnet_group = aws.dms.ReplicationSubnetGroup(
            f"{name}-subnets", replication_subnet_group_id=f"{name}-subnets",
            replication_subnet_group_description="tern DMS", subnet_ids=args.subnet_ids, tags=args.tags, opts=child)
        self.instance = aws.dms.ReplicationInstance(
            f"{name}-instance", replication_instance_id=f"{name}-instance",
            replication_instance_class=args.instance_class, allocated_storage=100,
            publicly_accessible=False, multi_az=args.production,
            replication_subnet_group_id=self.subnet_group.id, vpc_security_group_ids=[args.security_group_id],
            tags=args.tags, opts=child)
        common = dict(port=5432, database_name=args.database,
                      secrets_manager_access_role_arn=self.secrets_role.arn)
        # the source moves with the leader (see the module docstring): a self-signed certificate, so `require`.
        # test_decoding ships with PostgreSQL (pglogical would need the extension preloaded on the leader: a
        # restart); no DDL capture (its artifacts - a table, a function, an event trigger - need a superuser,
        # and tern refuses DDL during hop 2 with its own guard); no heartbeat (it writes on the leader through
        # the fence: one inside failover-aurora's window makes the failover fall back). replicate-aurora's risk
        # register checks each of these on the live endpoint.
        self.source = aws.dms.Endpoint(
            f"{name}-source", endpoint_id=f"{name}-source", endpoint_type="source", engine_name="postgres",
            server_name=args.source_host, ssl_mode="require", secrets_manager_arn=args.source_secret_arn,
            tags=args.tags,
            postgres_settings=aws.dms.EndpointPostgresSettingsArgs(plugin_name="test_decoding", capture_ddls=False,
                                                                   heartbeat_enable=False),
            opts=child, **common)
        # DMS writes as an ordinary session: with the replica role, Aurora's triggers (and the foreign keys'
        # triggers) do not fire on the rows it applies, as for native logical replication's apply worker
        self.target = aws.dms.Endpoint(
            f"{name}-target", endpoint_id=f"{name}-target", endpoint_type="target", engine_name="aurora-postgresql",
            server_name=args.target_host, ssl_mode="verify-full", certificate_arn=args.certificate_arn,
            secrets_manager_arn=args.target_secret_arn, tags=args.tags,
            postgres_settings=aws.dms.EndpointPostgresSettingsArgs(
                after_connect_script="SET session_replication_role = replica"),
            opts=child, **common)
        mappings = {"rules": [
            {"rule-type": "selection", "rule-id": str(i + 1), "rule-name": f"schema-{s}",
             "object-locator": {"schema-name": s, "table-name": "%"}, "rule-action": "include"}
            for i, s in enumerate(args.schemas)]}
        # tern's sentinel: failover-aurora proves the catch-up by its row reaching Aurora
        mappings["rules"].append({"rule-type": "selection", "rule-id": str(len(args.schemas) + 1),
                                  "rule-name": "tern-sentinel", "rule-action": "include",
                                  "object-locator": {"schema-name": "tern", "table-name": "sentinel"}})
        self.task = aws.dms.ReplicationTask(
            f"{name}-task", replication_task_id=f"{name}-task", migration_type="full-load-and-cdc",
            replication_instance_arn=self.instance.replication_instance_arn,
            source_endpoint_arn=self.source.endpoint_arn, target_endpoint_arn=self.target.endpoint_arn,
            table_mappings=json.dumps(mappings), replication_task_settings=json.dumps(TASK_SETTINGS),
            start_replication_task=False, tags=args.tags, opts=child)
        self.register_outputs({"task_arn": self.task.replication_task_arn})
