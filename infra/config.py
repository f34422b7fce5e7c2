"""The stack's configuration: the one place ``pulumi.Config`` is read.

Components take the plain :class:`StackConfig` values, never the config object, so they
are testable with any configuration (the tests load ``Pulumi.dev.yaml`` and
``Pulumi.prod.yaml`` through :func:`from_mapping`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

NAMESPACE = "tern"


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

    @property
    def zones(self) -> list[str]:
        return sorted(self.private_subnets)


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


def from_mapping(values: Mapping[str, Any], *, replication_password: Any = None) -> StackConfig:
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
    )
    if len(cfg.private_subnets) < 2:
        raise ValueError(f"{NAMESPACE}:private_subnets needs subnets in at least two availability zones")
    if cfg.replica_count < 2:
        raise ValueError(f"{NAMESPACE}:replica_count must be at least 2 (one crash must not stop the migration)")
    if cfg.aurora_instance_count < 2:
        raise ValueError(f"{NAMESPACE}:aurora_instance_count must be at least 2 (writer and a reader in another zone)")
    for cidr in cfg.app_source_cidrs:
        if cidr.endswith("/0"):
            raise ValueError(f"{NAMESPACE}:app_source_cidrs must not open the databases to the world ({cidr})")
    return cfg


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
}
OPTIONAL_KEYS = ("ami_id", "tags", "dms_source_replica", "backup_retention_days")


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
    return from_mapping(values, replication_password=c.require_secret("replication_password"))
