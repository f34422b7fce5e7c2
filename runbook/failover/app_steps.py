"""The app's side of a failover, the same for both hops: stop the workers, maintenance mode,
start again. The app adapter (local processes or the Heroku Platform API) does the work."""

from __future__ import annotations

import time
from typing import Any

from .context import Context


def background_types(ctx: Context) -> dict[str, int]:
    return {t: n for t, n in ctx.data["formation"].items() if t != "web"}


def stop_workers(ctx: Context) -> dict[str, Any]:
    ctx.app.scale({t: 0 for t in background_types(ctx)}, timeout=ctx.settings.stop_app_timeout)
    return {"detail": f"scaled {', '.join(background_types(ctx)) or 'nothing'} to 0"}


def workers_stopped(ctx: Context) -> bool:
    running = ctx.app.running()
    return all(running.get(t, 0) == 0 for t in background_types(ctx))


def restore_workers(ctx: Context) -> None:
    ctx.app.scale(background_types(ctx), timeout=ctx.settings.stop_app_timeout)


def maintenance_on(ctx: Context) -> dict[str, Any]:
    ctx.app.set_maintenance(True)
    return {"maintenance_at": time.time()}


def start_app(ctx: Context) -> dict[str, Any]:
    ctx.app.set_maintenance(False)
    ctx.app.scale(background_types(ctx), timeout=ctx.settings.stop_app_timeout)
    return {"started_at": time.time(), "detail": f"maintenance off; formation {ctx.data['formation']}"}


def app_started(ctx: Context) -> bool:
    running = ctx.app.running()
    return not ctx.app.maintenance() and all(running.get(t, 0) >= n for t, n in background_types(ctx).items())


def maintenance_step():
    """maintenance_on as a plan step (url mode, every plan's)."""
    from ..steps import Step

    return Step("maintenance_on", "maintenance mode on (web stops writing)", maintenance_on,
                check=lambda ctx: ctx.app.maintenance(), revert=lambda ctx: ctx.app.set_maintenance(False),
                revert_hint="the app is still in maintenance mode: turn it off")
