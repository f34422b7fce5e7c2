"""The apply-headroom rule of failover-aurora's preflight (runbook/replication/headroom.py), and the
logical lag in seconds that ``invoke status`` shows."""

from __future__ import annotations

import doctest

import pytest

from runbook.replication import headroom
from runbook.replication.headroom import CAUGHT_UP_FLOOR_BYTES, Look, judge, lag_seconds, measure

MB = 1 << 20


def sample(lag_start: int, lag_end: int, written: int, seconds: float = 2.0, start: int = 100 * MB) -> headroom.Headroom:
    """Two looks: the leader wrote ``written`` bytes in ``seconds``; Aurora was ``lag_start`` then ``lag_end`` behind."""
    first = Look(1000.0, start, start - lag_start)
    last = Look(1000.0 + seconds, start + written, start + written - lag_end)
    return measure(first, last)


def verdict(h, min_headroom=1.5, max_lag_bytes=64 * MB):
    return judge(h, min_headroom=min_headroom, max_lag_bytes=max_lag_bytes)


def test_doctests():
    failures, tried = doctest.testmod(headroom)
    assert tried > 0 and failures == 0


def test_caught_up_at_both_ends_is_enough_whatever_the_ratio():
    # Aurora keeps up: it applies what is written, so the ratio is ~1 (here under 1.5): still enough
    h = sample(lag_start=20_000, lag_end=30_000, written=400_000)
    assert h.caught_up and h.ratio == pytest.approx(390_000 / 400_000)
    ok, why = verdict(h)
    assert ok and why.startswith("caught up at both ends")


def test_a_quiet_app_is_caught_up():
    ok, why = verdict(sample(0, 0, written=0))
    assert ok and "caught up" in why
    # a little WAL of the server's own, confirmed a moment later: within the floor
    ok, _ = verdict(sample(0, CAUGHT_UP_FLOOR_BYTES, written=CAUGHT_UP_FLOOR_BYTES))
    assert ok


def test_a_backlog_drained_fast_enough_passes():
    # 10 MB behind, the leader writes 1 MB/s, Aurora applies 6 MB/s: headroom 6x
    h = sample(lag_start=10 * MB, lag_end=0, written=2 * MB)
    assert not h.caught_up and h.ratio == pytest.approx(6.0)
    ok, why = verdict(h)
    assert ok and why.startswith("apply headroom 6.00x")


def test_a_backlog_drained_too_slowly_is_refused():
    # 10 MB behind, writes 1 MB/s, Aurora applies 1.2 MB/s: it catches up, but with too little headroom
    h = sample(lag_start=10 * MB, lag_end=10 * MB - int(0.4 * MB), written=2 * MB)
    ok, why = verdict(h)
    assert not ok and "apply headroom 1.20x is under 1.50x" in why
    assert verdict(h, min_headroom=1.1)[0]          # the threshold is the setting's


def test_apply_falling_behind_is_refused_even_under_the_lag_threshold():
    # caught up at the start, 1.5 s of writes behind at the end: the ratio decides, and it is < 1
    h = sample(lag_start=0, lag_end=int(1.5 * MB), written=2 * MB)
    assert not h.caught_up
    ok, why = verdict(h)
    assert not ok and "0.25x" in why


def test_lag_over_the_threshold_is_refused_first():
    h = sample(lag_start=100, lag_end=5000, written=400_000)
    assert h.caught_up
    ok, why = verdict(h, max_lag_bytes=1000)
    assert not ok and why == "Aurora is 5,000 bytes behind the leader (threshold 1,000)"


def test_nothing_written_a_backlog_drains_or_the_apply_is_stalled():
    ok, why = verdict(sample(lag_start=5 * MB, lag_end=3 * MB, written=0))
    assert ok and why.startswith("draining")
    ok, why = verdict(sample(lag_start=5 * MB, lag_end=5 * MB, written=0))
    assert not ok and why.startswith("apply stalled")


def test_nothing_confirmed_is_refused():
    h = measure(Look(0.0, 1000, None), Look(2.0, 2000, None))
    ok, why = verdict(h)
    assert not ok and "not running" in why


def test_caught_up_tolerance_scales_with_the_write_rate():
    # at 50 MB/s of writes, 20 MB behind is 0.4 s of writes: caught up; 80 MB (1.6 s) is not
    assert sample(20 * MB, 20 * MB, written=100 * MB).caught_up
    assert not sample(80 * MB, 80 * MB, written=100 * MB).caught_up


def test_lag_seconds():
    # confirmed the leader's current position: 0
    assert lag_seconds(Look(0.0, 1000, 1000), Look(2.0, 3000, 3000), 4.0) == 0.0
    # within the sample: interpolated on the leader's clock (Aurora is where the leader was 0.5 s ago)
    assert lag_seconds(Look(0.0, 0, 0), Look(2.0, 4000, 3000), None) == 0.5
    # further behind than the sample: PostgreSQL's replay_lag, at least the sample's length
    assert lag_seconds(Look(0.0, 10_000, 100), Look(2.0, 12_000, 200), 30.0) == 30.0
    assert lag_seconds(Look(0.0, 10_000, 100), Look(2.0, 12_000, 200), 0.5) == 2.0
    assert lag_seconds(Look(0.0, 10_000, 100), Look(2.0, 12_000, 200), None) is None
    assert lag_seconds(Look(0.0, 10_000, None), Look(2.0, 12_000, None), 1.0) is None


def test_to_json_keys():
    keys = set(sample(0, 0, written=1000).to_json())
    assert keys == {"sample_seconds", "written_bytes", "applied_bytes", "write_bytes_per_second",
                    "apply_bytes_per_second", "headroom", "caught_up"}
