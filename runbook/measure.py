"""Cheap records a run leaves beside its journal, for the after-action review and ``invoke estimate``.

Nothing here may fail a step: a record that cannot be written (a disk full, a host that went away) is
skipped with a debug log line. Nothing here holds a secret: byte counts, seconds, node names, LSNs.

* ``<run_dir>/lag.jsonl``: how far a node is behind, sampled where a run already polls (hop 1's catch-up
  of the candidate to the final LSN, hop 2's wait for Aurora to confirm it): ``{"ts", "node", "lag_bytes"}``,
  at most one line per node every :data:`LAG_EVERY` seconds (and each return to zero).
* ``<run_dir>/writes.json``: the app's acknowledged writes per time bin, from the sandbox app's ledger, saved
  when a failover run ends (the ledger goes with the sandbox; the review draws the write rate from this).
* ``<stack state_dir>/throughput.jsonl``: what a restore measured, one line per replica restored
  (base backup bytes and seconds to fetch it; WAL bytes replayed from the backup's start and seconds from
  the fetch's end to the standby taking connections; the database's size and rows), for ``invoke estimate``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

LAG_FILE = "lag.jsonl"
WRITES_FILE = "writes.json"
THROUGHPUT_FILE = "throughput.jsonl"
LAG_EVERY = 0.5            # seconds between two lag samples of one node
MAX_BINS = 4000            # the write-rate series of a long run is binned wider, never longer than this

_last_lag: dict[tuple[str, str], tuple[float, int]] = {}


# -- replication lag ------------------------------------------------------------------------------------
def record_lag(journal: Any, node: str, lag_bytes: int | None, *, every: float = LAG_EVERY) -> None:
    """Append one sample of ``node``'s lag to the run's ``lag.jsonl`` (throttled; never raises)."""
    if lag_bytes is None or journal is None or Path(journal.path).name != "journal.jsonl":
        return    # a dry run's journal is /dev/null: nothing beside it
    lag = max(0, int(lag_bytes))
    now = time.time()
    key = (str(journal.path), node)
    last = _last_lag.get(key)
    if last is not None and now - last[0] < every and not (lag == 0 and last[1] != 0):
        return
    _last_lag[key] = (now, lag)
    try:
        with open(Path(journal.path).parent / LAG_FILE, "a") as f:
            f.write(json.dumps({"ts": round(now, 3), "node": node, "lag_bytes": lag}) + "\n")
    except OSError as exc:
        log.debug("lag sample not recorded: %s", exc)


def read_lag(run_dir: Path) -> dict[str, list[tuple[float, int]]]:
    """node -> [(ts, lag bytes)], in time order; torn or foreign lines skipped."""
    series: dict[str, list[tuple[float, int]]] = {}
    try:
        raw = (Path(run_dir) / LAG_FILE).read_text()
    except OSError:
        return series
    for line in raw.splitlines():
        try:
            d = json.loads(line)
            series.setdefault(str(d["node"]), []).append((float(d["ts"]), int(d["lag_bytes"])))
        except (ValueError, KeyError, TypeError):
            continue
    for points in series.values():
        points.sort(key=lambda p: p[0])   # stable: samples of one millisecond keep their order
    return series


# -- the app's write rate -----------------------------------------------------------------------------------
def bin_seconds_for(span: float) -> float:
    """A bin width that shows a one-second window (0.5 s) yet keeps a long run under MAX_BINS bins."""
    return max(0.5, span / MAX_BINS)


def binned(times: list[float], start: float, end: float, width: float) -> list[int]:
    """How many of ``times`` fall in each ``width``-second bin of [start, end) (a partial last bin is dropped)."""
    n = int((end - start) // width) if end > start else 0
    counts = [0] * n
    for t in times:
        i = int((t - start) // width)
        if 0 <= i < n:
            counts[i] += 1
    return counts


def write_series(entries: list[Any], start: float, end: float, width: float | None = None) -> dict[str, Any]:
    """The ledger's ``ack`` and ``error`` records in [start, end) as per-bin counts."""
    width = width or bin_seconds_for(end - start)
    return {"start": start, "bin_seconds": width,
            "acks": binned([e.ts for e in entries if e.ev == "ack"], start, end, width),
            "errors": binned([e.ts for e in entries if e.ev == "error"], start, end, width)}


def save_write_rate(journal: Any, outputs: Any, *, before: float = 5.0) -> Path | None:
    """Save the app's writes from ``before`` seconds ahead of the run to now in the run's ``writes.json``:
    the sandbox app's ledger, when there is one (a real app keeps none). Never raises."""
    state_dir = getattr(getattr(outputs, "app", None), "state_dir", None)
    if not state_dir or not journal.events:
        return None
    try:
        from .workload import ledger

        entries = ledger.read(Path(state_dir))
        if not entries:
            return None
        start = float(journal.events[0]["ts"]) - before
        end = max(float(journal.events[-1]["ts"]), entries[-1].ts)
        series = write_series([e for e in entries if e.ts >= start], start, end)
        path = journal.run_dir / WRITES_FILE
        path.write_text(json.dumps(series, separators=(",", ":")))
        return path
    except Exception as exc:  # noqa: BLE001 - a picture is worth less than the run that draws it
        log.debug("write rate not saved: %s", exc)
        return None


def read_writes(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(run_dir) / WRITES_FILE).read_text())
        return data if isinstance(data, dict) and "acks" in data else None
    except (OSError, ValueError):
        return None


# -- throughputs: what a restore measured ----------------------------------------------------------------
def volume_sql() -> str:
    """The database's size (pg_database_size: tables, indexes, TOAST - what Heroku reports as its size)
    and rows (the planner's estimates, so it costs no scan)."""
    return ("SELECT pg_database_size(current_database()) AS bytes, "
            "(SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_class c "
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p', 'm') "
            " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast') AS rows")


def volume(pg: Any, database: str, *, prefix: str = "") -> dict[str, int]:
    """``{prefix}bytes`` and ``{prefix}rows`` of ``database`` on ``pg`` (a PgHost); {} when it cannot say."""
    try:
        row = pg.query_one(volume_sql(), database=database, timeout=30)
        return {f"{prefix}bytes": int(row["bytes"]), f"{prefix}rows": int(row["rows"])}
    except Exception as exc:  # noqa: BLE001 - a figure for the estimate, never a reason to fail a step
        log.debug("database volume not measured: %s", exc)
        return {}


START_WAL = re.compile(r"^START WAL LOCATION: ([0-9A-Fa-f]+/[0-9A-Fa-f]+)", re.M)


class RestoreMeter:
    """Times each replica's restore through the progress calls :func:`runbook.restore.restore_all` already
    makes, and appends what it measured to ``<state_dir>/throughput.jsonl``.

    ``start(replica)`` is called as each replica's restore begins (it returns the progress callback to
    pass on); the fetch ends with the last progress call (done == total); the replica's restore ends when
    the next one starts or at ``finish``. Without a state directory it measures nothing."""

    def __init__(self, state_dir: Path | None, progress: Callable[[str, int, int], None] | None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.progress = progress
        self.current: dict[str, Any] | None = None
        self.measured: list[dict[str, Any]] = []

    def start(self, replica: Any) -> Callable[[str, int, int], None] | None:
        if self.state_dir is None:
            return self.progress
        self._close()
        self.current = {"replica": replica, "started": time.time(), "fetched": None, "bytes": 0}
        return self._progress

    def _progress(self, name: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(name, done, total)
        cur = self.current
        if cur is not None:
            cur["bytes"] = total
            if total and done >= total and cur["fetched"] is None:
                cur["fetched"] = time.time()

    def _close(self) -> None:
        cur, self.current = self.current, None
        if cur is None or cur["fetched"] is None:
            return    # already restored: nothing was fetched, nothing measured
        ended = time.time()
        record: dict[str, Any] = {"ts": round(ended, 3), "what": "restore", "replica": cur["replica"].name,
                                  "fetch_bytes": cur["bytes"],
                                  "fetch_seconds": round(cur["fetched"] - cur["started"], 3),
                                  "replay_seconds": round(ended - cur["fetched"], 3)}
        try:
            from .pg import lsn_to_int
            from .status import replica_host

            r = cur["replica"]
            pg = replica_host(r)
            # the backup's start: PostgreSQL renames backup_label once recovery has read it
            label = (pg.host.read_file(f"{r.data_dir}/backup_label.old")
                     or pg.host.read_file(f"{r.data_dir}/backup_label"))
            m = START_WAL.search(label or "")
            row = pg.query_one("SELECT pg_last_wal_replay_lsn()::text AS lsn", timeout=30)
            if m and row.get("lsn"):
                record["replay_bytes"] = max(0, lsn_to_int(row["lsn"]) - lsn_to_int(m.group(1)))
            record.update(volume(pg, r.database, prefix="database_"))
        except Exception as exc:  # noqa: BLE001 - the restore succeeded; only a figure is missing
            log.debug("restore figures incomplete: %s", exc)
        self.measured.append(record)

    def finish(self, results: dict[str, str]) -> dict[str, str]:
        """Close the last replica's measure and append every record; returns ``results`` unchanged."""
        if self.state_dir is None:
            return results
        self._close()
        for record in self.measured:
            append_throughput(self.state_dir, record)
        return results


def append_throughput(state_dir: Path, record: dict[str, Any]) -> None:
    try:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(state_dir) / THROUGHPUT_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        log.debug("throughput not recorded: %s", exc)


def read_throughput(state_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``<state_dir>/throughput.jsonl``, oldest first."""
    try:
        raw = (Path(state_dir) / THROUGHPUT_FILE).read_text()
    except OSError:
        return []
    out = []
    for line in raw.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and "ts" in d:
            out.append(d)
    return sorted(out, key=lambda d: d["ts"])
