"""PgBouncer in front of the leader (issue #12): one EC2 pooler per zone behind an internal NLB.

The app's ``DATABASE_URL`` names the load balancer (TCP 6432, TLS end to end: the NLB passes TCP
through and PgBouncer terminates TLS with a certificate made on the host). A switch behind the pooler
is PAUSE, rewrite the databases file, RELOAD, RESUME on every node: no config-var change, no dyno
restart. What tern may touch on a node, as ``postgres`` through SSM Run Command (``pooler.nodes[]``):

* ``/etc/pgbouncer/tern-databases.ini`` - ``%include``d by pgbouncer.ini; it starts with an empty
  ``[databases]`` section (the pooler serves nothing until tern names the leader);
* ``/etc/pgbouncer/userlist.txt`` - the ``auth_file`` (``pooler.nodes[].auth_file``), where tern adds the
  app role's SCRAM verifier, read on a restored replica (``runbook.pooler.ensure_app_auth``, hop 1's
  ``pooler_auth`` step): sealed to a one-time key the node makes (``openssl``, installed below), so that
  SSM's command history never holds it; the file is replaced atomically, 0600, ``postgres``'s.

Both are owned by ``postgres``. ``/etc/pgbouncer`` is root's, group ``postgres``, mode 1770: ``postgres``
may make a temporary file there and rename it over a file it owns (as the runbook's ``write_file`` does),
but the sticky bit keeps it from replacing pgbouncer.ini or the HBA file, which are root's - whoever holds
``postgres`` cannot change who is let in.

The admin console is PgBouncer's virtual database ``pgbouncer`` on the same port. Who reaches it is
decided by ``auth_hba_file`` (which PgBouncer reads only with ``auth_type = hba``; every line that
admits anyone is ``hostssl`` + ``scram-sha-256``, so this is SCRAM over TLS as ``auth_type =
scram-sha-256`` would be, with addresses on top): database ``pgbouncer`` is accepted only for
``tern_admin`` from ``tern:admin_cidrs`` (the NLB preserves client addresses, so this holds through it
too) and rejected from anywhere else; every other database is ``hostssl`` SCRAM from any address the
security groups let through. PgBouncer itself also lets the OS user it runs as (``postgres``) into the
console over its unix socket as user ``pgbouncer``, before any HBA line: that is the SSM channel's
identity, no wider.

The admin password is the config secret ``tern:pooler_admin_password``, kept in Secrets Manager and
exported by reference only. At first boot each node reads it with its instance role (allowed that one
secret) and writes ``tern_admin``'s SCRAM-SHA-256 verifier (PBKDF2-SHA256, 4096 iterations, random
salt, as PostgreSQL computes it) into userlist.txt: the password itself is never on the node's disk,
and a leaked userlist lets nobody log in. A new password reaches a node only when it is replaced.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from .network import POOLER_PORT
from .replicas import COMMAND_OUTPUT_PREFIX

ADMIN_USER = "tern_admin"                               # the outputs' pooler.admin_user (admin_users)
CONF_DIR = "/etc/pgbouncer"
DATABASES_FILE = f"{CONF_DIR}/tern-databases.ini"       # the outputs' pooler.nodes[].databases_file
USERLIST_FILE = f"{CONF_DIR}/userlist.txt"
HBA_FILE = f"{CONF_DIR}/tern-hba.conf"
TLS_DIR = f"{CONF_DIR}/tls"
SOCKET_DIR = "/var/run/postgresql"
USERLIST_SCRIPT = "/usr/local/lib/tern/pooler_admin_userlist.py"

PGBOUNCER_INI = f"""# tern: transaction pooling, TLS both ways; the databases are tern's ({DATABASES_FILE})
[pgbouncer]
listen_addr = *
listen_port = {POOLER_PORT}
unix_socket_dir = {SOCKET_DIR}
logfile = /var/log/postgresql/pgbouncer.log
pidfile = {SOCKET_DIR}/pgbouncer.pid
pool_mode = transaction
auth_type = hba
auth_hba_file = {HBA_FILE}
auth_file = {USERLIST_FILE}
admin_users = {ADMIN_USER}
client_tls_sslmode = require
client_tls_key_file = {TLS_DIR}/server.key
client_tls_cert_file = {TLS_DIR}/server.crt
client_tls_protocols = secure
server_tls_sslmode = require
server_tls_protocols = secure
query_wait_timeout = 120
ignore_startup_parameters = extra_float_digits,options
; the NLB drops a TCP flow idle for 350 s without telling either end: probe well before that
tcp_keepalive = 1
tcp_keepidle = 240
tcp_keepintvl = 30
tcp_keepcnt = 4

%include {DATABASES_FILE}
"""

# The admin script reads the secret's JSON on stdin, so the password is never in a command line or a file.
USERLIST_PY = '''"""Write the admin's SCRAM-SHA-256 verifier into PgBouncer's auth_file; stdin: the secret's JSON."""
import base64
import hashlib
import hmac
import json
import os
import sys

ITERATIONS = 4096   # PostgreSQL's (scram_iterations' default)


def scram_verifier(password, salt, iterations=ITERATIONS):
    """PostgreSQL's verifier (RFC 5803): SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()

    def b64(b):
        return base64.b64encode(b).decode()

    return "SCRAM-SHA-256$%d:%s$%s:%s" % (iterations, b64(salt), b64(stored_key), b64(server_key))


def main(user, path):
    password = json.load(sys.stdin)["password"]
    # clients SASLprep the password, which leaves printable ASCII as it is: anything else is refused
    # rather than turned into a verifier no client would match
    if not password or not all(" " <= c <= "~" for c in password):
        sys.exit("tern: the pooler admin password must be printable ASCII")
    line = '"%s" "%s"\\n' % (user, scram_verifier(password, os.urandom(16)))
    with open(path, "r+") as f:          # in place: the file keeps its owner and mode
        kept = [old for old in f if not old.startswith('"%s" ' % user)]
        f.seek(0)
        f.truncate()
        f.writelines(kept + [line])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
'''

USER_DATA = """#!/bin/bash
# tern pooler bootstrap: PgBouncer {version} (Debian), TLS only, transaction pooling; tern names the database.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q ca-certificates awscli python3 openssl
# exactly the version tern was tried with, held so that no upgrade changes it under a running migration
apt-get install -y -q pgbouncer={version}
apt-mark hold pgbouncer
systemctl stop pgbouncer || true
echo "d /run/postgresql 0700 postgres postgres -" > /etc/tmpfiles.d/00-tern-pgbouncer.conf
install -d -m 0700 -o postgres -g postgres {socket_dir} && chmod 0700 {socket_dir}
install -d -m 0750 -o postgres -g postgres /var/log/postgresql
install -d -m 0750 -o root -g postgres {conf_dir}
# a self-signed certificate made on the host: clients use sslmode=require
install -d -m 0700 -o postgres -g postgres {tls_dir}
[ -s {tls_dir}/server.key ] || openssl req -x509 -newkey rsa:3072 -nodes -days 3650 -sha256 \\
  -subj "/CN=$(hostname -f)" -keyout {tls_dir}/server.key -out {tls_dir}/server.crt
chown postgres:postgres {tls_dir}/server.key {tls_dir}/server.crt
chmod 600 {tls_dir}/server.key && chmod 644 {tls_dir}/server.crt
cat > {hba_file} <<'HBA'
{hba}HBA
cat > {conf_dir}/pgbouncer.ini <<'INI'
{ini}INI
chown root:postgres {hba_file} {conf_dir}/pgbouncer.ini
chmod 640 {hba_file} {conf_dir}/pgbouncer.ini
# the file the runbook rewrites, then RELOAD: no database until tern names the leader
[ -s {databases_file} ] || printf '[databases]\\n' > {databases_file}
chown postgres:postgres {databases_file} && chmod 640 {databases_file}
# empty at first boot (this script runs once): tern adds the app role's verifier later, and the admin's comes next
install -m 0640 -o postgres -g postgres /dev/null {userlist}
install -d -m 0755 /usr/local/lib/tern
cat > {userlist_script} <<'PY'
{userlist_py}PY
# the admin password, read with the instance role (which may read only this secret); retried while the
# role, the secret's value or the network are not there yet
secret_json=""
for _ in $(seq 1 60); do
  secret_json=$(aws secretsmanager get-secret-value --region {region} --secret-id '{secret_arn}' \\
    --query SecretString --output text 2>/dev/null) && break
  secret_json=""
  sleep 10
done
[ -n "$secret_json" ] || {{ echo "tern: cannot read the pooler admin secret {secret_arn}" >&2; exit 1; }}
printf '%s' "$secret_json" | python3 {userlist_script} {admin_user} {userlist}
unset secret_json
# postgres (the SSM channel) may now replace the files it owns here (a temporary file, renamed), and only
# those: pgbouncer.ini and the HBA file are root's, and the sticky bit keeps them
chmod 1770 {conf_dir}
systemctl enable pgbouncer
systemctl restart pgbouncer
"""


def render_hba(admin_cidrs: list[str]) -> str:
    """PgBouncer's HBA file: first match wins, so the console's lines come before the catch-all."""
    lines = ["# tern: TLS + SCRAM over TCP; the admin console (database pgbouncer) only from tern:admin_cidrs"]
    lines += [f"hostssl  pgbouncer  {ADMIN_USER}  {cidr}  scram-sha-256" for cidr in admin_cidrs]
    lines += ["host     pgbouncer  all  0.0.0.0/0  reject",
              "host     pgbouncer  all  ::/0       reject",
              "hostssl  all        all  0.0.0.0/0  scram-sha-256",
              "hostssl  all        all  ::/0       scram-sha-256"]
    return "\n".join(lines) + "\n"


def render_user_data(*, version: str, region: str, secret_arn: str, admin_cidrs: list[str]) -> str:
    """A pooler's first-boot script (plain text)."""
    return USER_DATA.format(version=version, region=region, secret_arn=secret_arn, socket_dir=SOCKET_DIR,
                            conf_dir=CONF_DIR, tls_dir=TLS_DIR, hba_file=HBA_FILE, hba=render_hba(admin_cidrs),
                            ini=PGBOUNCER_INI, databases_file=DATABASES_FILE, userlist=USERLIST_FILE,
                            userlist_script=USERLIST_SCRIPT, userlist_py=USERLIST_PY, admin_user=ADMIN_USER)


def node_name(zone: str, region: str, index: int) -> str:
    """``pooler-a`` for ``us-east-1a``; ``pooler-<n>`` when the zone is not named after the region."""
    suffix = zone[len(region):].strip("-") if zone.startswith(region) else ""
    return f"pooler-{suffix}" if re.fullmatch(r"[a-z0-9][a-z0-9-]*", suffix) else f"pooler-{index + 1}"


@dataclass
class PoolersArgs:
    zones: list[str]
    subnets: dict[str, str]
    vpc_id: str
    security_group_id: pulumi.Input[str]        # the instances' (network.pooler)
    lb_security_group_id: pulumi.Input[str]     # the load balancer's (network.pooler_lb)
    instance_type: str
    ami_id: pulumi.Input[str]
    region: str
    pgbouncer_version: str
    admin_cidrs: list[str]
    admin_secret_arn: pulumi.Input[str]
    command_output_bucket: pulumi.Input[str]    # the replicas' SSM output bucket, reused
    protect: bool = False
    tags: dict[str, str] = field(default_factory=dict)


class Poolers(pulumi.ComponentResource):
    """One instance per zone (IMDSv2 only, no public IP, encrypted root volume, an instance profile for SSM)
    behind an internal, cross-zone NLB: one crash or one zone lost leaves the app a pooler."""

    def __init__(self, name: str, args: PoolersArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        if len(args.zones) < 2:
            raise ValueError(f"tern:private_subnets names {len(args.zones)} availability zone(s); the pooler "
                             "(tern:pooler) needs at least two, one PgBouncer in each")
        super().__init__("tern:infra:Poolers", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        # the NLB's DNS name is in the app's DATABASE_URL, and each node holds what tern wrote: kept in prod
        stateful = pulumi.ResourceOptions(parent=self, protect=args.protect)
        self.role = aws.iam.Role(f"{name}-role", assume_role_policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
        }), tags=args.tags, opts=child)
        self.ssm = aws.iam.RolePolicyAttachment(f"{name}-ssm", role=self.role.name,
                                                policy_arn="arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore",
                                                opts=child)
        self.admin_secret_read = aws.iam.RolePolicy(
            f"{name}-admin-secret", role=self.role.id,
            policy=pulumi.Output.from_input(args.admin_secret_arn).apply(lambda arn: json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": arn}],
            })), opts=child)
        # SSM returns only 24,000 characters inline: the rest goes to the replicas' bucket, same prefix and expiry
        self.command_output_write = aws.iam.RolePolicy(
            f"{name}-ssm-output-write", role=self.role.id,
            policy=pulumi.Output.from_input(args.command_output_bucket).apply(lambda bucket: json.dumps({
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": ["s3:PutObject"],
                     "Resource": f"arn:aws:s3:::{bucket}/{COMMAND_OUTPUT_PREFIX}/*"},
                    {"Effect": "Allow", "Action": ["s3:GetEncryptionConfiguration"], "Resource": f"arn:aws:s3:::{bucket}"},
                ],
            })), opts=child)
        self.profile = aws.iam.InstanceProfile(f"{name}-profile", role=self.role.name, opts=child)
        self.user_data: pulumi.Output[str] = pulumi.Output.from_input(args.admin_secret_arn).apply(
            lambda arn: render_user_data(version=args.pgbouncer_version, region=args.region, secret_arn=arn,
                                         admin_cidrs=args.admin_cidrs))

        self.instances: list[aws.ec2.Instance] = []
        self.names: list[str] = []
        self.zones: list[str] = []
        for i, zone in enumerate(args.zones):
            node = node_name(zone, args.region, i)
            inst = aws.ec2.Instance(
                f"{name}-{node.removeprefix('pooler-')}",
                ami=args.ami_id, instance_type=args.instance_type,
                iam_instance_profile=self.profile.id,            # an instance profile's ID is its name
                subnet_id=args.subnets[zone], availability_zone=zone,
                vpc_security_group_ids=[args.security_group_id], associate_public_ip_address=False,
                metadata_options=aws.ec2.InstanceMetadataOptionsArgs(http_tokens="required", http_endpoint="enabled",
                                                                     http_put_response_hop_limit=1),
                root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(encrypted=True, volume_type="gp3",
                                                                      volume_size=16),
                user_data=self.user_data,
                tags={**args.tags, "Name": f"tern-{node}", "tern:pooler": node},
                # the role must be able to read the secret when the script first asks
                opts=pulumi.ResourceOptions(parent=self, protect=args.protect,
                                            depends_on=[self.admin_secret_read, self.ssm]))
            self.instances.append(inst)
            self.names.append(node)
            self.zones.append(zone)

        self.target_group = aws.lb.TargetGroup(
            f"{name}-tg", port=POOLER_PORT, protocol="TCP", target_type="instance", vpc_id=args.vpc_id,
            # the HBA file sees the client's own address (the admin console's rule depends on it)
            preserve_client_ip="true",
            health_check=aws.lb.TargetGroupHealthCheckArgs(protocol="TCP", port="traffic-port", interval=10,
                                                           healthy_threshold=2, unhealthy_threshold=2),
            tags=args.tags, opts=child)
        self.attachments = [
            aws.lb.TargetGroupAttachment(f"{name}-{node.removeprefix('pooler-')}-target",
                                         target_group_arn=self.target_group.arn, target_id=inst.id, port=POOLER_PORT,
                                         opts=child)
            for node, inst in zip(self.names, self.instances)]
        self.load_balancer = aws.lb.LoadBalancer(
            f"{name}-nlb", load_balancer_type="network", internal=True,
            subnets=[args.subnets[z] for z in args.zones], security_groups=[args.lb_security_group_id],
            enable_cross_zone_load_balancing=True, enable_deletion_protection=args.protect,
            tags=args.tags, opts=stateful)
        self.listener = aws.lb.Listener(
            f"{name}-listener", load_balancer_arn=self.load_balancer.arn, port=POOLER_PORT, protocol="TCP",
            default_actions=[aws.lb.ListenerDefaultActionArgs(type="forward", target_group_arn=self.target_group.arn)],
            tags=args.tags, opts=child)
        self.register_outputs({"dns_name": self.load_balancer.dns_name, "instance_ids": [i.id for i in self.instances]})
