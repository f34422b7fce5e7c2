"""The stack's configuration: the one place ``pulumi.Config`` is read.

Components take the plain :class:`StackConfig` values, never the config object, so they
are testable with any configuration (the tests load ``Pulumi.dev.yaml`` and
``Pulumi.prod.yaml`` through :func:`from_mapping`).
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import binaries

NAMESPACE = "tern"
# Debian 12's pgbouncer: the exact version the pooler installs unless tern:pgbouncer_version names another
PGBOUNCER_VERSION = "1.18.0-1+deb12u1"
# one exact Debian version (upstream-revision): no wildcard, nothing a shell would read as more than a word
_DEBIAN_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+~:]*-[0-9A-Za-z.+~]+$")


@dataclass(frozen=True)
class StackConfig:
    region: str
    vpc_id: str
    private_subnets: dict[str, str]            # availability zone -> subnet id
    app_source_security_groups: list[str]      # who may reach the databases besides the replicas and DMS
    app_source_cidrs: list[str]
    replica_count: int
    instance_type: str
    ebs_size_gb: int
    ebs_iops: int
    pg_major: int
    wal_archive_bucket: str
    wal_archive_prefix: str
    aurora_engine_version: str
    aurora_instance_class: str
    aurora_instance_count: int
    dms_instance_class: str
    dms_ca_certificate_arn: str
    heroku_app: str
    database: str
    rehearsal: bool
    protect: bool
    backup_retention_days: int = 7
    ami_id: str | None = None
    # the replica the DMS source endpoint reads from (a replica name, ``ec2-a`` ...; default the first).
    # After a failover the runbook repoints the endpoint itself; set this to the new leader so the
    # next ``pulumi up`` agrees with it instead of pointing DMS back at the old one.
    dms_source_replica: str | None = None
    replication_password: Any = None           # a config secret (pulumi.Output) - never exported
    tags: dict[str, str] = field(default_factory=dict)
    # PgBouncer in front of the leader (issue #12): one per zone behind an internal NLB (infra/pooler.py)
    pooler: bool = True
    pgbouncer_version: str = PGBOUNCER_VERSION
    pooler_instance_type: str = "c6i.large"
    # where tern runs: the only sources of the admin console and of the replicas' client-certificate hba line
    admin_cidrs: list[str] = field(default_factory=list)
    pooler_admin_password: Any = None          # a config secret (pulumi.Output) - never exported
    # WAL-G on the replicas, pinned (infra/binaries.py): the SHA-256 has no default and `pulumi up` refuses
    # without it; walg_url: a mirror of the same tarball (https) when the subnets cannot reach GitHub
    walg_sha256: str | None = None
    walg_version: str = binaries.WALG_VERSION
    walg_url: str | None = None

    @property
    def zones(self) -> list[str]:
        return sorted(self.private_subnets)


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def from_mapping(values: Mapping[str, Any], *, replication_password: Any = None,
                 pooler_admin_password: Any = None) -> StackConfig:
    """Build from plain key/values (keys without the ``tern:`` prefix); raises on a missing key."""
    v = {k.split(":", 1)[-1]: val for k, val in values.items()}

    def need(key: str) -> Any:
        if key not in v or v[key] in (None, ""):
            raise ValueError(f"stack config is missing {NAMESPACE}:{key}")
        return v[key]

    subnets = need("private_subnets")
    if isinstance(subnets, str):
        subnets = json.loads(subnets)
    cfg = StackConfig(
        region=need("region"), vpc_id=need("vpc_id"), private_subnets=dict(subnets),
        app_source_security_groups=list(_list(v.get("app_source_security_groups"))),
        app_source_cidrs=list(_list(v.get("app_source_cidrs"))),
        replica_count=int(need("replica_count")), instance_type=need("instance_type"),
        ebs_size_gb=int(need("ebs_size_gb")), ebs_iops=int(need("ebs_iops")), pg_major=int(need("pg_major")),
        wal_archive_bucket=need("wal_archive_bucket"), wal_archive_prefix=need("wal_archive_prefix"),
        aurora_engine_version=need("aurora_engine_version"), aurora_instance_class=need("aurora_instance_class"),
        aurora_instance_count=int(need("aurora_instance_count")), dms_instance_class=need("dms_instance_class"),
        dms_ca_certificate_arn=need("dms_ca_certificate_arn"), heroku_app=need("heroku_app"),
        database=need("database"), rehearsal=_bool(need("rehearsal")), protect=_bool(need("protect")),
        backup_retention_days=int(v.get("backup_retention_days", 7)), ami_id=v.get("ami_id") or None,
        dms_source_replica=v.get("dms_source_replica") or None,
        replication_password=replication_password, tags=dict(v.get("tags") or {}),
        pooler=_bool(v.get("pooler", True)), pgbouncer_version=str(v.get("pgbouncer_version") or PGBOUNCER_VERSION),
        pooler_instance_type=v.get("pooler_instance_type") or "c6i.large",
        admin_cidrs=list(_list(v.get("admin_cidrs"))), pooler_admin_password=pooler_admin_password,
        walg_sha256=str(v["walg_sha256"]).strip().lower() if v.get("walg_sha256") else None,
        walg_version=str(v.get("walg_version") or binaries.WALG_VERSION), walg_url=v.get("walg_url") or None,
    )
    binaries.check_walg(cfg.walg_version, cfg.walg_sha256, cfg.walg_url)
    if len(cfg.private_subnets) < 2:
        raise ValueError(f"{NAMESPACE}:private_subnets needs subnets in at least two availability zones")
    if cfg.replica_count < 2:
        raise ValueError(f"{NAMESPACE}:replica_count must be at least 2 (one crash must not stop the migration)")
    if cfg.aurora_instance_count < 2:
        raise ValueError(f"{NAMESPACE}:aurora_instance_count must be at least 2 (writer and a reader in another zone)")
    for cidr in cfg.app_source_cidrs:
        if cidr.endswith("/0"):
            raise ValueError(f"{NAMESPACE}:app_source_cidrs must not open the databases to the world ({cidr})")
    _check_admin_cidrs(cfg)
    if cfg.pooler:
        _check_pooler(cfg)
    return cfg


def _check_admin_cidrs(cfg: StackConfig) -> None:
    """Where tern runs: the only sources of the poolers' admin console and of the replicas' hba line for
    tern's client certificate (exported as the outputs' ``admin_cidrs``): network addresses, never the world."""
    for cidr in cfg.admin_cidrs:
        try:
            network = ipaddress.ip_network(cidr)
        except ValueError:
            raise ValueError(f"{NAMESPACE}:admin_cidrs: {cidr!r} is not a network address "
                             "(such as 10.0.4.0/24)") from None
        if network.prefixlen == 0:
            raise ValueError(f"{NAMESPACE}:admin_cidrs must not open the admin console to the world ({cidr}), "
                             "nor the replicas to tern's certificate")


def _check_pooler(cfg: StackConfig) -> None:
    """The pooler's keys, checked only when ``tern:pooler`` is on (they end up in a shell script and an HBA file)."""
    if not _DEBIAN_VERSION.match(cfg.pgbouncer_version):
        raise ValueError(f"{NAMESPACE}:pgbouncer_version must name one exact Debian package version "
                         f"(such as {PGBOUNCER_VERSION}), not {cfg.pgbouncer_version!r}")
    if not cfg.admin_cidrs:
        raise ValueError(f"{NAMESPACE}:admin_cidrs is required when {NAMESPACE}:pooler is on: the addresses tern runs "
                         "from, the only ones PgBouncer's admin console accepts")
    if cfg.pooler_admin_password is None:
        raise ValueError(f"stack config is missing {NAMESPACE}:pooler_admin_password (a secret: pulumi config set "
                         f"--secret {NAMESPACE}:pooler_admin_password ...), or set {NAMESPACE}:pooler false")


def _list(v: Any) -> list[str]:
    if v is None or v == "":
        return []
    if isinstance(v, str):
        return json.loads(v) if v.startswith("[") else [x.strip() for x in v.split(",") if x.strip()]
    return list(v)


# How each key is stored by the Pulumi CLI, which hands the program every value as text
# (``PULUMI_CONFIG``): strings as they are, numbers and booleans as their text, and only
# objects and lists as JSON. Each key is read with the accessor its type needs.
KEY_TYPES: dict[str, str] = {
    "region": "str", "vpc_id": "str", "private_subnets": "object", "app_source_security_groups": "list",
    "app_source_cidrs": "list", "replica_count": "int", "instance_type": "str", "ebs_size_gb": "int",
    "ebs_iops": "int", "pg_major": "int", "wal_archive_bucket": "str", "wal_archive_prefix": "str",
    "aurora_engine_version": "str", "aurora_instance_class": "str", "aurora_instance_count": "int",
    "dms_instance_class": "str", "dms_ca_certificate_arn": "str", "dms_source_replica": "str",
    "heroku_app": "str", "database": "str", "rehearsal": "bool", "protect": "bool",
    "backup_retention_days": "int", "ami_id": "str", "tags": "object",
    "pooler": "bool", "pgbouncer_version": "str", "pooler_instance_type": "str", "admin_cidrs": "list",
    "walg_sha256": "str", "walg_version": "str", "walg_url": "str",
}
OPTIONAL_KEYS = ("ami_id", "tags", "dms_source_replica", "backup_retention_days", "pooler", "pgbouncer_version",
                 "pooler_instance_type", "walg_version", "walg_url")
# required by `pulumi up` but not in the committed stack files: each operator sets it (README, "Real AWS, step by step")
OPERATOR_KEYS = ("walg_sha256",)


def _read(c: Any, key: str, kind: str) -> Any:
    if kind == "int":
        return c.get_int(key)
    if kind == "bool":
        return c.get_bool(key)
    if kind == "object":
        return c.get_object(key)
    if kind == "list":
        # JSON (what the CLI passes for a YAML list) or a comma-separated string
        # (``pulumi config set tern:app_source_cidrs 10.0.0.0/16``): from_mapping takes both
        raw = c.get(key)
        return None if raw is None else (json.loads(raw) if raw.lstrip().startswith("[") else raw)
    return c.get(key)


def load() -> StackConfig:
    """Read the running stack's configuration (the only call to ``pulumi.Config``)."""
    import pulumi

    c = pulumi.Config(NAMESPACE)
    values: dict[str, Any] = {}
    for key, kind in KEY_TYPES.items():
        value = _read(c, key, kind)
        if value is not None:
            values[key] = value
    # the pooler's admin password is needed only when tern:pooler is on; from_mapping says so when it is missing
    return from_mapping(values, replication_password=c.require_secret("replication_password"),
                        pooler_admin_password=c.get_secret("pooler_admin_password"))
