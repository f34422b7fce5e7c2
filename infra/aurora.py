"""The Aurora PostgreSQL cluster: encrypted, TLS only, logical replication on, spread over zones."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws


@dataclass
class AuroraArgs:
    engine_version: str
    instance_class: str
    instance_count: int
    zones: list[str]
    subnet_ids: list[str]
    security_group_id: pulumi.Input[str]
    database: str
    backup_retention_days: int
    production: bool
    protect: bool = False
    master_username: str = "tern_master"
    tags: dict[str, str] = field(default_factory=dict)


class Aurora(pulumi.ComponentResource):
    """The master password is managed by Secrets Manager (never in config, state outputs or exports)."""

    def __init__(self, name: str, args: AuroraArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tern:infra:Aurora", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        stateful = pulumi.ResourceOptions(parent=self, protect=args.protect)
        major = args.engine_version.split(".")[0]
        self.key = aws.kms.Key(f"{name}-key", description="tern Aurora storage", enable_key_rotation=True,
                               deletion_window_in_days=30, tags=args.tags, opts=stateful)
        self.parameter_group = aws.rds.ClusterParameterGroup(
            f"{name}-params", family=f"aurora-postgresql{major}", description="tern: TLS only, logical replication",
            parameters=[
                aws.rds.ClusterParameterGroupParameterArgs(name="rds.force_ssl", value="1"),
                # a reverse logical path from Aurora back to EC2 keeps a rollback possible after hop 2
                aws.rds.ClusterParameterGroupParameterArgs(name="rds.logical_replication", value="1",
                                                           apply_method="pending-reboot"),
            ], tags=args.tags, opts=child)
        self.subnet_group = aws.rds.SubnetGroup(f"{name}-subnets", subnet_ids=args.subnet_ids, tags=args.tags,
                                                opts=child)
        self.cluster = aws.rds.Cluster(
            f"{name}-cluster", engine="aurora-postgresql", engine_version=args.engine_version,
            database_name=args.database, master_username=args.master_username,
            manage_master_user_password=True, storage_encrypted=True, kms_key_id=self.key.arn,
            db_cluster_parameter_group_name=self.parameter_group.name, db_subnet_group_name=self.subnet_group.name,
            vpc_security_group_ids=[args.security_group_id], backup_retention_period=args.backup_retention_days,
            deletion_protection=args.production, skip_final_snapshot=not args.production,
            final_snapshot_identifier=f"{name}-final" if args.production else None,
            copy_tags_to_snapshot=True, iam_database_authentication_enabled=True,
            tags=args.tags, opts=stateful)
        self.instances: list[aws.rds.ClusterInstance] = []
        for i in range(args.instance_count):
            zone = args.zones[i % len(args.zones)]
            self.instances.append(aws.rds.ClusterInstance(
                f"{name}-{i + 1}", cluster_identifier=self.cluster.id, engine="aurora-postgresql",
                engine_version=args.engine_version, instance_class=args.instance_class, availability_zone=zone,
                publicly_accessible=False, db_subnet_group_name=self.subnet_group.name, tags=args.tags,
                opts=stateful))
        self.register_outputs({"endpoint": self.cluster.endpoint, "reader_endpoint": self.cluster.reader_endpoint})

    @property
    def cluster_identifier(self) -> pulumi.Output[str]:
        """The cluster's identifier for the RDS API (an ``aws.rds.Cluster``'s ID is its identifier)."""
        return self.cluster.id

    @property
    def parameter_group_name(self) -> pulumi.Output[str]:
        """The cluster parameter group's name (a ``ClusterParameterGroup``'s ID is its name)."""
        return self.parameter_group.id

    @property
    def master_secret_arn(self) -> pulumi.Output[str]:
        return self.cluster.master_user_secrets.apply(lambda s: s[0]["secret_arn"] if s and isinstance(s[0], dict)
                                                      else (s[0].secret_arn if s else ""))
