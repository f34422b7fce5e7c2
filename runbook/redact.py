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


def redact_data(value: object) -> object:
    """``value`` (JSON-like data) with every string redacted, keys included: redact *before* encoding,
    since an encoder escapes ``"`` and ``\\`` and a known secret would no longer match.

    >>> register_secret('pa"ss\\word')
    >>> redact_data({"dsn": 'x pa"ss\\word y', "n": [1, 'pa"ss\\word']})
    {'dsn': 'x *** y', 'n': [1, '***']}
    """
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(str(k)): redact_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(value)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = redact(message)
        record.args = None
        return True
