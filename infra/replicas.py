"""EC2 PostgreSQL replicas, one per availability zone, ready for ``invoke restore``."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

USER_DATA = """#!/bin/bash
# tern replica bootstrap: PostgreSQL {pg_major} (PGDG) and WAL-G, stopped and empty until `invoke restore`.
set -euo pipefail
apt-get update -q
apt-get install -y -q curl ca-certificates gnupg daemontools xfsprogs awscli python3
install -d /usr/share/postgresql-common/pgdg
curl -fsSo /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc https://www.postgresql.org/media/keys/ACCC4CF8.asc
echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt $(. /etc/os-release; echo $VERSION_CODENAME)-pgdg main" > /etc/apt/sources.list.d/pgdg.list
apt-get update -q
apt-get install -y -q postgresql-{pg_major} postgresql-contrib-{pg_major}
systemctl stop postgresql && systemctl disable postgresql
pg_dropcluster {pg_major} main || true
# the encrypted data volume
dev=/dev/nvme1n1; [ -e $dev ] || dev=/dev/xvdf
blkid $dev || mkfs.xfs $dev
install -d -o postgres -g postgres /var/lib/postgresql/{pg_major}
grep -q /var/lib/postgresql/{pg_major} /etc/fstab || echo "$dev /var/lib/postgresql/{pg_major} xfs defaults,noatime 0 2" >> /etc/fstab
mount -a && chown postgres:postgres /var/lib/postgresql/{pg_major}
# WAL-G reads Heroku's archive with the instance role
curl -fsSL -o /tmp/wal-g.tar.gz https://github.com/wal-g/wal-g/releases/download/v3.0.5/wal-g-pg-ubuntu-22.04-amd64.tar.gz
tar -xzf /tmp/wal-g.tar.gz -C /usr/local/bin && mv /usr/local/bin/wal-g-pg-ubuntu-22.04-amd64 /usr/local/bin/wal-g
install -d -m 750 -o root -g postgres /etc/wal-g.env
echo "s3://{bucket}/{prefix}" > /etc/wal-g.env/WALG_S3_PREFIX
echo "{region}" > /etc/wal-g.env/AWS_REGION
chmod 640 /etc/wal-g.env/* && chgrp postgres /etc/wal-g.env/*
"""


@dataclass
class ReplicasArgs:
    count: int
    zones: list[str]
    subnets: dict[str, str]
    security_group_id: pulumi.Input[str]
    instance_type: str
    ebs_size_gb: int
    ebs_iops: int
    pg_major: int
    ami_id: pulumi.Input[str]
    region: str
    wal_archive_bucket: str
    wal_archive_prefix: str
    replication_secret_arn: pulumi.Input[str] | None = None
    protect: bool = False
    tags: dict[str, str] = field(default_factory=dict)


class Replicas(pulumi.ComponentResource):
    """``count`` instances spread round-robin over ``zones``; IMDSv2 only, no public IP,
    encrypted gp3 data volume, an instance profile for SSM and read access to the archive."""

    def __init__(self, name: str, args: ReplicasArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tern:infra:Replicas", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        stateful = pulumi.ResourceOptions(parent=self, protect=args.protect)
        self.role = aws.iam.Role(f"{name}-role", assume_role_policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
        }), tags=args.tags, opts=child)
        self.ssm = aws.iam.RolePolicyAttachment(f"{name}-ssm", role=self.role.name,
                                                policy_arn="arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
                                                opts=child)
        prefix = args.wal_archive_prefix.strip("/")
        self.archive_read = aws.iam.RolePolicy(f"{name}-archive-read", role=self.role.id, policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{args.wal_archive_bucket}",
                 "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*", prefix]}}},
                {"Effect": "Allow", "Action": ["s3:GetObject"],
                 "Resource": f"arn:aws:s3:::{args.wal_archive_bucket}/{prefix}/*"},
            ],
        }), opts=child)
        if args.replication_secret_arn is not None:
            # the repoint writes the replication passfile on the host from Secrets Manager,
            # so the password never travels in an SSM command
            self.secret_read = aws.iam.RolePolicy(
                f"{name}-replication-secret", role=self.role.id,
                policy=pulumi.Output.from_input(args.replication_secret_arn).apply(lambda arn: json.dumps({
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": arn}],
                })), opts=child)
        self.profile = aws.iam.InstanceProfile(f"{name}-profile", role=self.role.name, opts=child)
        user_data = USER_DATA.format(pg_major=args.pg_major, bucket=args.wal_archive_bucket, prefix=prefix,
                                     region=args.region)
        self.launch_template = aws.ec2.LaunchTemplate(
            f"{name}-lt",
            image_id=args.ami_id, instance_type=args.instance_type,
            metadata_options=aws.ec2.LaunchTemplateMetadataOptionsArgs(http_tokens="required", http_endpoint="enabled",
                                                                      http_put_response_hop_limit=1),
            iam_instance_profile=aws.ec2.LaunchTemplateIamInstanceProfileArgs(arn=self.profile.arn),
            block_device_mappings=[
                aws.ec2.LaunchTemplateBlockDeviceMappingArgs(device_name="/dev/xvda", ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_size=30, volume_type="gp3", encrypted="true", delete_on_termination="true")),
                aws.ec2.LaunchTemplateBlockDeviceMappingArgs(device_name="/dev/xvdf", ebs=aws.ec2.LaunchTemplateBlockDeviceMappingEbsArgs(
                    volume_size=args.ebs_size_gb, volume_type="gp3", iops=args.ebs_iops, throughput=500,
                    encrypted="true", delete_on_termination="false")),
            ],
            user_data=base64.b64encode(user_data.encode()).decode(),
            tag_specifications=[aws.ec2.LaunchTemplateTagSpecificationArgs(resource_type="volume", tags=args.tags)],
            tags=args.tags, opts=child)
        self.instances: list[aws.ec2.Instance] = []
        self.names: list[str] = []
        self.zones: list[str] = []
        for i in range(args.count):
            zone = args.zones[i % len(args.zones)]
            replica = f"ec2-{chr(ord('a') + i)}"
            inst = aws.ec2.Instance(
                f"{name}-{replica}",
                launch_template=aws.ec2.InstanceLaunchTemplateArgs(id=self.launch_template.id, version="$Latest"),
                subnet_id=args.subnets[zone], availability_zone=zone,
                vpc_security_group_ids=[args.security_group_id], associate_public_ip_address=False,
                metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required", http_endpoint="enabled"),
                root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(encrypted=True, volume_type="gp3"),
                tags={**args.tags, "Name": f"tern-{replica}", "tern:replica": replica},
                opts=stateful)
            self.instances.append(inst)
            self.names.append(replica)
            self.zones.append(zone)
        self.register_outputs({"instance_ids": [i.id for i in self.instances]})
