"""The Heroku side: the app looked up through the Heroku provider, and the staged config vars.

Staged vars are plain (no credential): where the new databases are, for the operator and
the app's own health checks. The runbook swaps DATABASE_URL itself, at the failover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumiverse_heroku as heroku


@dataclass
class HerokuArgs:
    app_name: str
    staged_vars: dict[str, pulumi.Input[str]] = field(default_factory=dict)


class HerokuApp(pulumi.ComponentResource):
    def __init__(self, name: str, args: HerokuArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("tern:infra:HerokuApp", name, None, opts)
        self.app = heroku.app.get_app_output(name=args.app_name)
        self.staged = heroku.app.ConfigAssociation(f"{name}-staged", app_id=self.app.uuid, vars=args.staged_vars,
                                                   opts=pulumi.ResourceOptions(parent=self))
        self.register_outputs({"app_id": self.app.uuid})
