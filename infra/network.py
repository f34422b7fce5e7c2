"""Security groups: replicas and Aurora reachable on 5432 only from who needs them; no SSH at all.

The pooler's two groups live here too, not in ``infra/pooler.py``: the replicas' and Aurora's inline
rules must name the pooler's group (a rule added from outside would fight the inline ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

PG_PORT = 5432
POOLER_PORT = 6432


@dataclass
class NetworkArgs:
    vpc_id: str
    app_source_security_groups: list[str] = field(default_factory=list)
    app_source_cidrs: list[str] = field(default_factory=list)
    pooler: bool = False
    admin_cidrs: list[str] = field(default_factory=list)   # where tern runs: the pooler's admin console, the replicas
    tags: dict[str, str] = field(default_factory=dict)


class Network(pulumi.ComponentResource):
    """Three groups: ``replicas``, ``aurora``, ``dms``; with the pooler, ``pooler_lb`` and ``pooler`` too.

    Replicas accept 5432 from each other (replication), from DMS, from the app sources and from
    ``admin_cidrs`` (tern's SQL over TLS with its client certificate);
    Aurora from DMS, the replicas and the app sources. Egress is open (packages, S3, SSM); this
    program creates no NAT gateway or VPC endpoint, so the VPC named by ``tern:vpc_id`` must route the
    private subnets to what the hosts fetch and call (README: "Outbound access the private subnets need").
    Hosts are reached through SSM, so no rule opens port 22.

    With the pooler: its load balancer accepts 6432 from the app sources and sends only to the
    pooler's group; the pooler instances accept 6432 from the load balancer's group (client traffic,
    its client IP preserved, and health checks) and from ``admin_cidrs`` (tern, at each node's own
    address); the replicas and Aurora accept 5432 from the pooler (PgBouncer's server connections).
    """

    def __init__(self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tern:infra:Network", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        egress = [aws.ec2.SecurityGroupEgressArgs(protocol="-1", from_port=0, to_port=0, cidr_blocks=["0.0.0.0/0"],
                                                  description="packages, S3, SSM endpoints")]
        self.dms = aws.ec2.SecurityGroup(f"{name}-dms", vpc_id=args.vpc_id, description="tern DMS replication instance",
                                         egress=egress, tags={**args.tags, "Name": f"{name}-dms"}, opts=child)
        app_rules = self._app_rules(args, "app sources")
        self.pooler_lb: aws.ec2.SecurityGroup | None = None
        self.pooler: aws.ec2.SecurityGroup | None = None
        self.pooler_lb_to_pooler: aws.vpc.SecurityGroupEgressRule | None = None
        from_pooler: list[aws.ec2.SecurityGroupIngressArgs] = []
        if args.pooler:
            # no inline egress: the one rule below (the load balancer sends to the pooler only) is the whole of it
            self.pooler_lb = aws.ec2.SecurityGroup(
                f"{name}-pooler-lb", vpc_id=args.vpc_id, description="tern pooler load balancer",
                ingress=self._app_rules(args, "app sources", POOLER_PORT),
                tags={**args.tags, "Name": f"{name}-pooler-lb"}, opts=child)
            self.pooler = aws.ec2.SecurityGroup(
                f"{name}-pooler", vpc_id=args.vpc_id, description="tern PgBouncer poolers",
                ingress=[
                    aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=POOLER_PORT, to_port=POOLER_PORT,
                                                     security_groups=[self.pooler_lb.id],
                                                     description="clients and health checks through the load balancer"),
                    *([aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=POOLER_PORT, to_port=POOLER_PORT,
                                                        cidr_blocks=args.admin_cidrs,
                                                        description="tern: the admin console")]
                      if args.admin_cidrs else []),
                ],
                egress=egress, tags={**args.tags, "Name": f"{name}-pooler"}, opts=child)
            self.pooler_lb_to_pooler = aws.vpc.SecurityGroupEgressRule(
                f"{name}-pooler-lb-to-pooler", security_group_id=self.pooler_lb.id, ip_protocol="tcp",
                from_port=POOLER_PORT, to_port=POOLER_PORT, referenced_security_group_id=self.pooler.id,
                description="to the poolers: client traffic and health checks", tags=args.tags, opts=child)
            from_pooler = [aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                            security_groups=[self.pooler.id],
                                                            description="PgBouncer server connections")]
        self.replicas = aws.ec2.SecurityGroup(
            f"{name}-replicas", vpc_id=args.vpc_id, description="tern EC2 PostgreSQL replicas",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT, self=True,
                                                 description="replication between replicas"),
                aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                 security_groups=[self.dms.id], description="DMS source endpoint"),
                *from_pooler,
                *app_rules,
                # tern's SQL over TLS with its client certificate (runbook/client_tls.py), from where it runs
                *([aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                    cidr_blocks=args.admin_cidrs,
                                                    description="tern: SQL over TLS with its client certificate")]
                  if args.admin_cidrs else []),
            ],
            egress=egress, tags={**args.tags, "Name": f"{name}-replicas"}, opts=child)
        self.aurora = aws.ec2.SecurityGroup(
            f"{name}-aurora", vpc_id=args.vpc_id, description="tern Aurora cluster",
            ingress=[
                aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=PG_PORT, to_port=PG_PORT,
                                                 security_groups=[self.dms.id, self.replicas.id],
                                                 description="DMS and logical replication from the replicas"),
                *from_pooler,
                *app_rules,
            ],
            egress=egress, tags={**args.tags, "Name": f"{name}-aurora"}, opts=child)
        self.register_outputs({"replicas_sg": self.replicas.id, "aurora_sg": self.aurora.id, "dms_sg": self.dms.id,
                               "pooler_sg": self.pooler.id if self.pooler else None})

    @staticmethod
    def _app_rules(args: NetworkArgs, what: str, port: int = PG_PORT) -> list[aws.ec2.SecurityGroupIngressArgs]:
        rules = []
        if args.app_source_security_groups:
            rules.append(aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=port, to_port=port,
                                                          security_groups=args.app_source_security_groups,
                                                          description=what))
        if args.app_source_cidrs:
            rules.append(aws.ec2.SecurityGroupIngressArgs(protocol="tcp", from_port=port, to_port=port,
                                                          cidr_blocks=args.app_source_cidrs, description=what))
        return rules
