"""The Heroku side: the app, looked up (read only) through the Heroku provider.

``pulumi up`` never writes to the running app: on Heroku every config-var change (and every
formation change) restarts all dynos, so the stack declares no ConfigVar/ConfigAssociation/
Formation resource for it. Where the new databases are is in the stack outputs (for the
operator); what the app needs at the switch (``DATABASE_URL``) is written by the runbook's
Heroku adapter, at the failover, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumiverse_heroku as heroku


@dataclass
class HerokuArgs:
    app_name: str


class HerokuApp(pulumi.ComponentResource):
    """A read-only lookup: ``pulumi up`` fails early if the app does not exist, and changes nothing on it."""

    def __init__(self, name: str, args: HerokuArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tern:infra:HerokuApp", name, None, opts)
        self.app = heroku.app.get_app_output(name=args.app_name, opts=pulumi.InvokeOptions(parent=self))
        self.register_outputs({"app_id": self.app.uuid})
