"""Keep secrets out of every line tern prints, logs or journals.

>>> redact("postgresql://app:s3cret@127.0.0.1:5432/app")
'postgresql://app:***@127.0.0.1:5432/app'
>>> redact("host=db password=s3cret user=app")
'host=db password=*** user=app'
>>> redact("postgres://127.0.0.1/app")
'postgres://127.0.0.1/app'
>>> redact("PGPASSWORD=abc psql")
'PGPASSWORD=*** psql'
"""

from __future__ import annotations

import logging
import re

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@", re.I)
_KV_PASSWORD = re.compile(r"(?P<key>\b(?:password|passwd|pgpassword|secret|api_key|token)\s*[=:]\s*)(?P<val>'[^']*'|\"[^\"]*\"|\S+)", re.I)

_known_secrets: set[str] = set()


def register_secret(value: str | None) -> None:
    """Remember a secret value so that :func:`redact` masks it wherever it appears."""
    if value and len(value) >= 4:
        _known_secrets.add(value)


def redact(text: object) -> str:
    """Return ``text`` as a string with every password-looking part masked."""
    s = str(text)
    s = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", s)
    s = _KV_PASSWORD.sub(lambda m: f"{m['key']}***", s)
    for secret in sorted(_known_secrets, key=len, reverse=True):
        s = s.replace(secret, "***")
    return s


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        return True
