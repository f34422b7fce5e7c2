"""``--json`` prints only JSON on stdout (progress and tables on stderr, as plain lines without a
terminal); a rehearsal's report outlives its sandbox; a dry run before ``restore`` says so."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

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
    check_review_and_estimate(tmp_root, state, sb, report, res.stderr)


def check_review_and_estimate(tmp_root, state, sb, report, stderr: str) -> None:
    """The rehearsal's after-action review (written by rehearse, drawn again by `report --html` from the
    records alone, opened in headless Chromium) and `invoke estimate` from its measurements."""
    runs = state / "local" / "runs"
    hop1, hop2 = report["failover_ec2"]["run_id"], report["run_id"]
    page = Path(report["review"]["html"])
    assert page == runs / hop2 / "review.html" and page.exists(), report["review"]
    assert f"after-action review: {page}" in stderr
    # what the picture draws was recorded while the sandbox was up: the app's writes around each hop,
    # the candidate's lag during hop 1's catch-up and Aurora's during hop 2's
    for run_id in (hop1, hop2):
        writes = json.loads((runs / run_id / "writes.json").read_text())
        assert sum(writes["acks"]) > 0 and writes["bin_seconds"] > 0
    lag1 = [json.loads(line) for line in (runs / hop1 / "lag.jsonl").read_text().splitlines()]
    assert {x["node"] for x in lag1} == {report["failover_ec2"]["new_leader"]} and lag1[-1]["lag_bytes"] == 0
    assert {json.loads(line)["node"] for line in (runs / hop2 / "lag.jsonl").read_text().splitlines()} == {"aurora"}
    # the estimate, from this rehearsal's measurements, each figure naming where it came from
    est = run_invoke("estimate", "--size", "1.4TB", "--write-rate", "500", "--json", sandbox_dir=sb, state_dir=state)
    assert est.returncode == 0, est.stderr[-2000:]
    data = json.loads(est.stdout)
    measured = data["throughputs"]
    assert measured["restore"]["source"].startswith("restore of ec2-") and measured["restore"]["sample_bytes"] > 0
    assert measured["initial_sync"]["source"].startswith("local/replicate-aurora-")
    assert measured["verify_hop1"]["source"] == f"local/{hop1}" and measured["verify_hop2"]["source"] == f"local/{hop2}"
    # a scale-1 sandbox holds too little to extrapolate a throughput from: shown, defaults used, and said
    phases = {p["phase"]: p for p in data["phases"]}
    sync = phases["initial sync into Aurora"]
    assert not measured["initial_sync"]["used"] and sync["source"] == "default" and "too little" in sync["assumption"]
    assert sync["measured"] and data["basis"] == "partly defaults"
    # the windows do not scale with the size: measured, and named
    window = next(p for name, p in phases.items() if name.startswith("hop 2 (EC2 -> Aurora): app unavailable"))
    assert window["source"] == f"local/{hop2}" and window["seconds"] > 0
    # the page again, now with that estimate, and the picture alone: from the run directories only
    html_path, png_path = tmp_root / "review.html", tmp_root / "review.png"
    again = run_invoke("report", "--html", str(html_path), "--png", str(png_path), "--json", sandbox_dir=sb,
                       state_dir=state)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["review"] == {"html": str(html_path), "png": str(png_path)}
    html = html_path.read_text()
    assert hop1 in html and hop2 in html and "hop 2: failover-aurora" in html and "The real night: 1.4 TB" in html
    assert html.count("data:image/png;base64,") == 1 and "http://" not in html and "https://" not in html
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a person opens it: headless Chromium's screenshot is not blank and shows the plot's colours
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (./dev test installs it as root): the browser check did not run")
    shot = tmp_root / "shot.png"
    argv = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
            "--window-size=1400,1100", html_path.as_uri()]
    if os.geteuid() == 0:
        argv.insert(2, "--no-sandbox")     # Chromium refuses to run as root inside its sandbox
    subprocess.run(argv, capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    import numpy
    from PIL import Image

    from runbook import review

    pixels = numpy.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert pixels.std() > 20, "the screenshot is blank"
    picture = pixels[:, : pixels.shape[1] * 2 // 3]     # the picture's column

    def near(hex_colour: str) -> int:
        want = numpy.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
        return int((numpy.abs(picture - want) <= 40).all(axis=-1).sum())

    assert near(review.RATE_COLOUR) > 300, "no write-rate line in the screenshot"
    assert near(review.STEP_COLOURS["done"]) > 300, "no step bars in the screenshot"
