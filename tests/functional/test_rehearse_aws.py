"""Hop 1 rehearsed through the REAL AWS and Heroku adapters: ``invoke rehearse --hops 1 --adapters aws``.

Every host command of the restore and the failover goes through SsmHost -> the SSM stand-in (1 s a command,
the agent's bare environment, throttled polling), the base backup and the WAL through WAL-G (the stand-in)
from the source's archive in S3, the app through HerokuApp -> the Heroku stand-in over the sandbox's real
dynos, the snapshot through EbsSnapshots -> EC2 as moto emulates it (runbook/standins/world.py).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_invoke

pytestmark = [pytest.mark.functional, pytest.mark.timeout(1200)]


def test_rehearse_hop1_through_the_ssm_heroku_and_ec2_standins(tmp_root):
    from runbook.sandbox import Sandbox

    sb, state = tmp_root / "sandbox", tmp_root / "state"
    try:
        res = run_invoke("rehearse", "--hops", "1", "--adapters", "aws", "--seconds", "2", "--boot-seconds", "1", "--json",
                         sandbox_dir=sb, state_dir=state, timeout=1100)
    finally:
        Sandbox(sb).down(check_ledger=False)   # a no-op unless it failed half-way
    assert res.returncode == 0, res.stderr[-4000:]
    report = json.loads(res.stdout)
    assert report["kind"] == "failover-ec2" and report["outcome"] == "completed", report.get("reason")
    assert report["adapters"] == "aws"

    # no acknowledged write lost: by the report's check on the new leader and by the final ledger check
    ledger = report["final_ledger_check"]
    assert ledger["ok"] is True and ledger["missing"] == 0 and ledger["acknowledged"] > 0, ledger
    assert report["missing_on_target"] == 0 and report["acknowledged_writes"] > 0
    assert json.loads((state / "local" / "runs" / report["run_id"] / "report.json").read_text())["standins"]

    # the window was measured, with every host command paying SSM's latency
    window = report["write_unavailability"]
    assert window["seconds"] is not None and window["seconds"] > 1.0, window
    assert window["target"] == report["checked_on"] == ledger["endpoint"]

    standins = report["standins"]
    ssm = standins["ssm"]
    assert ssm["latency_seconds"] == 1.0
    assert ssm["commands"] > 10 and ssm["calls"].get("SendCommand", 0) == ssm["commands"], ssm
    assert ssm["calls"].get("GetCommandInvocation", 0) >= ssm["commands"], ssm

    # the app's DATABASE_URL moved on Heroku's side, off its add-on attachment, to the new leader
    heroku = standins["heroku"]
    assert heroku["config_var_patches"] >= 2 and heroku["restarts"] >= 1, heroku
    assert heroku["refused_patches"] == 0, heroku
    assert heroku["database_url_endpoint"] == report["checked_on"]
    assert "DATABASE" not in heroku["attachments"] and "TERN_HEROKU_SOURCE" in heroku["attachments"], heroku

    # the replicas were restored by WAL-G (backup-fetch over SSM) from the source's archive in S3, and replayed
    # (wal-fetch) what the source archived while it ran
    archive = standins["archive"]
    assert archive["base_backups"] and archive["base_backups"][0].startswith("base_0000000"), archive
    assert archive["wal_files_pushed"] > 0 and archive["push_errors"] == 0, archive

    # the snapshot before the point of no return is an EBS snapshot of the candidate's data volume
    snaps = standins["ec2"]["snapshots"]
    assert [s["tags"].get("tern:replica") for s in snaps] == [report["new_leader"]], snaps

    # no credential in what the operator sees
    for text in (res.stdout, res.stderr):
        assert not re.search(r"://[^/:@\s]+:[^/@\s]+@", text), "a URL with a password was printed"
