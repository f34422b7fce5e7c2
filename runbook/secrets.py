"""Resolve credential references at the moment of use, and register the values for redaction.

References (never values) travel in the outputs contract:

* ``env:NAME`` - an environment variable;
* ``file:/path#key`` - a key of a JSON object in a file (the sandbox's ``secrets.json``, mode 0600);
* ``aws-secretsmanager:ARN[#key]`` - AWS Secrets Manager (a JSON key, or the whole string);
* ``ssm-parameter:NAME`` - an SSM SecureString parameter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConfigError
from .redact import register_secret


SCHEMES = ("env", "file", "aws-secretsmanager", "ssm-parameter")


def is_reference(value: str) -> bool:
    """Whether ``value`` has the shape of a credential reference (not a value)."""
    scheme, sep, rest = str(value).partition(":")
    return bool(sep) and scheme in SCHEMES and bool(rest)


def resolve(ref: str) -> str:
    scheme, _, rest = ref.partition(":")
    if scheme == "env":
        value = os.environ.get(rest)
        if value is None:
            raise ConfigError(f"credential {ref}: environment variable {rest} is not set")
    elif scheme == "file":
        path, _, key = rest.partition("#")
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"credential {ref}: file {path} does not exist") from None
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"credential {ref}: file {path} is not a readable JSON object") from None
        if key not in data:
            raise ConfigError(f"credential {ref}: key {key!r} not in {path}")
        value = str(data[key])
    elif scheme == "aws-secretsmanager":
        arn, _, key = rest.partition("#")
        import boto3

        secret = boto3.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"]
        value = str(json.loads(secret)[key]) if key else secret
    elif scheme == "ssm-parameter":
        import boto3

        value = boto3.client("ssm").get_parameter(Name=rest, WithDecryption=True)["Parameter"]["Value"]
    else:
        raise ConfigError(f"credential reference with unknown scheme {scheme!r}")
    register_secret(value)
    return value


def write_secret_file(path: Path, values: dict[str, str]) -> None:
    """Write (or merge into) a 0600 JSON secrets file."""
    path = Path(path)
    current: dict[str, str] = {}
    if path.exists():
        current = json.loads(path.read_text())
    current.update(values)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(current, fh)
    os.replace(tmp, path)
    for v in values.values():
        register_secret(v)
