"""Which EC2 node leads, and the URLs hop 2 uses (the app's role on each side, Aurora's master)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ..adapters import AppControl
from ..contract import Outputs, Replica
from ..errors import ConfigError
from ..pg import make_url, url_endpoint, with_endpoint
from ..secrets import resolve

EC2_URL_VAR = "TERN_EC2_DATABASE_URL"   # the EC2 leader's URL, kept once the app moved to Aurora (rollback)


def leader_url(app: AppControl, outputs: Outputs) -> str:
    """The app's URL at the EC2 leader: kept by hop 2's url switch, else the app's own - or, when that names
    the pooler, the database the pooler names (with the app's credentials; TLS to a replica)."""
    url = app.config_var(EC2_URL_VAR) or app.config_var(outputs.source.database_url_var) or ""
    if url and outputs.pooler is not None:
        from ..pooler import current_target, points_at_pooler, url_behind

        if points_at_pooler(outputs.pooler, url):
            target = current_target(outputs.pooler)
            if target is not None:
                replica = any((r.host, r.port) == (target.host, target.port) for r in outputs.replicas)
                url = url_behind(url, target, tls=replica)
    return url


def leader(app: AppControl, outputs: Outputs) -> Replica:
    """The EC2 replica the app's database URL points at (the one failover-ec2 promoted)."""
    url = leader_url(app, outputs)
    if not url:
        raise ConfigError("the app has no database URL: nothing to replicate from")
    host, port, _ = url_endpoint(url)
    for r in outputs.replicas:
        if (r.host, r.port) == (host, port):
            return r
    raise ConfigError(f"the app's database ({host}:{port}) is not one of the EC2 replicas: run failover-ec2 first")


def aurora_master_url(outputs: Outputs) -> str:
    a = outputs.aurora
    return make_url(a.writer_endpoint, a.port, a.master_user, resolve(a.master_password), a.database)


def aurora_app_url(app: AppControl, outputs: Outputs) -> str:
    """The app's own role and password, at Aurora (tern creates the role there with the same verifier)."""
    a = outputs.aurora
    url = with_endpoint(leader_url(app, outputs), a.writer_endpoint, a.port)
    parts = urlsplit(url)
    query = "&".join(q for q in parts.query.split("&") if q and not q.startswith(("sslmode=", "sslrootcert=")))
    return urlunsplit((parts.scheme, parts.netloc, "/" + a.database, query, parts.fragment))
