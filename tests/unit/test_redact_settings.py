import doctest

import pytest

from runbook import redact as redact_mod
from runbook.errors import ConfigError
from runbook.redact import redact, register_secret
from runbook.settings import Settings


def test_redact_doctests():
    failures, tried = doctest.testmod(redact_mod)
    assert tried > 0 and failures == 0


def test_registered_secret_is_masked_anywhere():
    register_secret("hunter2-very-secret")
    assert "hunter2" not in redact("error near 'hunter2-very-secret' in query")


def test_settings_reject_unknown_key_and_bad_type():
    with pytest.raises(ConfigError, match="unknown setting tern.nope"):
        Settings.from_mapping({"nope": 1})
    with pytest.raises(ConfigError, match="tern.replicas must be int"):
        Settings.from_mapping({"replicas": "two"})
    s = Settings.from_mapping({"replicas": "3", "sample_percent": 2})
    assert s.replicas == 3 and s.sample_percent == 2.0
    assert s.replace(replicas=None).replicas == 3


def test_scram_verifier_matches_postgresql_format():
    import base64

    from runbook.pg import scram_verifier

    v = scram_verifier("pencil", salt=b"0123456789abcdef")
    head, keys = v.split("$", 1)[0], v.split("$", 2)
    assert head == "SCRAM-SHA-256" and keys[1] == "4096:" + base64.b64encode(b"0123456789abcdef").decode()
    stored, server = keys[2].split(":")
    assert len(base64.b64decode(stored)) == 32 and len(base64.b64decode(server)) == 32
    assert "pencil" not in v
    assert scram_verifier("pencil") != scram_verifier("pencil")   # a fresh salt each time


def test_run_lock_refuses_a_second_runner_and_frees_on_exit(tmp_path):
    from runbook.errors import PreflightError
    from runbook.journal import RunLock

    with RunLock(tmp_path, "failover-ec2"):
        with pytest.raises(PreflightError, match=r"another failover-ec2 is running \(pid \d+\)"):
            with RunLock(tmp_path, "failover-ec2"):
                pass
    with RunLock(tmp_path, "failover-ec2"):   # released: a new runner may take it
        pass
