"""Holding a standby at an LSN: replay up to it, stay there (paused) while it is read, then let it go on.

Both full verifications use it: hop 1's witness (a replica replaying the archive, held at the final LSN)
and hop 2's (an EC2 standby of the leader, held where Aurora's apply stopped: :mod:`.consistent_point`).

How: ``recovery_target_lsn`` = the LSN, ``recovery_target_inclusive = off`` (replay stops before the first
record at or after it: everything that ended before it is applied) and ``recovery_target_action = pause``
(a hot standby stays open for reading). Recovery targets are read at start only, so the standby restarts.
It must not have replayed past the target already: its data pages may hold changes up to its replay
position (its minimum recovery point) and PostgreSQL refuses to start with a target before that
("requested recovery stop point is before consistent recovery point"). A caller whose standby streams
ahead pauses its replay first (:func:`pause`), at a position it knows is before the target.

Releasing resets the targets and restarts; replay goes on from where it stopped, on the same timeline.
Never ``pg_wal_replay_resume()`` a standby paused *at a target*: that ends recovery (it would promote).
"""

from __future__ import annotations

from ..pg import lsn_to_int, replay_target
from ..polling import wait_until
from ..postgres import PgHost, literal
from .context import Context

TARGETS = ("recovery_target_lsn", "recovery_target_inclusive", "recovery_target_action")


def pause(pg: PgHost) -> str:
    """Pause replay now (the standby keeps receiving WAL); returns its replay LSN. Any record it reads
    from now on waits: replay stops at the record it is applying, if any."""
    pg.psql("SELECT pg_wal_replay_pause();")
    return pg.query_one("SELECT pg_last_wal_replay_lsn()::text AS lsn")["lsn"]


def hold(pg: PgHost, lsn: str, *, stop_timeout: float, start_timeout: float, reach_timeout: float,
         interval: float, what: str, restore_command: str | None = None) -> str:
    """Replay up to ``lsn`` (exclusive) on ``pg`` and stay there; returns its replay LSN once it is there.

    ``restore_command``: set it too (hop 1's witness replays the archive); None leaves it as it is."""
    statements = (f"ALTER SYSTEM SET recovery_target_lsn = {literal(lsn)};\n"
                  "ALTER SYSTEM SET recovery_target_inclusive = off;\n"
                  "ALTER SYSTEM SET recovery_target_action = 'pause';\n")
    if restore_command is not None:
        statements = f"ALTER SYSTEM SET restore_command = {literal(restore_command)};\n" + statements
    pg.psql(statements)
    pg.stop(mode="fast", timeout=stop_timeout)   # recovery targets need a restart
    pg.start(timeout=start_timeout)
    # everything before the target replayed (a target just past a page header: the boundary, replay_target);
    # the records at or after it are never replayed while the target is in force
    want = replay_target(lsn_to_int(lsn))

    def there():
        row = pg.query_one("SELECT pg_last_wal_replay_lsn()::text AS lsn, pg_is_wal_replay_paused() AS paused")
        # paused after a restart = the target reached (nothing else pauses it): the record at or after
        # the target came in; without it (its segment not archived yet) the replay position tells
        return row["lsn"] if (lsn_to_int(row["lsn"]) or 0) >= want or row["paused"] else None

    return wait_until(there, timeout=reach_timeout, interval=max(interval, 0.2),
                      what=f"{what} to replay up to {lsn}")


def held(pg: PgHost) -> bool:
    """A recovery target is in force on ``pg`` (any kind: resuming replay there would end recovery), or
    tern's waits in its configuration for the next start."""
    return bool(pg.query("SELECT 1 FROM pg_settings WHERE name IN ('recovery_target', 'recovery_target_lsn', "
                         "'recovery_target_name', 'recovery_target_time', 'recovery_target_xid') AND setting <> '' "
                         "UNION ALL SELECT 1 FROM pg_file_settings WHERE name = 'recovery_target_lsn' "
                         "AND setting <> ''"))


def release(pg: PgHost, *, stop_timeout: float, start_timeout: float, restore_command: str | None = None) -> None:
    """No recovery target any more (and ``restore_command``, when given); restarted, so that replay goes on.
    A standby only paused by :func:`pause` (no target) is resumed instead, without a restart."""
    if not pg.is_running():
        pg.start(timeout=start_timeout)
    if restore_command is None and not held(pg):
        pg.psql("SELECT pg_wal_replay_resume() WHERE pg_is_in_recovery() AND pg_is_wal_replay_paused();")
        return
    statements = "".join(f"ALTER SYSTEM RESET {name};\n" for name in TARGETS)
    if restore_command is not None:
        statements += f"ALTER SYSTEM SET restore_command = {literal(restore_command)};\n"
    pg.psql(statements)
    pg.stop(mode="fast", timeout=stop_timeout)
    pg.start(timeout=start_timeout)


def read_url(ctx: Context, name: str) -> str:
    """How to read a held standby: as its superuser - a standby carries its primary's fence (a connection
    limit of tern's own sessions there) and hop 1's seal (none at all), which bind every other role - over
    the local socket where tern can, else over TLS with tern's client certificate
    (:mod:`runbook.client_tls`). Neither: the app's role over TLS, which the fence may refuse; the replica's
    certificate verified either way."""
    pg = ctx.pg(name)
    if pg.host.local_socket:
        return f"postgresql://{pg._user()}@/{ctx.replica(name).database}?host={pg.socket_dir}&port={pg.port}"
    return pg.sql_url(ctx.replica(name).database) or ctx.tern_replica_url(name)
