"""``invoke teardown``: the rehearsal guard, and the pulumi commands run (the CLI faked at the process boundary)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE = """#!/bin/sh
echo "$@" >> "$FAKE_PULUMI_LOG"
case "$1 $2" in
  "stack output") echo "$FAKE_PULUMI_OUTPUTS" ;;
esac
exit 0
"""


@pytest.fixture
def fake_pulumi(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "pulumi"
    exe.write_text(FAKE)
    exe.chmod(0o755)
    log = tmp_path / "pulumi.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_PULUMI_LOG=str(log),
               FAKE_PULUMI_OUTPUTS=json.dumps({"rehearsal": True, "stack": "dev"}))
    return env, log


def invoke(env, *args):
    exe = str(Path(sys.executable).with_name("invoke"))
    return subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_prod_is_never_torn_down(fake_pulumi):
    env, log = fake_pulumi
    res = invoke(env, "teardown", "--stack", "prod", "--yes")
    assert res.returncode != 0 and "production is never torn down" in res.stderr
    assert calls(log) == []


def test_dev_is_destroyed_then_removed(fake_pulumi):
    env, log = fake_pulumi
    res = invoke(env, "teardown", "--stack", "dev", "--yes")
    assert res.returncode == 0, res.stderr
    assert calls(log) == ["stack output --json -s dev", "destroy --yes --non-interactive -s dev",
                          "stack rm --yes --non-interactive --preserve-config -s dev"]


def test_live_outputs_must_agree(fake_pulumi):
    env, log = fake_pulumi
    env["FAKE_PULUMI_OUTPUTS"] = json.dumps({"rehearsal": False})
    res = invoke(env, "teardown", "--stack", "dev", "--yes")
    assert res.returncode != 0 and "live outputs do not say rehearsal" in res.stderr
    assert not any(c.startswith("destroy") for c in calls(log))


def test_unknown_or_unmarked_stack_and_no_confirmation(fake_pulumi, tmp_path):
    env, log = fake_pulumi
    res = invoke(env, "teardown", "--stack", "staging", "--yes")
    assert res.returncode == 2 and "no stack config Pulumi.staging.yaml" in res.stderr
    res = invoke(env, "teardown", "--stack", "dev")          # no --yes, no terminal
    assert res.returncode != 0 and "needs confirmation" in res.stderr
    assert not any(c.startswith("destroy") for c in calls(log))
    res = invoke(env, "teardown")
    assert res.returncode == 2 and "--stack is required" in res.stderr


def test_a_stack_file_not_marked_rehearsal_is_refused(tmp_path):
    from runbook.errors import PreflightError
    from runbook.teardown import check_rehearsal

    (tmp_path / "Pulumi.qa.yaml").write_text("config:\n  tern:rehearsal: false\n")
    with pytest.raises(PreflightError, match="does not mark it as a rehearsal"):
        check_rehearsal("qa", tmp_path)


@pytest.mark.parametrize("printed, why", [
    ("", "cannot be read"),                    # a stack never deployed prints nothing
    ("{}", "has no live outputs"),
    ("[]", "has no live outputs"),
    ("Diagnostics: not json", "cannot be read"),
])
def test_empty_or_unreadable_live_outputs_are_refused(fake_pulumi, monkeypatch, printed, why):
    from runbook.errors import PreflightError
    from runbook.teardown import check_rehearsal

    env, log = fake_pulumi
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("FAKE_PULUMI_LOG", env["FAKE_PULUMI_LOG"])
    monkeypatch.setenv("FAKE_PULUMI_OUTPUTS", printed)
    with pytest.raises(PreflightError, match=f"refusing to tear down 'dev': .*{why}"):
        check_rehearsal("dev", ROOT)
    assert calls(log) == ["stack output --json -s dev"]       # asked, and nothing destroyed


def test_teardown_removes_terns_client_certificate_for_the_stack_only(fake_pulumi, tmp_path):
    """The replicas that trusted it are destroyed (their hba goes with the instance's root volume); tern's
    key for that stack goes too, the runs stay, and another stack's certificate is untouched."""
    from runbook import client_tls

    env, log = fake_pulumi
    state = tmp_path / "state"
    env["INVOKE_TERN_STATE_DIR"] = str(state)
    for stack in ("dev", "local"):
        client_tls.pin_server(state / stack, "ec2-a", client_tls.ensure(state / stack, "postgres").pem)
    (state / "dev" / "runs").mkdir()
    res = invoke(env, "teardown", "--stack", "dev", "--yes")
    assert res.returncode == 0, res.stderr
    assert not (state / "dev" / "tls").exists() and (state / "dev" / "runs").is_dir()
    assert client_tls.existing(state / "local") is not None
    assert "client certificate for dev removed" in res.stderr


@pytest.mark.parametrize("printed, why", [
    ("{}", None),                              # a first `up` that failed half-way saved no outputs
    ("", "cannot be read"),
    (json.dumps({"rehearsal": False}), "live outputs do not say rehearsal"),
])
def test_a_stack_checked_before_its_up_may_have_no_outputs(fake_pulumi, monkeypatch, printed, why):
    """``invoke rehearse --stack`` checked the stack (committed file, effective config) before its own `up`:
    empty outputs are accepted then, and nothing else that says otherwise."""
    from runbook.errors import PreflightError
    from runbook.teardown import check_rehearsal

    env, log = fake_pulumi
    for k in ("PATH", "FAKE_PULUMI_LOG"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.setenv("FAKE_PULUMI_OUTPUTS", printed)
    if why is None:
        check_rehearsal("dev", ROOT, checked_before_up=True)
        with pytest.raises(PreflightError, match="has no live outputs"):     # not without that earlier check
            check_rehearsal("dev", ROOT)
    else:
        with pytest.raises(PreflightError, match=why):
            check_rehearsal("dev", ROOT, checked_before_up=True)
