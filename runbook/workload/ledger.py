"""The acknowledged-write ledger: the app's own, client-side record of what it saw committed.

Each write transaction appends an ``intent`` line just before COMMIT and an ``ack``
line once COMMIT returned. ``ack`` lines are the promise made to customers; an
``intent`` without ``ack`` is a write whose outcome the app never learned (in doubt).
Lines are written with ``os.write`` on an O_APPEND descriptor (a process crash
loses nothing written) and ``fdatasync``-ed after each ack (a machine crash neither).

Line format (JSON)::

    {"ev": "ack", "ts": 1732540000.123456, "dyno": "web.1", "table": "orders",
     "key": "<uuid>", "endpoint": "127.0.0.1:54321"}
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import psycopg

LEDGER_DIR = "ledger"

# table -> column holding the ledger key, and the predicate selecting app-written rows
KEYED_TABLES = {
    "orders": ("order_ref", "channel = 'web'"),
    "stock_movements": ("movement_ref", "reason = 'restock'"),
}


class LedgerWriter:
    def __init__(self, state_dir: Path, dyno: str, fsync: bool = True) -> None:
        directory = Path(state_dir) / LEDGER_DIR
        directory.mkdir(parents=True, exist_ok=True)
        self.dyno = dyno
        self.fsync = fsync
        self.fd = os.open(directory / f"{dyno}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _write(self, ev: str, ts: float, table: str, key: str, endpoint: str, sync: bool) -> None:
        line = json.dumps({"ev": ev, "ts": ts, "dyno": self.dyno, "table": table, "key": key,
                           "endpoint": endpoint}, separators=(",", ":")) + "\n"
        os.write(self.fd, line.encode())
        if sync and self.fsync:
            os.fdatasync(self.fd)

    def intent(self, ts: float, table: str, key: str, endpoint: str) -> None:
        self._write("intent", ts, table, key, endpoint, sync=False)

    def ack(self, ts: float, table: str, key: str, endpoint: str) -> None:
        self._write("ack", ts, table, key, endpoint, sync=True)

    def close(self) -> None:
        os.close(self.fd)


@dataclass(frozen=True)
class Entry:
    ev: str
    ts: float
    dyno: str
    table: str
    key: str
    endpoint: str


def read(state_dir: Path) -> list[Entry]:
    """Every complete line of every process's ledger, in time order (a torn last line is skipped)."""
    entries: list[Entry] = []
    directory = Path(state_dir) / LEDGER_DIR
    if not directory.exists():
        return entries
    for path in sorted(directory.glob("*.jsonl")):
        for raw in path.read_bytes().split(b"\n"):
            if not raw:
                continue
            try:
                d = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write: it was never acknowledged
            entries.append(Entry(d["ev"], d["ts"], d["dyno"], d["table"], d["key"], d["endpoint"]))
    entries.sort(key=lambda e: e.ts)
    return entries


@dataclass
class LedgerCheck:
    """What the ledger says against what a database holds."""

    acknowledged: int = 0
    in_doubt: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)      # acked, not in the database
    unexplained: dict[str, list[str]] = field(default_factory=dict)  # app rows the ledger never mentions

    @property
    def lost(self) -> int:
        return sum(len(v) for v in self.missing.values())

    @property
    def ok(self) -> bool:
        return self.lost == 0 and not any(self.unexplained.values())


def acked_and_doubt(entries: Iterable[Entry]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    acked: dict[str, set[str]] = defaultdict(set)
    intents: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        (acked if e.ev == "ack" else intents)[e.table].add(e.key)
    doubt = {t: keys - acked.get(t, set()) for t, keys in intents.items()}
    return acked, doubt


def check(entries: list[Entry], conn: psycopg.Connection, *, exact: bool = True) -> LedgerCheck:
    """Compare the ledger with a database.

    Every acknowledged key must be present. With ``exact``, every app-written row in
    the database must also be in the ledger (acked or in doubt): nothing appears that
    the app did not write (use it once the app is stopped).
    """
    from psycopg import sql

    acked, doubt = acked_and_doubt(entries)
    result = LedgerCheck(acknowledged=sum(len(v) for v in acked.values()),
                         in_doubt=sum(len(v) for v in doubt.values()))
    for table, (column, app_rows) in KEYED_TABLES.items():
        keys = sorted(acked.get(table, set()))
        present: set[str] = set()
        with conn.cursor() as cur:
            if keys:
                cur.execute(sql.SQL("SELECT {c}::text FROM {t} WHERE {c} = ANY(%s::uuid[])").format(
                    c=sql.Identifier(column), t=sql.Identifier(table)), (keys,))
                present = {r[0] for r in cur.fetchall()}
            missing = [k for k in keys if k not in present]
            if missing:
                result.missing[table] = missing
            if exact:
                cur.execute(sql.SQL("SELECT {c}::text FROM {t} WHERE " + app_rows).format(
                    c=sql.Identifier(column), t=sql.Identifier(table)))
                known = acked.get(table, set()) | doubt.get(table, set())
                extra = [r[0] for r in cur.fetchall() if r[0] not in known]
                if extra:
                    result.unexplained[table] = extra
    return result
