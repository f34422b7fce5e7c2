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
