"""The after-action review's data, without PostgreSQL: the write rate from ledger records, the windows and
the point of no return from a journal, the lag samples, and a picture and page drawn from them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from runbook import measure, review
from runbook.journal import Journal
from runbook.workload.ledger import Entry


def ack(ts: float, endpoint: str = "127.0.0.1:5432") -> Entry:
    return Entry("ack", ts, "web.1", "orders", f"k{ts}", endpoint)


# -- the write rate ------------------------------------------------------------------------------------------
def test_write_rate_counts_acks_per_bin_and_drops_the_partial_last_bin():
    # 10 commits/s for 2 s, nothing for 1 s (the window), 20 commits/s for 1 s; a partial bin at the end
    times = [100 + i / 10 for i in range(20)] + [103 + i / 20 for i in range(20)] + [104.1]
    entries = [ack(t) for t in times] + [Entry("intent", 100.05, "web.1", "orders", "x", "e"),
                                         Entry("error", 102.5, "web.1", "orders", "", "e", message="refused")]
    series = measure.write_series(entries, 100.0, 104.2, width=0.5)
    assert series["bin_seconds"] == 0.5 and series["start"] == 100.0
    assert series["acks"] == [5, 5, 5, 5, 0, 0, 10, 10]      # 8 whole bins; 104.1 lies in the partial ninth
    assert series["errors"] == [0, 0, 0, 0, 0, 1, 0, 0]       # intents are neither
    points = review.rate_points(series)
    assert points[0] == (100.25, 10.0) and points[4] == (102.25, 0.0) and points[-1] == (103.75, 20.0)
    assert review.rate_points(series, "errors")[5] == (102.75, 2.0)


def test_bin_width_shows_a_one_second_window_yet_bounds_a_long_run():
    assert measure.bin_seconds_for(20) == 0.5
    assert measure.bin_seconds_for(4 * 3600) == pytest.approx(4 * 3600 / measure.MAX_BINS)


def test_the_write_rate_is_saved_beside_the_run_from_the_apps_ledger(tmp_path):
    from runbook.workload.ledger import LedgerWriter

    app_dir = tmp_path / "app"
    writer = LedgerWriter(app_dir, "web.1", fsync=False)
    journal = Journal.create(tmp_path / "state", "failover-ec2")
    t0 = journal.events[0]["ts"]
    for i in range(40):
        writer.ack(t0 - 4 + i * 0.1, "orders", f"k{i}", "127.0.0.1:1")
    writer.close()
    journal.record("run", "finished", outcome="completed")

    class App:
        state_dir = str(app_dir)

    class Outputs:
        app = App()

    path = measure.save_write_rate(journal, Outputs())
    saved = measure.read_writes(journal.run_dir)
    assert path == journal.run_dir / measure.WRITES_FILE and saved is not None
    assert saved["start"] == pytest.approx(t0 - 5.0) and sum(saved["acks"]) >= 36   # all but a partial last bin
    # a real app keeps no ledger: nothing saved, nothing raised
    class NoLedger:
        app = object()

    other = Journal.create(tmp_path / "state2", "failover-ec2")
    assert measure.save_write_rate(other, NoLedger()) is None and measure.read_writes(other.run_dir) is None


# -- windows and the point of no return, from the journal -------------------------------------------------------
def journal_with(tmp_path: Path, kind: str, events: list[tuple[str, str, dict]]) -> Journal:
    j = Journal.create(tmp_path, kind, switch_mode="url")
    for step, event, data in events:
        j.record(step, event, **data)
    return j


def test_windows_and_point_of_no_return_from_a_completed_hop_1(tmp_path):
    j = journal_with(tmp_path, "failover-ec2", [
        ("preflight", "start", {}), ("preflight", "done", {"context": {"candidate": "ec2-a"}}),
        ("fence", "start", {}), ("fence", "done", {"context": {"fenced_at": 1000.5}}),
        ("promote", "start", {}),
        ("promote", "done", {"context": {"promoted_at": 1002.0, "new_leader": "ec2-a"}}),
    ])
    state = review.RunState.from_journal(j)
    assert review.database_window(state) == (1000.5, 1002.0)
    name, at = review.point_of_no_return(j)
    assert name == "promote" and at == next(e["ts"] for e in j.events if e["step"] == "promote")
    assert [b.name for b in review.bars(j)] == ["preflight", "fence", "promote"]
    assert all(b.outcome == "done" and b.end >= b.start for b in review.bars(j))


def test_no_point_of_no_return_when_the_run_fell_back_before_it_or_refused_to_cross(tmp_path):
    before = journal_with(tmp_path / "a", "failover-ec2", [
        ("fence", "start", {}), ("fence", "done", {"context": {"fenced_at": 10.0}}),
        ("flush", "start", {}), ("flush", "failed", {"detail": "timed out", "crossed": True}),
        ("fence", "reverted", {})])
    assert review.point_of_no_return(before) == ("promote", None)
    assert review.database_window(review.RunState.from_journal(before)) is None    # never writable elsewhere
    refused = journal_with(tmp_path / "b", "failover-aurora", [
        ("switch_over", "start", {}), ("switch_over", "failed", {"detail": "source wrote", "crossed": False})])
    assert review.point_of_no_return(refused) == ("switch_over", None)
    running = journal_with(tmp_path / "c", "failover-ec2", [("promote", "start", {})])
    assert review.point_of_no_return(running)[1] is not None    # began: it may have acted
    assert review.bars(running)[0].outcome == "in progress"


def test_the_apps_window_from_the_reports_iso_times():
    report = {"write_unavailability": {"last_ack_on_source": "2026-11-27T18:11:09.445Z",
                                       "first_ack_on_target": "2026-11-27T18:11:10.964Z", "seconds": 1.519}}
    a, b = review.app_window(report)
    assert b - a == pytest.approx(1.519, abs=1e-3)
    assert review.app_window({"write_unavailability": {"last_ack_on_source": None}}) is None
    assert review.app_window({}) is None


def test_lag_samples_are_throttled_and_each_return_to_zero_is_kept(tmp_path):
    j = Journal.create(tmp_path, "failover-ec2")
    for lag in (5000, 4000, 3000):
        measure.record_lag(j, "ec2-a", lag, every=60)      # only the first within the minute
    measure.record_lag(j, "ec2-a", 0, every=60)             # back to zero: always kept
    measure.record_lag(j, "ec2-a", 0, every=60)             # still zero: throttled
    measure.record_lag(j, "aurora", -7, every=60)           # past the target: zero, another node
    measure.record_lag(j, "ec2-a", None)
    lag = measure.read_lag(j.run_dir)
    assert [b for _, b in lag["ec2-a"]] == [5000, 0] and [b for _, b in lag["aurora"]] == [0]
    # a dry run's journal is /dev/null: nothing is written beside it
    measure.record_lag(Journal(Path("/dev/null"), "dry-run", "failover-ec2"), "ec2-a", 1)
    assert not Path("/dev/lag.jsonl").exists()


# -- the picture and the page ---------------------------------------------------------------------------------------
def hop_for_drawing(tmp_path: Path, secret: str) -> review.Hop:
    t0 = 1_800_000_000.0
    j = journal_with(tmp_path, "failover-ec2", [
        ("preflight", "start", {}), ("preflight", "done", {"context": {"candidate": "ec2-a"}}),
        ("fence", "start", {}), ("fence", "done", {"context": {"fenced_at": t0 + 4}}),
        ("promote", "start", {}),
        ("promote", "done", {"detail": f"postgresql://app:{secret}@10.0.0.1/app", "context": {"promoted_at": t0 + 5}}),
    ])
    bars = [review.Bar("preflight", t0, t0 + 3, "done"), review.Bar("fence", t0 + 3.5, t0 + 4, "done"),
            review.Bar("promote", t0 + 4.2, t0 + 5, "done"), review.Bar("repoint", t0 + 5, t0 + 8, "failed")]
    writes = measure.write_series([ack(t0 - 2 + i / 50) for i in range(250)] +
                                  [ack(t0 + 6 + i / 50) for i in range(150)], t0 - 3, t0 + 9, width=0.25)
    report = {"run_id": j.run_id, "kind": "failover-ec2", "outcome": "fell_back",
              "reason": f"flush: password={secret} timed out", "switch_mode": "url",
              "write_unavailability": {"seconds": 3.0}, "database_unavailability": {"seconds": 1.0},
              "steps": [{"name": "promote", "started_at": "2027-01-15T08:00:04.200Z", "seconds": 0.8,
                         "outcome": "done", "detail": f"postgresql://app:{secret}@10.0.0.1/app"}],
              "acknowledged_writes": 400, "missing_on_target": 0, "checked_on": "10.0.0.1:5432"}
    return review.Hop(run_id=j.run_id, kind="failover-ec2", report=report, start=t0, end=t0 + 9, bars=bars,
                      app_window=(t0 + 3, t0 + 6), db_window=(t0 + 4, t0 + 5), point_of_no_return=("promote", t0 + 4.2),
                      writes=writes, lag={"ec2-a": [(t0 + 4, 20000), (t0 + 4.3, 0)]},
                      snapshots={"ec2-a": "snap-0123"})


def colour_pixels(png: bytes, hex_colour: str, tolerance: int = 30) -> int:
    """How many pixels are within ``tolerance`` of ``hex_colour`` on every channel (Pillow and numpy come with
    matplotlib)."""
    import numpy
    from PIL import Image

    want = numpy.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    pixels = numpy.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    return int((numpy.abs(pixels - want) <= tolerance).all(axis=-1).sum())


def test_the_picture_draws_the_rate_the_steps_and_the_lag(tmp_path):
    png = review.picture([hop_for_drawing(tmp_path, "s3cret-pw")])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert colour_pixels(png, review.RATE_COLOUR) > 300           # the commits/s line
    assert colour_pixels(png, review.STEP_COLOURS["done"]) > 300  # the steps' bars
    assert colour_pixels(png, review.STEP_COLOURS["failed"]) > 100
    assert colour_pixels(png, review.LAG_COLOUR) > 30


def test_the_page_is_self_contained_says_what_next_and_holds_no_secret(tmp_path):
    hop = hop_for_drawing(tmp_path, "s3cret-pw")
    doc = review.page([hop], review.picture([hop]))
    assert "s3cret-pw" not in doc and "***" in doc
    assert doc.count("data:image/png;base64,") == 1
    assert "http://" not in doc and "https://" not in doc and "<script" not in doc and "<link" not in doc
    assert "It fell back before the point of no return" in doc and "snap-0123" in doc
    assert "invoke estimate --size" in doc      # no estimate asked for yet: how to get one


def test_next_steps_by_outcome(tmp_path):
    hop = hop_for_drawing(tmp_path, "x")
    for outcome, needle in (("completed", "Hop 1 is done"), ("fallback_failed", "did NOT complete"),
                            ("refused", "nothing changed"), ("failed", "after the point of no return")):
        hop.report["outcome"] = outcome
        assert needle in review.next_steps(hop), outcome
    hop.point_of_no_return = ("promote", None)
    assert "re-checks what it did" in review.next_steps(hop)


def test_runs_of_a_rehearsal_are_both_hops(tmp_path):
    first = Journal.create(tmp_path, "failover-ec2")
    first.finish("completed")
    last = Journal.create(tmp_path, "failover-aurora")
    last.finish("completed")
    (last.run_dir / "report.json").write_text(json.dumps({"run_id": last.run_id,
                                                          "failover_ec2": {"run_id": first.run_id}}))
    assert review.runs_of(tmp_path, last.run_id) == [first.run_id, last.run_id]
    assert review.runs_of(tmp_path, first.run_id) == [first.run_id]
