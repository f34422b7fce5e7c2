"""``invoke estimate`` without PostgreSQL: sizes and rates parsed (bad ones exit 2 naming the flag), the
throughputs gathered from recorded runs, and the phases extrapolated from them with their assumptions."""

from __future__ import annotations

import json
import math

import pytest

from runbook import estimate as est
from runbook import measure
from runbook.errors import ConfigError
from runbook.journal import Journal
from tests.unit.test_cli_input import assert_bad_input, cli


@pytest.fixture
def dirs(tmp_path):
    """A sandbox dir with nothing in it and a state dir of our own (as test_cli_input's)."""
    return {"INVOKE_TERN_SANDBOX_DIR": str(tmp_path / "sandbox"), "INVOKE_TERN_STATE_DIR": str(tmp_path / "state")}


@pytest.mark.parametrize("raw, size", [("1.4TB", 1_400_000_000_000), ("500GB", 500 * 10 ** 9), ("1TiB", 2 ** 40),
                                       ("1.5 gb", 1_500_000_000), ("123456", 123456), ("2e3MB", 2 * 10 ** 9)])
def test_sizes(raw, size):
    assert est.parse_size("size", raw) == size


@pytest.mark.parametrize("raw, needle", [("1.4XB", "unknown unit"), ("-1TB", "greater than 0"), ("0", "greater than 0"),
                                         ("TB", "must be a size"), ("", "must be a size"), ("nan", "must be a size"),
                                         ("inf TB", "must be a size")])
def test_bad_sizes_name_the_flag(raw, needle):
    with pytest.raises(ConfigError, match=r"^--size") as exc:
        est.parse_size("size", raw)
    assert needle in str(exc.value)


def test_the_other_flags_are_checked_and_named():
    for flags, needle in (({"size": "1TB", "write_rate": "-5"}, "--write-rate must be greater than 0"),
                          ({"size": None, "write_rate": "5"}, "--size is required"),
                          ({"size": "1TB", "write_rate": None}, "--write-rate is required"),
                          ({"size": "1TB", "write_rate": "5", "cpu_factor": "2x"}, "--cpu-factor must be a plain"),
                          ({"size": "1TB", "write_rate": "5", "verify_rate": "0"}, "--verify-rate must be greater")):
        with pytest.raises(ConfigError, match=needle):
            est.arguments(**flags)


def test_rates_and_durations():
    assert est.parse_rate("network", "10Gbit") == est.parse_rate("network", "10Gbps") == 1.25e9
    assert est.parse_rate("network", "1.25GB/s") == 1.25e9 and est.parse_rate("network", "200") == 200e6
    assert est.parse_duration("backup_age", "24h") == est.parse_duration("backup_age", "24") == 86400
    assert est.parse_duration("archive_latency", "3", plain="s") == 3 and est.parse_duration("x", "90min") == 5400
    # a lower-case b is a bit, as network speeds are written: 1Gb/s is 125 MB/s, not 1 GB/s
    assert est.parse_rate("network", "1Gb/s") == est.parse_rate("network", "1 Gb") == est.parse_rate("network", "1Gbit")
    assert est.parse_rate("network", "1GB/s") == 8 * est.parse_rate("network", "1Gb/s")
    assert est.parse_rate("network", "1gb") == est.parse_rate("network", "1GB")
    assert est.parse_size("size", "1.4Tb") == est.parse_size("size", "1.4TB")
    with pytest.raises(ConfigError, match="--network: unknown unit"):
        est.parse_rate("network", "3furlongs")
    with pytest.raises(ConfigError, match="--backup-age: unknown unit"):
        est.parse_duration("backup_age", "3 fortnights")


def test_no_rehearsal_recorded_uses_the_documented_defaults_and_says_so(tmp_path):
    measured = est.gather(tmp_path / "nothing")
    assert measured.empty
    result = est.estimate(est.parse_size("size", "1.4TB"), 500, measured, est.Assumptions())
    assert result["basis"] == "defaults" and "no rehearsal recorded" in result["warnings"][0]
    phases = {p["phase"]: p for p in result["phases"]}
    fetch = phases["restore: fetch the base backup"]
    assert fetch["source"] == "default" and "default" in fetch["assumption"]
    assert fetch["seconds"] == pytest.approx(1.4e12 / est.DEFAULTS["restore"][0], rel=1e-3)
    assert all(p["source"] == "default" for p in result["phases"])


def test_a_flag_overrides_a_throughput_and_bounds_apply(tmp_path):
    size, rate, a = est.arguments("1TB", "100", network="1Gbit", restore_rate="500", replay_rate="10MB/s",
                                  wal_per_commit="150KB")
    result = est.estimate(size, rate, est.Measured(), a)
    phases = {p["phase"]: p for p in result["phases"]}
    fetch = phases["restore: fetch the base backup"]
    assert fetch["seconds"] == pytest.approx(1e12 / 125e6, rel=1e-3) and "bound by the network" in fetch["assumption"]
    assert "(--network)" in fetch["assumption"]
    # 100 commits/s x 150 KB = 15 MB/s of WAL against a 10 MB/s replay: never catches up, and it says so
    assert phases["restore: replay and catch up to the source"]["seconds"] == math.inf
    assert any("never catches up" in w for w in result["warnings"])


def record_rehearsal(root, *, replay_bytes=300 * 10 ** 6):
    """A stack directory as a rehearsal leaves it: a restore's throughput record, replicate-aurora's
    journal, both failovers' journals and reports (hop 2's with the apply headroom) and write series."""
    stack = root / "local"
    measure.append_throughput(stack, {"ts": 1000.0, "what": "restore", "replica": "ec2-a", "fetch_bytes": 400 * 10 ** 6,
                                      "fetch_seconds": 2.0, "replay_bytes": replay_bytes, "replay_seconds": 1.5,
                                      "database_bytes": 300 * 10 ** 6, "database_rows": 1_000_000})
    sync = Journal.create(stack, "replicate-aurora")
    sync.record("initial_sync", "start")
    sync.record("initial_sync", "done", context={"initial_sync_seconds": 10.0, "initial_sync_bytes": 300 * 10 ** 6,
                                                 "initial_sync_rows": 1_000_000})
    sync.finish("completed")
    runs = {}
    for kind, catchup in (("failover-ec2", "flush"), ("failover-aurora", "catch_up")):
        j = Journal.create(stack, kind, switch_mode="pooler")
        t = j.events[0]["ts"]
        if kind == "failover-aurora":
            j.record("preflight", "start")
            j.record("preflight", "done", context={"apply_headroom": {"write_bytes_per_second": 200_000.0}})
        for step in ("pause", "fence", catchup, "verify", "promote", "switch", "start_app", "smoke_test"):
            j.record(step, "start")
            j.record(step, "done")
        j.finish("completed")
        (j.run_dir / "report.json").write_text(json.dumps({
            "run_id": j.run_id, "switch_mode": "pooler", "acknowledged_writes": 1000,
            "write_unavailability": {"seconds": 1.5}, "database_unavailability": {"seconds": 1.0},
            "verification_full": {"ok": True, "rows": 1_000_000, "seconds": 6.0,
                                  **({"verify_seconds": 5.0} if kind == "failover-aurora" else {})}}))
        # 100 commits/s throughout
        (j.run_dir / measure.WRITES_FILE).write_text(json.dumps({"start": t - 5, "bin_seconds": 0.25,
                                                                   "acks": [25] * 400, "errors": [0] * 400}))
        runs[kind] = j.run_id
    return stack, sync.run_id, runs


def test_throughputs_come_from_the_recorded_runs_and_name_them(tmp_path):
    stack, sync_id, runs = record_rehearsal(tmp_path)
    m = est.gather(tmp_path)
    assert m.throughputs["restore"].bytes_per_second == pytest.approx(200e6)
    assert m.throughputs["replay"].bytes_per_second == pytest.approx(200e6)
    assert m.throughputs["replay"].sample_bytes == 300e6
    assert m.throughputs["initial_sync"].bytes_per_second == pytest.approx(30e6)
    assert m.throughputs["initial_sync"].source == f"local/{sync_id}"
    assert m.bytes_per_row[0] == pytest.approx(300)
    # hop 1: 1M rows in 6 s at 300 bytes a row; hop 2: in its 5 s of comparing, 1 s holding the standby
    assert m.throughputs["verify_hop1"].bytes_per_second == pytest.approx(50e6)
    assert m.throughputs["verify_hop2"].bytes_per_second == pytest.approx(60e6)
    assert m.verify_hold_seconds[0] == pytest.approx(1.0)
    assert m.wal_per_commit[0] == pytest.approx(2000)     # 200 kB/s of WAL at 100 commits/s
    assert m.windows["hop1"].catchup_step == "flush" and [n for n, _ in m.windows["hop1"].components] == [
        "pause", "fence", "flush", "verify", "promote", "switch", "start_app"]
    result = est.estimate(est.parse_size("size", "3GB"), 100, m, est.Assumptions())
    phases = {p["phase"]: p for p in result["phases"]}
    assert result["basis"] == "measured" and not result["warnings"]
    assert all(t["used"] for t in result["throughputs"].values()) and set(result["throughputs"]) == {
        "restore", "replay", "initial_sync", "verify_hop1", "verify_hop2"}
    assert phases["initial sync into Aurora"]["seconds"] == pytest.approx(100.0)     # 3 GB at 30 MB/s
    assert phases["initial sync into Aurora"]["source"] == f"local/{sync_id}"
    assert phases["full verification, hop 1 (after the switch, app running)"]["seconds"] == pytest.approx(60.0)
    hop1 = phases["hop 1 (Heroku -> EC2): app unavailable (pooler switch)"]
    # the measured 1.5 s, plus the S3 archive's latency and the last segment's replay
    assert hop1["seconds"] == pytest.approx(1.5 + 3.0 + est.SEGMENT / 200e6, abs=0.06)
    assert hop1["source"] == f"local/{runs['failover-ec2']}" and hop1["measured"] == "1.50 s"
    # `until` leaves out what came later
    assert est.gather(tmp_path, until=1.0).empty


def test_a_throughput_measured_on_too_little_is_shown_not_extrapolated(tmp_path):
    record_rehearsal(tmp_path, replay_bytes=5 * 10 ** 6)
    result = est.estimate(10 ** 12, 500, est.gather(tmp_path), est.Assumptions())
    replay = next(p for p in result["phases"] if p["phase"].startswith("restore: replay"))
    assert replay["source"] == "default" and "on only 5 MB, too little to extrapolate" in replay["assumption"]
    assert replay["measured"].startswith("5 MB of WAL replayed")          # shown beside it all the same
    assert result["throughputs"]["replay"]["used"] is False and result["throughputs"]["restore"]["used"] is True
    assert result["basis"] == "partly defaults" and any("replay on 5 MB" in w for w in result["warnings"])


def test_the_review_shows_the_last_estimate_asked_for(tmp_path):
    stack, _, runs = record_rehearsal(tmp_path)
    assert est.for_review(tmp_path, until=None) is None
    est.save_arguments(tmp_path, {"size": "2TB", "write_rate": "300", "network": None})
    again = est.for_review(tmp_path, until=None, stack_dir=stack)
    assert again["size_bytes"] == 2 * 10 ** 12 and again["arguments"] == {"size": "2TB", "write_rate": "300"}


# -- the CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--size", "1.4XB", "--write-rate", "500"], "--size: unknown unit"),
    (["--size", "-1TB", "--write-rate", "500"], "--size must be greater than 0"),
    (["--size", "1TB", "--write-rate", "5", "--network", "fast"], "--network must be a rate"),
])
def test_bad_estimate_flags_exit_2(dirs, args, needle):
    assert_bad_input(cli("estimate", *args, env=dirs), needle)


def test_estimate_json_from_a_recorded_rehearsal(dirs, tmp_path):
    from pathlib import Path

    state = Path(dirs["INVOKE_TERN_STATE_DIR"])
    _, sync_id, _ = record_rehearsal(state)
    res = cli("estimate", "--size", "1.4TB", "--write-rate", "500", "--json", env=dirs)
    assert res.returncode == 0, res.stderr[-1500:]
    data = json.loads(res.stdout)
    assert data["size_bytes"] == 1_400_000_000_000 and data["basis"] == "measured"
    assert f"local/{sync_id}" in {p["source"] for p in data["phases"]}
    assert json.loads((state / est.ESTIMATE_FILE).read_text()) == {"size": "1.4TB", "write_rate": "500"}
    text = cli("estimate", "--size", "1.4TB", "--write-rate", "500", env=dirs)
    assert text.returncode == 0 and "initial sync into Aurora" in text.stdout, text.stderr[-1500:]
