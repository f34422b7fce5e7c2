"""The full verification, outside the window: the frozen source against a witness at the final LSN.

Inside the window a failover checks only what costs O(catalog + sample). Every row is compared
after the app is back, against a state equal to the promoted one: another replica (the *witness*)
replays the archive up to the final LSN and stops there (``recovery_target_lsn``, paused), and
the source - sealed, read through tern's own sessions - is compared with it in full. Then the
witness is released (targets reset, detached from the archive again) at the final LSN, which
is at or before the new leader's fork point, so it can follow the new timeline.

A difference does not undo the switch (past the point of no return); it stops the run and names
the rows, with the snapshot to go back to.
"""

from __future__ import annotations

import time
from typing import Any

from ..archive import restore_command
from ..errors import RunbookError, VerificationError
from ..verify import verify as run_verify
from . import hold
from .context import Context


def pick(ctx: Context) -> str | None:
    """The first other replica that is a running standby with data."""
    for name in ctx.data.others or []:
        pg = ctx.pg(name)
        try:
            if pg.has_data() and pg.is_running() and pg.query_one("SELECT pg_is_in_recovery() AS r")["r"]:
                return name
        except RunbookError:
            continue
    return None


def hold_at_final(ctx: Context, name: str) -> str:
    """Replay the archive up to the final LSN on ``name`` and stop there; returns its replay LSN."""
    return hold.hold(ctx.pg(name), ctx.data["final_lsn"], restore_command=restore_command(ctx.outputs.source.archive),
                     stop_timeout=ctx.settings.promote_timeout, start_timeout=ctx.settings.restore_timeout,
                     reach_timeout=ctx.settings.catchup_timeout, interval=ctx.settings.poll_interval,
                     what=f"{name} (the final LSN)")


def release(ctx: Context, name: str) -> None:
    """No recovery target, no archive: the witness waits at the final LSN for the repoint.

    Known limit: segments restored while it was held stay in its pg_wal (a standby keeps what it
    restores), and the final LSN's segment runs on into the fill record the new leader never
    replayed; the witness then asks the new leader for WAL past the fork point and repoint rebuilds
    it (provably cannot follow). Removing that segment is not enough: the witness must reach its
    minimum recovery point before it accepts a session, and only the new leader can give it back."""
    hold.release(ctx.pg(name), stop_timeout=ctx.settings.promote_timeout,
                 start_timeout=ctx.settings.restore_timeout, restore_command="")


def segment_name(timeline: int, lsn: int, segment_size: int) -> str:
    """The WAL file holding ``lsn`` on ``timeline`` (what pg_walfile_name returns on a primary).

    >>> segment_name(1, 0x42A0788, 16 * 1024 * 1024)
    '000000010000000000000004'
    """
    per = 0x100000000 // segment_size
    seg = lsn // segment_size
    return f"{timeline:08X}{seg // per:08X}{seg % per:08X}"


def verify_full(ctx: Context) -> dict[str, Any]:
    if ctx.settings.full_verification == "skip":
        note = "skipped (tern.full_verification = skip): run `invoke verify --mode full` against the frozen source"
        return {"verification_full": {"ok": None, "note": note}, "detail": note}
    name = pick(ctx)
    if name is None:
        note = ("not run: no other replica to hold at the final LSN; compare the frozen source with a copy of "
                "the snapshot by `invoke verify --mode full`")
        return {"verification_full": {"ok": None, "note": note}, "detail": note}
    try:
        sessions = ctx.held().verification()
    except RunbookError as exc:
        note = (f"not run: tern's sessions on the sealed source are gone ({exc}); the source admits no new "
                "session - compare it by hand with a superuser")
        return {"verification_full": {"ok": None, "note": note}, "detail": note}
    t0 = time.monotonic()
    lsn = hold_at_final(ctx, name)
    try:
        result = run_verify(ctx.source_url(), hold.read_url(ctx, name), mode="full", sequences="at_least",
                            timeout=ctx.settings.connect_timeout, jobs=max(1, len(sessions) - 1),
                            source_connections=sessions, skip_unlogged=True)
    finally:
        release(ctx, name)
    summary = result.summary()
    summary.update(witness=name, witness_lsn=lsn, seconds=round(time.monotonic() - t0, 3))
    if not result.ok:
        ctx.checkpoint(verification_full=summary)
        raise VerificationError(
            f"the frozen source and {name} (held at the final LSN {ctx.data['final_lsn']}) differ: "
            + "; ".join(result.differences()[:10])
            + f". The app runs on {ctx.data['candidate']}; its pre-migration snapshot is "
              f"{ctx.data.snapshot}: decide whether to repair the rows or roll back")
    return {"verification_full": summary,
            "detail": f"every row of {summary['tables']} tables equal between the frozen source and {name} at "
                      f"{lsn} ({summary['seconds']:.1f}s)"}
