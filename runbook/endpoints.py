"""Connection URLs for the nodes an operator names: ``source``, a replica, ``aurora``, or a URL."""

from __future__ import annotations

from .adapters import AppControl
from .contract import Outputs
from .errors import ConfigError
from .pg import make_url
from .secrets import resolve
from .status import source_url


def node_url(outputs: Outputs, app: AppControl, name: str) -> str:
    if name.startswith(("postgres://", "postgresql://")):
        return name
    src = source_url(app, outputs)
    if name == "source":
        if not src:
            raise ConfigError("the source's URL is unknown: the app has no database URL config var")
        return src
    if name == "aurora":
        a = outputs.aurora
        return make_url(a.writer_endpoint, a.port, a.master_user, resolve(a.master_password), a.database)
    names = [r.name for r in outputs.replicas]
    if name in names:
        r = outputs.replica(name)
        from .restore import replica_url

        return replica_url(src, r)  # the app's own role (a physical copy has it), over TLS
    raise ConfigError(f"unknown node {name!r}; known: source, {', '.join(names)}, aurora (or a postgresql:// URL)")
