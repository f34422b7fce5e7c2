"""Ledger timing (issue #12): ``began`` on intents, ``error`` records, and the pure figures over them."""

from __future__ import annotations

import json

import pytest

from runbook.workload import ledger
from runbook.workload.ledger import Entry, LedgerWriter, acked_and_doubt, errors, held_seconds


def intent(ts, key, began=None, table="orders", dyno="web.1", endpoint="127.0.0.1:5432"):
    return Entry("intent", ts, dyno, table, key, endpoint, began)


def ack(ts, key, table="orders", dyno="web.1", endpoint="127.0.0.1:5432"):
    return Entry("ack", ts, dyno, table, key, endpoint)


def error(ts, message="boom", table="orders", dyno="web.1", endpoint="127.0.0.1:5432"):
    return Entry("error", ts, dyno, table, "", endpoint, message=message)


# -- the file format ------------------------------------------------------------------------------

def test_writer_records_began_and_errors_and_old_lines_still_read(tmp_path):
    w = LedgerWriter(tmp_path, "web.1", fsync=False)
    w.intent(100.2, "orders", "k1", "127.0.0.1:5432", began=100.0)
    w.ack(100.3, "orders", "k1", "127.0.0.1:5432")
    w.error(100.5, "orders", "127.0.0.1:5432", "terminating connection due to administrator command\nDETAIL: x")
    w.close()
    # a ledger written before ``began`` and ``error`` existed, and a torn last line
    old = tmp_path / ledger.LEDGER_DIR / "worker.1.jsonl"
    old.write_text(
        '{"ev":"intent","ts":99.0,"dyno":"worker.1","table":"stock_movements","key":"k0","endpoint":"e:1"}\n'
        '{"ev":"ack","ts":99.1,"dyno":"worker.1","table":"stock_movements","key":"k0","endpoint":"e:1"}\n'
        '{"ev":"ack","ts":99.2,"dyno":"wor')
    entries = ledger.read(tmp_path)
    assert [(e.ev, e.key) for e in entries] == [("intent", "k0"), ("ack", "k0"), ("intent", "k1"), ("ack", "k1"),
                                                 ("error", "")]
    assert entries[0].began is None and entries[0].message is None
    assert entries[2].began == 100.0
    assert entries[4].message == "terminating connection due to administrator command"
    assert entries[4].table == "orders" and entries[4].endpoint == "127.0.0.1:5432"
    # the intent line carries began; the ack and old-style lines do not gain fields they never had
    lines = [json.loads(x) for x in (tmp_path / ledger.LEDGER_DIR / "web.1.jsonl").read_text().splitlines()]
    assert lines[0]["began"] == 100.0 and "began" not in lines[1] and "message" not in lines[0]


def test_intent_without_began_writes_the_old_format(tmp_path):
    w = LedgerWriter(tmp_path, "web.1", fsync=False)
    w.intent(1.0, "orders", "k", "e:1")
    w.close()
    line = json.loads((tmp_path / ledger.LEDGER_DIR / "web.1.jsonl").read_text())
    assert set(line) == {"ev", "ts", "dyno", "table", "key", "endpoint"}


@pytest.mark.parametrize("message", [
    "connection to server at \"db\" failed: FATAL: password authentication failed for user \"app\"",
    "could not connect to postgresql://app:s3cr3t-Pw@db:5432/app\nsecond line",
])
def test_error_message_is_one_redacted_line(tmp_path, message):
    w = LedgerWriter(tmp_path, "web.1", fsync=False)
    w.error(1.0, "orders", "db:5432", message)
    w.close()
    text = (tmp_path / ledger.LEDGER_DIR / "web.1.jsonl").read_text()
    assert "s3cr3t-Pw" not in text and "second line" not in text
    (e,) = ledger.read(tmp_path)
    assert e.ev == "error" and e.message == ledger.error_message(message) and "\n" not in e.message


def test_error_message_of_an_exception_without_text():
    assert ledger.error_message(RuntimeError()) == "RuntimeError"
    assert ledger.error_message("  \n  first\nsecond") == "first"
    assert ledger.error_message("password=hunter22 rest") == "password=*** rest"
    assert len(ledger.error_message("x" * 1000)) == 300


# -- checks ignore error records ------------------------------------------------------------------

def test_acked_and_doubt_ignore_error_records():
    entries = [intent(1.0, "a", 0.9), ack(1.1, "a"), intent(2.0, "b", 1.9), error(2.1), error(2.2, table="")]
    acked, doubt = acked_and_doubt(entries)
    assert dict(acked) == {"orders": {"a"}}
    assert doubt == {"orders": {"b"}}   # no "" key in doubt, no "" table


class FakeCursor:
    """Answers :func:`ledger.check`'s two queries per keyed table from an in-memory table."""

    def __init__(self, rows):
        self.rows = rows
        self.result = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def execute(self, query, params=None):
        text = query.as_string()
        table = next(t for t in ledger.KEYED_TABLES if f'FROM "{t}"' in text)
        keys = self.rows.get(table, [])
        self.result = [(k,) for k in keys if params is None or k in params[0]]

    def fetchall(self):
        return self.result


class FakeConn:
    def __init__(self, rows):
        self.rows = rows

    def cursor(self):
        return FakeCursor(self.rows)


def test_check_ignores_error_records():
    entries = [intent(1.0, "a", 0.9), ack(1.1, "a"), error(1.5), error(1.6, table="stock_movements"),
               intent(2.0, "b"), ack(2.1, "b")]
    res = ledger.check(entries, FakeConn({"orders": ["a", "b"]}), exact=True)
    assert res.ok and res.acknowledged == 2 and res.in_doubt == 0
    # a database missing an acknowledged write is still caught, with error records around
    res = ledger.check(entries, FakeConn({"orders": ["a"]}), exact=True)
    assert res.missing == {"orders": ["b"]} and not res.ok


# -- held_seconds ---------------------------------------------------------------------------------

def test_held_seconds_is_the_longest_began_to_ack():
    entries = [intent(10.1, "a", 10.0), ack(10.2, "a"),       # 0.2
               intent(13.0, "b", 11.0), ack(13.5, "b"),       # 2.5: held across a pause
               intent(14.0, "c", 13.9), ack(14.1, "c")]       # 0.2
    assert held_seconds(entries) == pytest.approx(2.5)
    assert held_seconds(entries, since=13.6) == pytest.approx(0.2)   # by ack time
    assert held_seconds(entries, until=13.5) == pytest.approx(2.5)   # inclusive
    assert held_seconds(entries, since=10.2, until=10.2) == pytest.approx(0.2)
    assert held_seconds(entries, since=20.0) is None


def test_held_seconds_skips_writes_without_began_and_unacknowledged_ones():
    entries = [intent(1.0, "old"), ack(1.1, "old"),                 # an old record: began unknown
               intent(5.0, "doubt", 1.0),                           # never acknowledged
               error(6.0),
               intent(7.05, "w", 7.0, table="stock_movements", dyno="worker.1"),
               ack(7.3, "w", table="stock_movements", dyno="worker.1")]
    assert held_seconds(entries) == pytest.approx(0.3)
    assert held_seconds(entries[:2]) is None
    assert held_seconds([]) is None


def test_held_seconds_pairs_by_table_and_key_in_any_order():
    # the same key in two tables is two writes; entries need not be sorted
    entries = [ack(3.0, "k", table="stock_movements"), ack(2.0, "k"),
               intent(1.9, "k", 1.5), intent(2.9, "k", 2.8, table="stock_movements")]
    assert held_seconds(entries) == pytest.approx(0.5)
    assert held_seconds(iter(entries)) == pytest.approx(0.5)   # any iterable


# -- errors ---------------------------------------------------------------------------------------

def test_errors_counts_error_records_in_the_window():
    entries = [intent(1.0, "a", 0.9), ack(1.1, "a"), error(2.0), error(3.0), error(4.0), intent(5.0, "b", 4.9)]
    assert errors(entries) == 3
    assert errors(entries, since=3.0) == 2
    assert errors(entries, until=3.0) == 2
    assert errors(entries, since=2.5, until=3.5) == 1
    assert errors(entries, since=10.0) == 0
    assert errors([]) == 0
