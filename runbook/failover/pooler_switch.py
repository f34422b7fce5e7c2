"""The switch through the pooler, shared by both failovers (``--switch pooler``, :mod:`runbook.pooler`).

Which mode a run uses is decided when it is created and journaled (``switch_mode``): ``pooler`` when
asked, or by default when the outputs declare a pooler; ``url`` otherwise. A resumed run keeps its mode.

In pooler mode the plans replace three steps, and hop 1 adds one:

* ``pooler_auth`` (hop 1, before the window): every node serves the source and admits the app's role -
  its SCRAM verifier, read in a restored replica's ``pg_authid``, written into each node's auth_file that
  refuses the role, then ``RELOAD`` (:func:`runbook.pooler.ensure_app_auth`); reverted on a fallback.
* ``pooler_in`` (hop 1, before the window): the pooler points at the source, then the app's
  ``DATABASE_URL`` names the pooler - the one config-var change of the migration, one dyno restart,
  at a time the operator chooses (nothing is frozen yet). Already there: nothing to do.
* ``pause`` instead of ``maintenance_on``: ``PAUSE`` on every node, bounded by ``pause_timeout``; a
  transaction still running then is named, the pause undone, and the failover falls back. Clients
  are held, not refused: no error reaches them, only latency.
* ``switch``: every node's databases file names the new target, ``RELOAD``, ``RESUME``.

Whether a step is done is judged on every node, by what its running PgBouncer serves (never by its file,
never by the first node alone).

Everything between - the fence, catch-up, checks, promotion - is the same as in ``url`` mode, and the
fence still refuses a client that reaches the old database directly.
"""

from __future__ import annotations

import time
from typing import Any

from .. import pooler as pooler_mod
from ..errors import ConfigError, PreflightError, RunbookError
from ..pg import url_endpoint, url_user
from ..settings import Settings
from ..contract import Outputs
from .context import Context

SOURCE_URL_VAR = "TERN_SOURCE_DATABASE_URL"


def choose(settings: Settings, outputs: Outputs, app=None) -> str:
    """The mode a new run uses: ``pooler`` or ``url``. Asking for the pooler without one is bad input.

    ``app`` (hop 2): the pooler switches only an app that already writes through it (hop 1 moved it there);
    by default such an app keeps it, an app on the leader directly gets the url switch, and asking for the
    pooler for it is bad input (pausing a pooler the app does not use would hold nothing)."""
    mode = settings.switch_mode
    on_pooler = None
    if app is not None and outputs.pooler is not None:
        on_pooler = pooler_mod.points_at_pooler(outputs.pooler, app.config_var(outputs.source.database_url_var))
    if mode == "auto":
        return "pooler" if outputs.pooler is not None and on_pooler is not False else "url"
    if mode == "pooler" and outputs.pooler is None:
        raise ConfigError("--switch pooler: the outputs declare no pooler (set tern:pooler in the stack, or use "
                          "--switch url)")
    if mode == "pooler" and on_pooler is False:
        raise ConfigError("--switch pooler: the app does not write through the pooler (failover-ec2 ran with "
                          "--switch url): use --switch url")
    return mode


def mode(ctx: Context) -> str:
    return ctx.data.switch_mode or choose(ctx.settings, ctx.outputs)


def endpoint(ctx: Context) -> str:
    p = ctx.outputs.pooler
    return f"{p.host}:{p.port}"


def check(ctx: Context) -> str:
    """Preflight: every node's admin console answers with tern's password (a wrong one: refused, nothing
    changed); when the app already writes through the pooler, every node serves the same database (the
    load balancer sends the app to any of them: a node serving another one is refused, naming it)."""
    p = ctx.outputs.pooler
    try:
        for admin in pooler_mod.admins(p, ctx.settings.connect_timeout):
            admin.check()
        serves = pooler_mod.current_target(p, timeout=ctx.settings.connect_timeout) if app_on_pooler(ctx) else None
    except RunbookError as exc:
        raise PreflightError(f"the pooler cannot be driven: {exc}") from None
    return f"pooler: {len(p.nodes)} node(s) answer on their admin console" + (f", all serve {serves}" if serves else "")


# -- hop 1, before the window ---------------------------------------------------------------------
def app_on_pooler(ctx: Context) -> bool:
    """The app's URL names the pooler (what its nodes serve is :func:`pooler_in_done`'s concern)."""
    url = ctx.app.config_var(ctx.outputs.source.database_url_var)
    return pooler_mod.points_at_pooler(ctx.outputs.pooler, url)


def _source_for_pooler(ctx: Context) -> str:
    source = ctx.source_url()
    if pooler_mod.points_at_pooler(ctx.outputs.pooler, source):
        raise PreflightError(f"the app already writes through the pooler but tern does not know the source's own URL: "
                             f"set {SOURCE_URL_VAR} to it (tern's sessions must reach the source directly)")
    return source


def _point_at_source(ctx: Context, source: str) -> list[str]:
    """Every node serves the source. When the app already writes through the pooler, only a node that serves
    nothing yet (a new instance) is pointed; one serving another database is refused: the app's writes
    through it went there, and tern cannot tell what they were."""
    p = ctx.outputs.pooler
    target = pooler_mod.Target.of_url(source)
    if app_on_pooler(ctx):
        elsewhere = [f"{n.name} -> {t}" for n, t in pooler_mod.targets(p, ctx.settings.connect_timeout)
                     if t is not None and t != target]
        if elsewhere:
            raise PreflightError(f"the app writes through the pooler, but node(s) {'; '.join(elsewhere)} serve another "
                                 f"database than the source ({target}): the app's writes through them went there. "
                                 "Point them at the source (or take them out of the load balancer) and run again")
    # outside the window: each node's file checked too, so that a restart keeps serving the source
    return pooler_mod.point(p, target, timeout=ctx.settings.connect_timeout, check_files=True)


def _app_verifier(ctx: Context, role: str, database: str) -> str:
    """The app role's verifier from a restored replica (the candidate first): a physical copy of the source,
    so Heroku's own verifier, which PgBouncer's SCRAM pass-through needs."""
    names = [ctx.data["candidate"], *(ctx.data.others or [])]
    problems = []
    for name in names:
        try:
            return pooler_mod.read_verifier(ctx.pg(name), role, database=database,
                                            timeout=ctx.settings.connect_timeout * 6)
        except PreflightError:
            raise
        except RunbookError as exc:
            problems.append(f"{name}: {exc}")
    raise PreflightError("cannot read the app role's verifier on any replica: " + "; ".join(problems))


def auth_in(ctx: Context) -> dict[str, Any]:
    """``pooler_auth``: every node serves the source and lets the app's role in - its SCRAM verifier, read on
    a replica, written into each node's auth_file that refuses it, then RELOAD (:func:`pooler_mod.ensure_app_auth`).
    Which nodes tern may have changed is journaled before any file is, for the revert."""
    p = ctx.outputs.pooler
    source = _source_for_pooler(ctx)
    pointed = _point_at_source(ctx, source)
    role = url_user(source)

    def written(names: list[str]) -> None:
        ctx.checkpoint(pooler_auth_written=sorted(set(ctx.data.pooler_auth_written or []) | set(names)))

    done, names = pooler_mod.ensure_app_auth(p, pooler_mod.app_url(p, source),
                                             lambda: _app_verifier(ctx, role, url_endpoint(source)[2]),
                                             timeout=ctx.settings.connect_timeout, before_write=written)
    return {"detail": f"{'; '.join(pointed)}; " + "; ".join(done)}


def auth_done(ctx: Context) -> bool:
    """Every node serves the source and lets the app's role in (a login through each node alone)."""
    p = ctx.outputs.pooler
    try:
        source = _source_for_pooler(ctx)
        target = pooler_mod.Target.of_url(source)
        if any(t != target for _, t in pooler_mod.targets(p, ctx.settings.connect_timeout)):
            return False
        for node in p.nodes:
            pooler_mod.check_app_login(p, pooler_mod.app_url(p, source, node), timeout=ctx.settings.connect_timeout,
                                       node=node)
        return True
    except RunbookError:
        return False


def auth_out(ctx: Context) -> None:
    """Revert of ``pooler_auth``: the app role's line out of the auth_file of the nodes this run wrote - never
    while the app uses the pooler. Runs right after ``pooler_out`` changed the app's URL back, but the old
    processes go on through the pooler until they stop (Heroku's preboot keeps them serving meanwhile): the
    line goes only once the app is seen writing to the source directly (its smoke test there, after
    ``pooler_out``) and no client of the role is left on any node, within a bound. Not seen in time: the line
    stays - harmless, it is the role's own verifier - and the journal says so (``pooler_auth_kept``), rather
    than cutting the late processes off."""
    names = ctx.data.pooler_auth_written or []
    if not names:
        return
    role = url_user(ctx.source_url())
    if app_on_pooler(ctx):
        ctx.checkpoint(pooler_auth_kept=f"the app writes through the pooler: {role}'s line kept in the auth_file "
                                        f"of {', '.join(names)}")
        return
    why = _app_left_pooler(ctx, role)
    if why:
        ctx.checkpoint(pooler_auth_kept=f"{role}'s line kept in the auth_file of {', '.join(names)} (harmless: its "
                                        f"own verifier; remove it and RELOAD once nothing uses the pooler): {why}")
        ctx.say(f"pooler_auth: {role}'s verifier left in the pooler's auth_file: {why}")
        return
    pooler_mod.drop_app_auth(ctx.outputs.pooler, role, names, timeout=ctx.settings.connect_timeout)


def _app_left_pooler(ctx: Context, role: str) -> str | None:
    """None once the app writes to the source directly (its smoke test there since ``pooler_out`` changed its
    URL, when this run moved it) and no client of ``role`` is left on the pooler; else why not, after the
    bound (the smoke test's plus the processes' stop, as ``pooler_in`` waits)."""
    bound = ctx.settings.smoke_timeout + ctx.settings.stop_app_timeout
    deadline = time.monotonic() + bound
    if ctx.data.pooler_out_at:
        host, port = ctx.source_endpoint()
        try:
            ctx.app.smoke_test(host, port, since=ctx.data.pooler_out_at, timeout=bound)
        except RunbookError as exc:
            return f"the app was not seen writing to the source directly: {exc}"
    left: list[str] = []
    while True:
        try:
            left = pooler_mod.app_clients(ctx.outputs.pooler, role, timeout=ctx.settings.connect_timeout)
        except RunbookError as exc:
            left = [str(exc)]
        if not left:
            return None
        if time.monotonic() >= deadline:
            return f"still on the pooler after {bound:.0f}s: {'; '.join(left[:5])}"
        time.sleep(0.5)


def auth_step():
    """Hop 1's ``pooler_auth`` step (before ``pooler_in``, which relies on it)."""
    from ..steps import Step

    return Step("pooler_auth", "the pooler serves the source and admits the app's role (its SCRAM verifier, read on "
                               "a replica, in each node's auth_file)", auth_in, check=auth_done, revert=auth_out,
                revert_hint="the pooler nodes' auth_file still holds the app role's verifier: remove its line and "
                            "RELOAD, if the app is not to use the pooler")


def pooler_in_done(ctx: Context) -> bool:
    """The app's URL names the pooler and every node serves the source."""
    try:
        target = pooler_mod.Target.of_url(_source_for_pooler(ctx))
        return app_on_pooler(ctx) and all(
            t == target for _, t in pooler_mod.targets(ctx.outputs.pooler, ctx.settings.connect_timeout))
    except RunbookError:
        return False


def pooler_in(ctx: Context) -> dict[str, Any]:
    p = ctx.outputs.pooler
    var = ctx.outputs.source.database_url_var
    source = _source_for_pooler(ctx)
    done = _point_at_source(ctx, source)
    # before the app depends on it: the pooler admits the app's own role and reaches the source with it
    # (pooler_auth put it in every node's auth_file; a pooler that refuses it would take the whole app down)
    pooler_mod.check_app_login(p, pooler_mod.app_url(p, source), timeout=ctx.settings.connect_timeout)
    if app_on_pooler(ctx):
        return {"app_endpoint": endpoint(ctx),
                "detail": f"the app already writes through the pooler ({'; '.join(done)})"}
    since = time.time()
    # journaled before the change: a fallback moves the app back only if this run moved it
    ctx.checkpoint(pooler_in_at=since)
    ctx.app.set_config_vars({var: pooler_mod.app_url(p, source), SOURCE_URL_VAR: source})
    # Heroku restarts every dyno now: wait until the app writes again, through the pooler, before freezing
    seen = ctx.app.smoke_test(p.host, p.port, since=since, timeout=ctx.settings.smoke_timeout
                              + ctx.settings.stop_app_timeout)
    return {"pooler_in_at": since, "app_endpoint": endpoint(ctx),
            "detail": f"{var} -> the pooler {endpoint(ctx)} ({'; '.join(done)}); the app restarted once, outside "
                      f"the window, and writes through it: {seen}"}


# -- the window -----------------------------------------------------------------------------------
def pause(ctx: Context) -> dict[str, Any]:
    p = ctx.outputs.pooler
    t0 = time.time()
    took = pooler_mod.pause_all(p, timeout=ctx.settings.pause_timeout, connect_timeout=ctx.settings.connect_timeout)
    return {"maintenance_at": t0, "paused_seconds": round(took, 3), "app_endpoint": endpoint(ctx),
            "detail": f"PAUSE {p.database} on {len(p.nodes)} node(s): running transactions ended in {took:.2f}s; "
                      "new queries are held"}


def paused(ctx: Context) -> bool:
    p = ctx.outputs.pooler
    try:
        return all(a.paused(p.database) for a in pooler_mod.admins(p, ctx.settings.connect_timeout))
    except RunbookError:
        return False


def resume(ctx: Context) -> None:
    """Revert of ``pause``: the pooler still names the old database; its clients go on there. A node that
    does not answer is not paused (PgBouncer starts unpaused): the report's reason says it is down."""
    failed = pooler_mod.resume_all(ctx.outputs.pooler, connect_timeout=ctx.settings.connect_timeout)
    failed = [f for f in failed if "cannot reach its admin console" not in f]
    if failed:
        raise RunbookError("RESUME failed on the pooler (its clients stay held until query_wait_timeout): "
                           + "; ".join(failed))


def pooler_out(ctx: Context) -> None:
    """Revert of ``pooler_in``: the app's URL back to the source's (one more restart); nothing was frozen yet.
    Only when this run moved it there (``pooler_in_at``): an app that wrote through the pooler before the run
    stays on it. When the change was made is journaled first (``pooler_auth``'s revert waits for the app to
    write to the source directly after it)."""
    if not ctx.data.pooler_in_at or not app_on_pooler(ctx):
        return
    if not ctx.data.pooler_out_at:
        ctx.checkpoint(pooler_out_at=time.time())
    ctx.app.set_config_vars({ctx.outputs.source.database_url_var: ctx.source_url()})


def pause_step():
    """The step that replaces maintenance_on in pooler mode (every plan's)."""
    from ..steps import Step

    return Step("pause", "PAUSE the pooler (running transactions end, new queries are held)", pause,
                check=paused, revert=resume, revert_hint=RESUME_HINT)


def smoke_test(ctx: Context, names: str) -> dict[str, Any]:
    """The app's smoke test through the pooler (which names ``names`` now)."""
    p = ctx.outputs.pooler
    what = ctx.app.smoke_test(p.host, p.port, since=ctx.data.switched_at or 0.0, timeout=ctx.settings.smoke_timeout)
    return {"smoke_test": what, "detail": f"{what} (through the pooler, which names {names})"}


RESUME_HINT = ("the pooler may still be paused: RESUME <db> on each node's admin console (psql -h <node> -p 6432 "
               "-U tern_admin pgbouncer)")


def switch_to(ctx: Context, url: str) -> dict[str, Any]:
    """Every node names the database at ``url``, reloaded, resumed: the held queries run there."""
    p = ctx.outputs.pooler
    target = pooler_mod.Target.of_url(url)
    done = pooler_mod.point(p, target, timeout=ctx.settings.connect_timeout)
    failed = pooler_mod.resume_all(p, connect_timeout=ctx.settings.connect_timeout)
    # a node that is not running holds no client and starts unpaused, serving the file point() wrote; with
    # no node answering at all, nothing serves the app: an error (the run stops; started again, it resumes)
    down = [f for f in failed if "cannot reach its admin console" in f]
    if len(down) < len(p.nodes):
        failed = [f for f in failed if f not in down]
    if failed:
        raise RunbookError(f"the pooler names {target} but could not be resumed: " + "; ".join(failed)
                           + " - " + RESUME_HINT)
    return {"switched_at": time.time(), "app_endpoint": endpoint(ctx),
            "detail": f"pooler -> {target} ({'; '.join(done)}), resumed: no config-var change, no restart"}


def switched_to(ctx: Context, url: str) -> bool:
    """Every node serves the database at ``url`` and none is paused (as each running PgBouncer says)."""
    p = ctx.outputs.pooler
    try:
        want = pooler_mod.Target.of_url(url)
    except RunbookError:
        return False
    seen = pooler_mod.each(p, ctx.settings.connect_timeout, lambda a: a.serving(p.database))
    return all(not isinstance(s, BaseException) and s == (want, False) for s in seen)
