"""The journal never holds a secret, whatever characters the secret contains."""

from __future__ import annotations

import pytest

from runbook.journal import Journal
from runbook.redact import register_secret


@pytest.mark.parametrize("secret", ['with"quote', "back\\slash", 'both\\"x', "new\nline", "tab\tand ünïcode"])
def test_journal_redacts_before_encoding(tmp_path, secret):
    register_secret(secret)
    j = Journal.create(tmp_path, "test", url=f"postgresql://app:{secret}@db/app", note=f"the value {secret} here")
    j.record("step", "done", detail=f"failed with {secret}", context={"nested": [secret, {"k": secret}]})
    text = (tmp_path / "runs" / j.run_id / "journal.jsonl").read_text()
    import json

    for encoded in (secret, json.dumps(secret)[1:-1]):
        assert encoded not in text
    events = Journal.load(tmp_path, j.run_id).events
    assert len(events) == 2 and events[1]["context"] == {"nested": ["***", {"k": "***"}]}


def test_polling_doctests():
    import doctest

    import runbook.polling as polling

    failures, tried = doctest.testmod(polling)
    assert tried >= 3 and failures == 0


def test_a_record_cut_short_by_a_full_disk_is_taken_back(tmp_path, monkeypatch):
    """A full disk can cut a write short instead of failing it: the journal must not keep half a record
    (the runner would believe it written, a reader would skip it, the next record would be glued onto it)."""
    import os

    j = Journal.create(tmp_path, "test")
    j.record("fence", "done", context={"fenced_at": 1.0})
    before = j.path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(OSError) as exc:
        j.record("flush", "progress", context={"final_lsn": "0/3000060"})
    assert exc.value.errno == 28
    assert j.path.read_bytes() == before and len(j.events) == 2
    monkeypatch.setattr(os, "write", real_write)
    j.record("flush", "progress", context={"final_lsn": "0/3000060"})
    assert [e["event"] for e in Journal.load(tmp_path, j.run_id).events] == ["created", "done", "progress"]


def test_a_line_left_unfinished_by_a_crash_does_not_swallow_the_next_record(tmp_path):
    j = Journal.create(tmp_path, "test")
    with open(j.path, "ab") as fh:
        fh.write(b'{"step": "flush", "event": "progr')        # the process died mid-write
    j.record("flush", "done")
    assert [(e["step"], e["event"]) for e in Journal.load(tmp_path, j.run_id).events] == [("run", "created"),
                                                                                           ("flush", "done")]


def test_two_runs_created_in_the_same_second_get_their_own_journals(tmp_path):
    from runbook.journal import Journal

    a = Journal.create(tmp_path, "failover-ec2")
    a.record("flush", "done")
    b = Journal.create(tmp_path, "failover-ec2")
    assert a.run_id != b.run_id and a.path != b.path
    assert not b.is_done("flush") and Journal.load(tmp_path, b.run_id).kind == "failover-ec2"
