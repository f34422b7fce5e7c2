"""The acknowledged-write ledger: the app's own, client-side record of what it saw committed.

Each write transaction appends an ``intent`` line just before COMMIT and an ``ack``
line once COMMIT returned. ``ack`` lines are the promise made to customers; an
``intent`` without ``ack`` is a write whose outcome the app never learned (in doubt).
Lines are written with ``os.write`` on an O_APPEND descriptor (a process crash
loses nothing written) and ``fdatasync``-ed after each ack (a machine crash neither).

Line format (JSON)::

    {"ev": "intent", "ts": 1732540000.101, "dyno": "web.1", "table": "orders",
     "key": "<uuid>", "endpoint": "127.0.0.1:54321", "began": 1732540000.095}
    {"ev": "ack", "ts": 1732540000.123456, "dyno": "web.1", "table": "orders",
     "key": "<uuid>", "endpoint": "127.0.0.1:54321"}
    {"ev": "error", "ts": 1732540001.2, "dyno": "web.1", "table": "orders", "key": "",
     "endpoint": "127.0.0.1:54321", "message": "terminating connection due to administrator command"}

``began`` (wall clock, taken before the transaction's first statement) is absent from records
written before it existed: readers treat it as unknown. An ``error`` line is a write that failed
as its client saw it (its transaction raised, or the connection it needed could not be made): the
first line of the message, redacted, and an empty ``key``. The checks ignore it: a write whose
COMMIT raised is already in doubt through its ``intent``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import psycopg

from ..redact import redact

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

    def _write(self, ev: str, ts: float, table: str, key: str, endpoint: str, sync: bool, **extra) -> None:
        record = {"ev": ev, "ts": ts, "dyno": self.dyno, "table": table, "key": key, "endpoint": endpoint}
        record.update({k: v for k, v in extra.items() if v is not None})
        line = json.dumps(record, separators=(",", ":")) + "\n"
        os.write(self.fd, line.encode())
        if sync and self.fsync:
            os.fdatasync(self.fd)

    def intent(self, ts: float, table: str, key: str, endpoint: str, began: float | None = None) -> None:
        self._write("intent", ts, table, key, endpoint, sync=False, began=began)

    def ack(self, ts: float, table: str, key: str, endpoint: str) -> None:
        self._write("ack", ts, table, key, endpoint, sync=True)

    def error(self, ts: float, table: str, endpoint: str, message: object) -> None:
        """A write that failed, as its client saw it: the message's first line, never a password."""
        self._write("error", ts, table, "", endpoint, sync=False, message=error_message(message))

    def close(self) -> None:
        os.close(self.fd)


def error_message(message: object, limit: int = 300) -> str:
    """The first non-empty line of ``message``, redacted, at most ``limit`` characters."""
    text = message if isinstance(message, str) else (str(message) or type(message).__name__)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = redact(lines[0]) if lines else ""
    return first[:limit]


@dataclass(frozen=True)
class Entry:
    ev: str                      # "intent", "ack" or "error"
    ts: float
    dyno: str
    table: str
    key: str
    endpoint: str
    began: float | None = None   # intent: when the transaction began (None: not recorded)
    message: str | None = None   # error: the first line of the message, redacted


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
            try:
                entries.append(Entry(d["ev"], d["ts"], d["dyno"], d.get("table", ""), d.get("key", ""),
                                     d.get("endpoint", ""), d.get("began"), d.get("message")))
            except (KeyError, TypeError):
                continue  # not a ledger record
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
    """Keys acknowledged, and keys with an ``intent`` but no ``ack`` (in doubt), per table.
    Other records (``error``) are neither."""
    acked: dict[str, set[str]] = defaultdict(set)
    intents: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        if e.ev == "ack":
            acked[e.table].add(e.key)
        elif e.ev == "intent":
            intents[e.table].add(e.key)
    doubt = {t: keys - acked.get(t, set()) for t, keys in intents.items()}
    return acked, doubt


def _within(ts: float, since: float | None, until: float | None) -> bool:
    return (since is None or ts >= since) and (until is None or ts <= until)


def held_seconds(entries: Iterable[Entry], since: float | None = None,
                 until: float | None = None) -> float | None:
    """The longest time a client waited for a write: from its transaction's ``began`` to its ``ack``,
    over writes acknowledged in [``since``, ``until``] (by ack time). None when no such write has
    a known ``began`` (records written before ``began`` existed have none)."""
    entries = list(entries)
    began: dict[tuple[str, str], float] = {}
    for e in entries:
        if e.ev == "intent" and e.began is not None:
            began[(e.table, e.key)] = e.began
    longest: float | None = None
    for e in entries:
        if e.ev != "ack" or not _within(e.ts, since, until):
            continue
        b = began.get((e.table, e.key))
        if b is None:
            continue
        held = e.ts - b
        if longest is None or held > longest:
            longest = held
    return longest


def errors(entries: Iterable[Entry], since: float | None = None, until: float | None = None) -> int:
    """How many writes failed as their clients saw it (``error`` records) in [``since``, ``until``]."""
    return sum(1 for e in entries if e.ev == "error" and _within(e.ts, since, until))


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
