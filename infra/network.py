"""Security groups: replicas and Aurora reachable on 5432 only from who needs them; no SSH at all."""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

PG_PORT = 5432


@dataclass
class NetworkArgs:
    vpc_id: str
    app_source_security_groups: list[str] = field(default_factory=list)
    app_source_cidrs: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


class Network(pulumi.ComponentResource):
    """Three groups: ``replicas``, ``aurora``, ``dms``.

    Replicas accept 5432 from each other (replication), from DMS and from the app sources;
    Aurora from DMS, the replicas and the app sources. Egress is open (packages, S3, SSM).
    Hosts are reached through SSM, so no rule opens port 22.
    """

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tern:infra:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        egress = [aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, cidr_blocks=["0.0.0.0/0"],
                                                  description="packages, S3, SSM endpoints")]
        self.dms = aws.ec2.SecurityGroup(f"{name}-dms", vpc_id=args.vpc_id, description="tern DMS replication instance",
                                         egress=egress, tags={**args.tags, "Name": f"{name}-dms"}, opts=child)
        app_rules = self._app_rules(args, "app sources")
        self.replicas = aws.ec2.SecurityGroup(
            f"{name}-replicas", vpc_id=args.vpc_id, description="tern EC2 PostgreSQL replicas",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT, self=True,
                                                 description="replication between replicas"),
                aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                 security_groups=[self.dms.id], description="DMS source endpoint"),
                *app_rules,
            ],
            egress=egress, tags={**args.tags, "Name": f"{name}-replicas"}, opts=child)
        self.aurora = aws.ec2.SecurityGroup(
            f"{name}-aurora", vpc_id=args.vpc_id, description="tern Aurora cluster",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                 security_groups=[self.dms.id, self.replicas.id],
                                                 description="DMS and logical replication from the replicas"),
                *app_rules,
            ],
            egress=egress, tags={**args.tags, "Name": f"{name}-aurora"}, opts=child)
        self.register_outputs({"replicas_sg": self.replicas.id, "aurora_sg": self.aurora.id, "dms_sg": self.dms.id})

    @staticmethod
    def _app_rules(args: NetworkArgs, what: str) -> list[aws.ec2.SecurityGroupIngressArgs]:
        rules = []
        if args.app_source_security_groups:
            rules.append(aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                          security_groups=args.app_source_security_groups,
                                                          description=what))
        if args.app_source_cidrs:
            rules.append(aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                          cidr_blocks=args.app_source_cidrs, description=what))
        return rules
