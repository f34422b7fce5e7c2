"""``--json`` prints only JSON on stdout (progress and tables on stderr, as plain lines without a
terminal); a rehearsal's report outlives its sandbox; a dry run before ``restore`` says so."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_invoke

pytestmark = pytest.mark.functional

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_sandbox_tasks_json_and_dry_run_before_restore(tmp_root):
    sb, state = tmp_root / "sandbox", tmp_root / "state"
    try:
        up = run_invoke("sandbox.up", "--no-app", sandbox_dir=sb, state_dir=state)
        assert up.returncode == 0, up.stderr[-2000:]
        # no terminal: progress still shows, as plain lines
        assert "building the sandbox" in up.stderr and len(lines(up.stderr)) >= 3, up.stderr
        for args in (["failover-ec2", "--dry-run"], ["failover-ec2", "--dry-run", "--json"], ["failover-ec2", "--yes"]):
            res = run_invoke(*args, sandbox_dir=sb, state_dir=state)
            assert res.returncode == 2, (args, res.stderr[-2000:])
            assert len(lines(res.stderr)) == 1 and "run `invoke restore` first" in res.stderr, res.stderr
            assert res.stdout == ""
        assert not (state / "local" / "runs").exists()
        status = run_invoke("status", "--json", sandbox_dir=sb, state_dir=state)
        assert status.returncode == 0, status.stderr
        assert {n["role"] for n in json.loads(status.stdout)["nodes"] if n["kind"] == "ec2"} == {"empty"}
        assert json.loads(run_invoke("outputs", sandbox_dir=sb).stdout)["stack"]
    finally:
        down = run_invoke("sandbox.down", "--json", sandbox_dir=sb, state_dir=state)
    assert down.returncode == 0, down.stderr[-2000:]
    assert json.loads(down.stdout)["was_up"] is True and "ledger" in down.stderr
    again = run_invoke("sandbox.down", "--json", sandbox_dir=sb, state_dir=state)
    assert again.returncode == 0 and json.loads(again.stdout) == {"was_up": False, "ok": True}


def test_rehearse_json_then_report_after_the_sandbox_is_gone(tmp_root):
    from runbook.sandbox import Sandbox

    sb, state = tmp_root / "sandbox", tmp_root / "state"
    try:
        res = run_invoke("rehearse", "--seconds", "2", "--boot-seconds", "2", "--json", sandbox_dir=sb, state_dir=state)
    finally:
        Sandbox(sb).down(check_ledger=False)   # a no-op unless it failed half-way
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)            # nothing but the report on stdout
    assert report["outcome"] == "completed" and report["final_ledger_check"]["ok"] is True
    # both hops: the last report is hop 2's, hop 1's rides along; each has the documented keys
    assert report["kind"] == "failover-aurora" and report["failover_ec2"]["kind"] == "failover-ec2"
    for r in (report, report["failover_ec2"]):
        assert r["outcome"] == "completed" and r["missing_on_target"] == 0 and r["acknowledged_writes"] > 0
        assert r["write_unavailability"]["seconds"] is not None
        # through the pooler (installed by ./dev): no restart at the switch, the database's own figure beside
        assert r["switch_mode"] == "pooler" and r["database_unavailability"]["seconds"] is not None
    for needle in ("building the sandbox", "restoring ec2-a", "failover-ec2", "tern status", "ledger check on"):
        assert needle in res.stderr, needle    # tables and progress, on stderr, without a terminal
    run_dir = state / "local" / "runs" / report["run_id"]
    assert (run_dir / "journal.jsonl").exists() and json.loads((run_dir / "report.json").read_text())["final_ledger_check"]
    # the sandbox is gone; the run is where `report` looks for it, with the ledger figures it saved
    after = run_invoke("report", "--json", sandbox_dir=sb, state_dir=state)
    assert after.returncode == 0, after.stderr[-2000:]
    data = json.loads(after.stdout)
    assert data["run_id"] == report["run_id"] and data["outcome"] == "completed"
    assert data["acknowledged_writes"] == report["acknowledged_writes"] > 0 and data["missing_on_target"] == 0
    for step in data["steps"]:
        assert ISO.match(step["started_at"]) and ISO.match(step["ended_at"]), step
    assert all(ISO.match(v) for v in data["downtime"].values()), data["downtime"]
    w = data["write_unavailability"]
    assert ISO.match(w["last_ack_on_source"]) and ISO.match(w["first_ack_on_target"]) and w["seconds"] >= 0
    text = run_invoke("report", sandbox_dir=sb, state_dir=state)
    assert text.returncode == 0 and report["run_id"] in text.stdout, text.stderr[-2000:]
