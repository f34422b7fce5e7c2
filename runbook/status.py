"""What every node is doing now: the data behind ``invoke status``.

JSON keys (stable):

``nodes[]``: ``name``, ``kind`` (source|ec2|aurora), ``role`` (primary|standby|stopped|empty|unreachable),
``timeline``, ``lsn`` (current LSN of a primary, replayed LSN of a standby), ``receive_lsn``,
``lag_bytes`` and ``lag_seconds`` (behind the source's *current* LSN while the source leads; for
Aurora, the logical lag behind the EC2 leader's current LSN, as in ``replication``),
``upstream`` (``archive``, ``host:port`` or null; Aurora: the leader it subscribes to), ``last_segment`` (last WAL segment replayed),
``availability_zone``, ``error``; the source also has ``fenced`` (its database admits no new session
of the app's role, or they are read-only) and ``current_app_target`` (the app's DATABASE_URL points at it).
``app``: ``maintenance``, ``formation``, ``running``, ``database_endpoint``.
``ledger``: ``acknowledged``, ``in_doubt`` (sandbox only; null elsewhere).
``replication`` (hop 2, EC2 leader -> Aurora, through the engine replicate-aurora recorded;
:func:`runbook.replication.setup.replication_status`):
``state`` (``not set up`` | ``initial copy`` | ``streaming`` | ``not streaming`` | ``disabled`` | ``slot missing`` |
``slot lost`` | ``failed`` (DMS: the task failed) | ``unreachable``), ``engine`` (``native`` | ``dms``), ``leader``,
``subscription``, ``enabled``, ``tables`` (table -> native: ``pg_subscription_rel.srsubstate``: ``i`` initialize,
``d`` copying, ``f``/``s`` finishing, ``r`` ready; DMS: its ``TableState``, ``Table completed`` when loaded),
``tables_ready``, ``tables_total``, ``leader_lsn`` (the leader's ``pg_current_wal_lsn()``), ``confirmed_lsn``
(the slot's ``confirmed_flush_lsn``: applied and flushed on Aurora), ``applied_lsn`` (what Aurora's apply
worker reported applied), ``lag_bytes`` (``leader_lsn - confirmed_lsn``), ``lag_seconds`` (how long ago the
leader was at ``confirmed_lsn``: interpolated over the sample on the leader's clock, else PostgreSQL's
``replay_lag``), ``slot_active``, ``wal_status``, ``safe_wal_size``; over a sample of ``sample_seconds``
(taken while the subscription is enabled): ``write_bytes_per_second`` (leader WAL),
``apply_bytes_per_second`` (confirmed), ``headroom`` (their ratio; null when nothing was written),
``caught_up`` (at both ends of the sample); ``slot`` (the leader's slot replication uses: ``tern_aurora``, or
DMS's own); DMS only (else null): ``task`` (``status``, ``stop_reason``, ``full_load_percent``, ``tables_loaded``,
``tables_loading``, ``tables_queued``, ``tables_errored``, ``failure``), ``validation`` (``summary``: tables
``validated``, ``failed_records``, ``suspended_records``, ``pending_records``; ``tables``: per table ``state``,
``failed``, ``suspended``, ``pending``), ``cdc_latency`` (CloudWatch ``CDCLatencySource`` / ``CDCLatencyTarget``,
seconds; ``lag_seconds`` is the target's); ``note`` (why not streaming), ``error``. Null what is unknown.
"""

from __future__ import annotations

import time
from typing import Any

from .adapters import AppControl, app_for, host_for
from .contract import Outputs, Replica
from .errors import RunbookError
from .pg import connect, lsn_to_int, url_endpoint
from .postgres import PgHost
from .redact import redact
from .secrets import resolve

WAL_SEGMENT_SIZE = 16 * 1024 * 1024


def wal_file_name(timeline: int, lsn: int, segment_size: int = WAL_SEGMENT_SIZE) -> str:
    segno = lsn // segment_size
    per_xlogid = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def replica_host(replica: Replica) -> PgHost:
    return PgHost(host_for(replica), bin_dir=replica.bin_dir, data_dir=replica.data_dir,
                  socket_dir=replica.socket_dir, port=replica.port, database=replica.database)


# a primary's timeline, readable by an ordinary role (pg_control_checkpoint() is not, on Heroku)
TIMELINE_SQL = "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"

SOURCE_SQL = ("SELECT pg_is_in_recovery() AS in_recovery, pg_current_wal_lsn()::text AS lsn, "
              "pg_current_wal_insert_lsn()::text AS insert_lsn, "
              f"{TIMELINE_SQL} AS timeline, "
              "current_setting('default_transaction_read_only') = 'on' AS fenced")

REPLICA_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text AS lsn,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age,
       (SELECT timeline_id FROM pg_control_checkpoint()) AS checkpoint_timeline,
       (SELECT received_tli FROM pg_stat_wal_receiver) AS received_tli,
       (SELECT sender_host || ':' || sender_port FROM pg_stat_wal_receiver WHERE status = 'streaming') AS streaming_from,
       current_setting('restore_command') AS restore_command,
       current_setting('primary_conninfo') <> '' AS has_primary_conninfo
"""


def source_status(app: AppControl, outputs: Outputs, timeout: float) -> dict[str, Any]:
    url = app.config_var(outputs.source.database_url_var)
    entry: dict[str, Any] = {"name": "source", "kind": "source", "availability_zone": None, "upstream": None,
                             "receive_lsn": None, "lag_bytes": 0, "lag_seconds": 0.0, "last_segment": None,
                             "error": None}
    try:
        with connect(source_url(app, outputs), purpose="status", timeout=timeout) as conn:
            row = conn.execute(SOURCE_SQL).fetchone()
        entry.update(role="standby" if row[0] else "primary", lsn=row[1], timeline=row[3], fenced=row[4])
    except RunbookError as exc:
        entry.update(role="unreachable", lsn=None, timeline=None, fenced=None, error=str(exc))
        if "too many connections" in str(exc):
            # fenced by tern (its database admits no new session): look from another database
            from .failover.fence import maintenance_connection

            try:
                with maintenance_connection(source_url(app, outputs), timeout=timeout, purpose="status") as conn:
                    row = conn.execute(SOURCE_SQL).fetchone()
                entry.update(role="standby" if row[0] else "primary", lsn=row[1], timeline=row[3], fenced=True,
                             error=None)
            except RunbookError:
                entry["fenced"] = True
    entry["current_app_target"] = bool(url) and url_endpoint(url)[:2] == url_endpoint(source_url(app, outputs))[:2]
    return entry


def source_url(app: AppControl, outputs: Outputs) -> str:
    """The source's URL: kept by tern once the app is switched away, else the app's config var."""
    saved = app.config_var("TERN_SOURCE_DATABASE_URL")
    return saved or app.config_var(outputs.source.database_url_var) or ""


def replica_status(replica: Replica, source_lsn: int | None) -> dict[str, Any]:
    pg = replica_host(replica)
    entry: dict[str, Any] = {"name": replica.name, "kind": "ec2", "availability_zone": replica.availability_zone,
                             "role": None, "timeline": None, "lsn": None, "receive_lsn": None, "lag_bytes": None,
                             "lag_seconds": None, "upstream": None, "last_segment": None, "error": None}
    try:
        if not pg.has_data():
            entry["role"] = "empty"
            return entry
        if not pg.is_running():
            entry["role"] = "stopped"
            return entry
        row = pg.query_one(REPLICA_SQL)
    except RunbookError as exc:
        entry.update(role="unreachable", error=redact(exc))
        return entry
    timeline = row["received_tli"] or row["checkpoint_timeline"]
    lsn = lsn_to_int(row["lsn"])
    entry.update(role="standby" if row["in_recovery"] else "primary", timeline=timeline, lsn=row["lsn"],
                 receive_lsn=row["receive_lsn"])
    if row["in_recovery"]:
        entry["upstream"] = row["streaming_from"] or ("archive" if row["restore_command"] else None)
        if lsn is not None:
            entry["last_segment"] = wal_file_name(timeline or 1, max(lsn - 1, 0))
        if source_lsn is not None and lsn is not None and entry["upstream"] == "archive":
            lag = max(0, source_lsn - lsn)
            entry["lag_bytes"] = lag
            entry["lag_seconds"] = 0.0 if lag == 0 else round(row["replay_age"] or 0.0, 3)
    return entry


def aurora_status(outputs: Outputs, timeout: float) -> dict[str, Any]:
    a = outputs.aurora
    entry: dict[str, Any] = {"name": "aurora", "kind": "aurora", "availability_zone": None, "timeline": None,
                             "receive_lsn": None, "lag_bytes": None, "lag_seconds": None, "upstream": None,
                             "last_segment": None, "error": None}
    from .pg import make_url

    try:
        url = make_url(a.writer_endpoint, a.port, a.master_user, resolve(a.master_password), a.database)
        with connect(url, purpose="status", timeout=timeout) as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), pg_current_wal_lsn()::text").fetchone()
            subs = conn.execute("SELECT count(*) FROM pg_stat_subscription").fetchone()[0]
        entry.update(role="standby" if row[0] else "primary", lsn=row[1], subscriptions=subs)
    except RunbookError as exc:
        entry.update(role="unreachable", lsn=None, error=str(exc))
    return entry


def gather(outputs: Outputs, *, timeout: float = 5.0, sample_seconds: float = 2.0, state_dir=None) -> dict[str, Any]:
    """``state_dir``: the stack's runs, where replicate-aurora recorded its engine (native when unknown)."""
    from .replication.setup import replication_status

    app = app_for(outputs.app)
    src = source_status(app, outputs, timeout)
    source_lsn = lsn_to_int(src.get("lsn"))
    nodes = [src] + [replica_status(r, source_lsn) for r in outputs.replicas]
    aurora = aurora_status(outputs, timeout)
    replication = replication_status(outputs, timeout=timeout, sample_seconds=sample_seconds, state_dir=state_dir)
    if replication["state"] not in ("not set up", "unreachable"):
        # Aurora's lag is the logical one, from the EC2 leader's current LSN
        leader = outputs.replica(replication["leader"])
        aurora.update(lag_bytes=replication["lag_bytes"], lag_seconds=replication["lag_seconds"],
                      upstream=f"{leader.host}:{leader.port}" if replication["enabled"] else None)
    nodes.append(aurora)
    url = app.config_var(outputs.source.database_url_var)
    app_info = {"name": outputs.app.name, "maintenance": app.maintenance(), "formation": app.formation(),
                "running": app.running(), "database_endpoint": "{}:{}".format(*url_endpoint(url)[:2]) if url else None}
    ledger_info = None
    if outputs.app.kind == "local":
        from .workload import ledger

        acked, doubt = ledger.acked_and_doubt(ledger.read(outputs.app.state_dir))
        ledger_info = {"acknowledged": sum(len(v) for v in acked.values()),
                       "in_doubt": sum(len(v) for v in doubt.values())}
    pooler = None
    if outputs.pooler is not None:
        from . import pooler as pooler_mod

        pooler = {"endpoint": f"{outputs.pooler.host}:{outputs.pooler.port}",
                  "app_uses_it": pooler_mod.points_at_pooler(outputs.pooler, url),
                  "nodes": pooler_mod.status(outputs.pooler, timeout)}
    return {"stack": outputs.stack, "taken_at": time.time(), "nodes": nodes, "app": app_info, "ledger": ledger_info,
            "replication": replication, "pooler": pooler}
