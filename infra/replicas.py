"""EC2 PostgreSQL replicas, one per availability zone, ready for ``invoke restore``."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from . import binaries

USER_DATA = """#!/bin/bash
# tern replica bootstrap: PostgreSQL {pg_major} (PGDG) and WAL-G, stopped and empty until `invoke restore`.
set -euo pipefail
apt-get update -q
apt-get install -y -q curl ca-certificates gnupg daemontools xfsprogs awscli python3 openssl
{pgdg_key}
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
{walg}
install -d -m 750 -o root -g postgres /etc/wal-g.env
echo "s3://{bucket}/{prefix}" > /etc/wal-g.env/WALG_S3_PREFIX
echo "{region}" > /etc/wal-g.env/AWS_REGION
chmod 640 /etc/wal-g.env/* && chgrp postgres /etc/wal-g.env/*
# TLS only. The unix socket lives in a 0700 directory only the postgres user (and root) can enter,
# so `local ... trust` admits nobody else; kept 0700 across reboots (the earliest tmpfiles.d name wins).
echo "d /run/postgresql 0700 postgres postgres -" > /etc/tmpfiles.d/00-tern-postgresql.conf
install -d -m 0700 -o postgres -g postgres {socket_dir} && chmod 0700 {socket_dir}
# a self-signed certificate made on the host: clients use sslmode=require (DMS: ssl_mode require)
install -d -m 0700 -o postgres -g postgres {conf_dir}
[ -s {conf_dir}/server.key ] || openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -sha256 \\
  -subj "/CN=$(hostname -f)" -keyout {conf_dir}/server.key -out {conf_dir}/server.crt
chown postgres:postgres {conf_dir}/server.key {conf_dir}/server.crt
chmod 600 {conf_dir}/server.key && chmod 644 {conf_dir}/server.crt
cat > {conf_dir}/pg_hba.conf <<'HBA'
{pg_hba}HBA
cat > {conf_dir}/tls.conf <<'CONF'
{tls_conf}CONF
chown postgres:postgres {conf_dir}/pg_hba.conf {conf_dir}/tls.conf
chmod 600 {conf_dir}/pg_hba.conf {conf_dir}/tls.conf
"""

SOCKET_DIR = "/var/run/postgresql"     # the outputs' replicas[].socket_dir
COMMAND_OUTPUT_PREFIX = "tern/ssm"     # the outputs' replicas[].commands.output_prefix
COMMAND_OUTPUT_DAYS = 7                # command output holds sampled rows: kept a week, then expired
CONF_DIR = "/etc/tern/postgresql"      # certificate, key, pg_hba.conf and tls.conf; 0700 postgres
WALG_ENV_DIR = "/etc/wal-g.env"         # WAL-G's settings, one file a variable (envdir): the outputs' archive.env_dir
# The data directory is made at `invoke restore` (from Heroku's base backup), after this script has run:
# the restore must start the server with these settings (hba_file, ssl, ssl_cert_file, ssl_key_file from
# tls.conf) rather than its own pg_hba.conf, or they do not apply.

# Every TCP entry is hostssl + scram-sha-256: a connection without TLS matches no line and is refused.
PG_HBA = """# tern: TCP only over TLS with SCRAM; the unix socket's directory is 0700 (postgres only)
local    all          all                trust
local    replication  all                trust
hostssl  all          all    0.0.0.0/0   scram-sha-256
hostssl  replication  all    0.0.0.0/0   scram-sha-256
hostssl  all          all    ::/0        scram-sha-256
hostssl  replication  all    ::/0        scram-sha-256
"""

TLS_CONF = f"""# tern: the server settings that make the replica TLS only (with {CONF_DIR}/pg_hba.conf)
ssl = on
ssl_cert_file = '{CONF_DIR}/server.crt'
ssl_key_file = '{CONF_DIR}/server.key'
ssl_min_protocol_version = 'TLSv1.2'
password_encryption = 'scram-sha-256'
hba_file = '{CONF_DIR}/pg_hba.conf'
unix_socket_directories = '{SOCKET_DIR}'
unix_socket_permissions = 0700
"""


def render_user_data(*, pg_major: int, bucket: str, prefix: str, region: str, walg_sha256: str,
                     walg_version: str = binaries.WALG_VERSION, walg_url: str | None = None) -> str:
    """The instance's first-boot script (plain text; the launch template takes it base64-encoded).
    What it downloads is pinned and verified before it is installed (:mod:`infra.binaries`)."""
    walg = binaries.walg_install(version=walg_version, sha256=walg_sha256, url=walg_url).rstrip("\n")
    return USER_DATA.format(pg_major=pg_major, bucket=bucket, prefix=prefix.strip("/"), region=region,
                            socket_dir=SOCKET_DIR, conf_dir=CONF_DIR, pg_hba=PG_HBA, tls_conf=TLS_CONF,
                            pgdg_key=binaries.pgdg_key_install().rstrip("\n"), walg=walg)


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
    # a rehearsal's data volumes go with their instances (pulumi destroy leaves nothing paid behind); prod keeps
    # them past a termination, by hand or by accident
    rehearsal: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    # WAL-G, pinned (infra/binaries.py): the checksum has no default, so a stack without tern:walg_sha256 fails here
    walg_sha256: str | None = None
    walg_version: str = binaries.WALG_VERSION
    walg_url: str | None = None


class Replicas(pulumi.ComponentResource):
    """``count`` instances spread round-robin over ``zones``; IMDSv2 only, no public IP,
    encrypted gp3 data volume, an instance profile for SSM and read access to the archive."""

    def __init__(self, name: str, args: ReplicasArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        if not args.walg_sha256:
            raise ValueError("tern:walg_sha256 is not set: the SHA-256 of WAL-G's release tarball "
                             f"({binaries.WALG_ASSET}.tar.gz, {args.walg_version}) is required, the replicas install "
                             "nothing unverified (pulumi config set tern:walg_sha256 <64 hex digits> -s <stack>)")
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
        # SSM returns only the first 24,000 characters of a command's output; the agent writes all of it here,
        # and the runbook reads it back (replicas[].commands.output_bucket)
        self.command_output = aws.s3.Bucket(f"{name}-ssm-output", force_destroy=not args.protect, tags=args.tags,
                                            opts=child)
        self.command_output_private = aws.s3.BucketPublicAccessBlock(
            f"{name}-ssm-output-private", bucket=self.command_output.id, block_public_acls=True,
            block_public_policy=True, ignore_public_acls=True, restrict_public_buckets=True, opts=child)
        self.command_output_expiry = aws.s3.BucketLifecycleConfiguration(
            f"{name}-ssm-output-expiry", bucket=self.command_output.id,
            rules=[{"id": "expire-command-output", "status": "Enabled",
                    "filter": {"prefix": f"{COMMAND_OUTPUT_PREFIX}/"},
                    "expiration": {"days": COMMAND_OUTPUT_DAYS}}], opts=child)
        self.command_output_write = aws.iam.RolePolicy(
            f"{name}-ssm-output-write", role=self.role.id,
            policy=self.command_output.arn.apply(lambda arn: json.dumps({
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": ["s3:PutObject"], "Resource": f"{arn}/{COMMAND_OUTPUT_PREFIX}/*"},
                    {"Effect": "Allow", "Action": ["s3:GetEncryptionConfiguration"], "Resource": arn},
                ],
            })), opts=child)
        self.profile = aws.iam.InstanceProfile(f"{name}-profile", role=self.role.name, opts=child)
        self.user_data = render_user_data(pg_major=args.pg_major, bucket=args.wal_archive_bucket, prefix=prefix,
                                          region=args.region, walg_sha256=args.walg_sha256,
                                          walg_version=args.walg_version, walg_url=args.walg_url)
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
                    encrypted="true", delete_on_termination="true" if args.rehearsal else "false")),
            ],
            user_data=base64.b64encode(self.user_data.encode()).decode(),
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
