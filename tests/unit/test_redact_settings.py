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
