"""The outputs contract: everything the runbook needs to know about an environment.

This schema is the *only* interface between ``infra/`` (which exports it as Pulumi
stack outputs) and ``runbook/`` (which reads it). The sandbox writes the same
document. It holds no secret: credentials appear as references
(``env:NAME``, ``file:/path#key``, ``aws-secretsmanager:ARN[#key]``), resolved at
the moment of use by :mod:`runbook.secrets`.

Loaders:

* ``local`` (default): the sandbox's ``outputs.json`` under the sandbox directory;
* a path to a JSON file;
* any other name: ``pulumi stack output --json --show-secrets -s NAME``.

A missing or malformed field raises :class:`ContractError` naming the field.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ContractError

SCHEMA_VERSION = 1
REF_SCHEMES = ("env", "file", "aws-secretsmanager", "ssm-parameter")


def _check_ref(value: str) -> str:
    scheme, _, rest = value.partition(":")
    if scheme not in REF_SCHEMES or not rest:
        # Never echo the value: it may be a plaintext secret put here by mistake.
        raise ValueError(
            "must be a credential reference (" + ", ".join(f"{s}:..." for s in REF_SCHEMES) + "), not a value"
        )
    return value


def _check_cidr(value: str) -> str:
    from .client_tls import check_cidrs

    return check_cidrs([value])[0]


CredentialRef = Annotated[str, AfterValidator(_check_ref)]
Name = Annotated[str, Field(min_length=1, pattern=r"^[a-z][a-z0-9-]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CommandChannel(_Model):
    """How commands reach a database host: a local subprocess or SSM Run Command."""

    kind: Literal["local", "ssm"]
    os_user: str = "postgres"
    instance_id: str | None = None
    region: str | None = None
    # ssm: the S3 bucket SSM writes each command's full output to (it returns only the first 24,000
    # characters inline); without it a longer output is refused. The instance role may write there.
    output_bucket: str | None = None
    output_prefix: str = "tern/ssm"

    @model_validator(mode="after")
    def _ssm_needs_instance(self) -> "CommandChannel":
        if self.kind == "ssm" and not self.instance_id:
            raise ValueError("instance_id is required when kind is ssm")
        return self


class Archive(_Model):
    """Where the source's base backups and WAL segments are (Heroku's S3 bucket, WAL-G layout).

    ``env_dir`` (s3): the directory ``envdir`` reads WAL-G's settings from on every replica (one file a
    variable: ``WALG_S3_PREFIX``, ``AWS_REGION``, ...), which the instances' user data writes."""

    kind: Literal["directory", "s3"]
    location: str = Field(min_length=1)
    base_backup: str = "LATEST"
    env_dir: str = Field(default="/etc/wal-g.env", min_length=1)


class Source(_Model):
    """The Heroku database. tern reaches it only as the app's own role, through the app's config var."""

    heroku_app: str = Field(min_length=1)
    database_url_var: str = "DATABASE_URL"
    archive: Archive
    pg_major: int = Field(ge=13)


class App(_Model):
    """The application whose DATABASE_URL moves: the sandbox's local app, or a Heroku app."""

    kind: Literal["local", "heroku"]
    name: str = Field(min_length=1)
    state_dir: str | None = None      # local: the app's state; heroku: only a rehearsal's stand-in (its ledger)
    api_key: CredentialRef | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> "App":
        if self.kind == "local" and not self.state_dir:
            raise ValueError("state_dir is required when kind is local")
        if self.kind == "heroku" and not self.api_key:
            raise ValueError("api_key is required when kind is heroku")
        return self


class Replica(_Model):
    """One EC2 PostgreSQL host that follows the source, then leads."""

    name: Name
    availability_zone: str = Field(min_length=1)
    host: str = Field(min_length=1)
    port: Port = 5432
    database: str = Field(min_length=1)
    data_dir: str = Field(min_length=1)
    bin_dir: str = Field(min_length=1)
    socket_dir: str = Field(min_length=1)
    commands: CommandChannel
    # the certificate, key and pg_hba.conf: None = where they are by default (ssm: the instance's user data
    # puts them in /etc/tern/postgresql; local: <data_dir>.tls); a rehearsal's SSM stand-in names its own
    tls_dir: str | None = None


class AuroraLocalApi(_Model):
    """The sandbox's stand-in for the RDS API: the Aurora node's own superuser over its unix socket.

    Only :mod:`runbook.adapters.aurora` uses it, for what on AWS only the RDS API (parameter
    groups, reboots, snapshots) or Aurora's ``rds_superuser`` (subscriptions) can do; the master
    role itself is no superuser, as on Aurora.
    """

    kind: Literal["local"]
    bin_dir: str = Field(min_length=1)
    data_dir: str = Field(min_length=1)
    socket_dir: str = Field(min_length=1)
    port: Port
    os_user: str = "postgres"
    superuser: str = Field(default="postgres", min_length=1)
    log_file: str | None = None


class AuroraRdsApi(_Model):
    """The real cluster's control plane: the RDS API in ``region``."""

    kind: Literal["rds"]
    cluster_identifier: str = Field(min_length=1)
    parameter_group: str = Field(min_length=1)
    region: str = Field(min_length=1)


AuroraApiChannel = Annotated[AuroraLocalApi | AuroraRdsApi, Field(discriminator="kind")]


class Aurora(_Model):
    """The hop-2 target. Its master user is a member of ``rds_superuser``, never a superuser.

    ``api`` says how to reach what only the RDS API can do (see :mod:`runbook.adapters.aurora`);
    it is optional so that outputs written before it existed still parse, and the adapter
    refuses to work without it.
    """

    writer_endpoint: str = Field(min_length=1)
    reader_endpoint: str = Field(min_length=1)
    port: Port = 5432
    database: str = Field(min_length=1)
    master_user: str = Field(min_length=1)
    master_password: CredentialRef
    api: AuroraApiChannel | None = None


class Dms(_Model):
    region: str
    replication_task_arn: str
    replication_instance_arn: str
    source_endpoint_arn: str
    target_endpoint_arn: str


class Credentials(_Model):
    """References to the credentials the runbook creates or uses on the targets."""

    replication_password: CredentialRef


class PoolerNode(_Model):
    """One PgBouncer process: where tern reaches its admin console, and how it rewrites the file that
    names the database behind it (``databases_file``, ``%include``d by pgbouncer.ini, then ``RELOAD``).

    ``auth_file``: PgBouncer's auth_file, where tern adds the app role's SCRAM verifier (read on a restored
    replica) before the app moves onto the pooler; None: tern does not write it, it must already admit the
    app's role."""

    name: Name
    availability_zone: str | None = None
    admin_host: str = Field(min_length=1)     # the admin console (the virtual database ``pgbouncer``): tern only
    admin_port: Port = 6432
    commands: CommandChannel
    databases_file: str = Field(min_length=1)
    auth_file: str | None = Field(default=None, min_length=1)


class Pooler(_Model):
    """PgBouncer in front of the leader (transaction pooling), the app's one endpoint: a switch behind it
    is PAUSE, repoint, RESUME - no config-var change, no dyno restart (issue #12).

    ``host``/``port``: what the app's ``DATABASE_URL`` names (the network load balancer on AWS, over
    TLS); ``database``: the database name clients use; ``admin_user``/``admin_password``: PgBouncer's
    admin console (``admin_users``), which only tern may reach."""

    kind: Literal["pgbouncer"]
    host: str = Field(min_length=1)
    port: Port = 6432
    database: str = Field(min_length=1)
    tls: bool = True
    admin_user: str = Field(min_length=1)
    admin_password: CredentialRef
    nodes: list[PoolerNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_nodes(self) -> "Pooler":
        names = [n.name for n in self.nodes]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pooler node names must be unique, repeated: {', '.join(dup)}")
        return self


class Outputs(_Model):
    schema_version: Literal[1]
    stack: str = Field(min_length=1)
    rehearsal: bool
    region: str | None = None
    source: Source
    app: App
    replicas: list[Replica] = Field(min_length=1)
    aurora: Aurora
    dms: Dms | None = None
    pooler: Pooler | None = None
    credentials: Credentials
    # where tern runs (``tern:admin_cidrs``; loopback in the sandbox): the only networks a replica admits
    # tern's client certificate from (runbook/client_tls.py). Empty: no replica trusts it (SQL goes through
    # the hosts' commands)
    admin_cidrs: list[Annotated[str, AfterValidator(_check_cidr)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_replicas(self) -> "Outputs":
        names = [r.name for r in self.replicas]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"replica names must be unique, repeated: {', '.join(dup)}")
        return self

    def replica(self, name: str) -> Replica:
        for r in self.replicas:
            if r.name == name:
                return r
        raise ContractError(f"unknown replica {name!r}; known: {', '.join(r.name for r in self.replicas)}")

    def public_dict(self) -> dict[str, Any]:
        """The document as JSON-able data (it holds references only, never secrets)."""
        return self.model_dump(mode="json")


def parse(data: Any, origin: str = "outputs") -> Outputs:
    """Validate a decoded outputs document; errors name every bad field."""
    if not isinstance(data, dict):
        raise ContractError(f"{origin}: expected a JSON object at the top level")
    try:
        return Outputs.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ContractError(f"{origin}: invalid outputs contract:\n" + "\n".join(lines)) from None


def load_file(path: Path) -> Outputs:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ContractError(f"outputs file {path} does not exist") from None
    except OSError as exc:
        raise ContractError(f"outputs file {path} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(f"outputs file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    return parse(data, origin=str(path))


def load_pulumi(stack: str, cwd: Path | None = None, timeout: float = 120.0) -> Outputs:
    """Read a real stack's outputs through the Pulumi CLI."""
    exe = shutil.which("pulumi")
    if exe is None:
        raise ContractError(f"stack {stack!r}: the pulumi CLI is not on PATH (needed to read a real stack's outputs)")
    try:
        proc = subprocess.run(
            [exe, "stack", "output", "--json", "--show-secrets", "-s", stack],
            cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise ContractError(f"stack {stack!r}: pulumi stack output timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        from .redact import redact

        raise ContractError(f"stack {stack!r}: pulumi stack output failed: {redact(proc.stderr.strip())[:500]}")
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ContractError(f"stack {stack!r}: pulumi printed something that is not JSON") from None
    return parse(data, origin=f"stack {stack}")


def load(stack: str, sandbox_dir: Path) -> Outputs:
    """Load the outputs for ``stack``: ``local`` (the sandbox), a ``.json`` path, or a Pulumi stack."""
    if stack == "local":
        path = Path(sandbox_dir) / "outputs.json"
        if not path.exists():
            raise ContractError(f"the sandbox is not up ({path} is missing): run `invoke sandbox.up` first")
        return load_file(path)
    if stack.endswith(".json") or "/" in stack:
        return load_file(Path(stack))
    return load_pulumi(stack)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the contract, for documentation and for other programs."""
    return Outputs.model_json_schema()
