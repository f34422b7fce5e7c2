"""Does Aurora's apply keep up with the EC2 leader's writes? (pitfall 13: one logical apply worker can
fall far behind a busy source). Deciding only: the looks are taken by :func:`runbook.replication.native.lag`.

A *look* is one query on the leader: its current WAL position (``pg_current_wal_lsn()``: what it wrote,
never what it sent) and what Aurora confirmed (the slot's ``confirmed_flush_lsn``), on the leader's own
clock. Two looks ``seconds`` apart give the *write rate* (leader bytes/s), the *apply rate* (confirmed
bytes/s) and the *headroom* (apply rate / write rate).

The rule (:func:`judge`), stated once:

1. Aurora more than ``max_lag_bytes`` behind the leader at the last look: refuse.
2. **Caught up at both ends of the sample** (at each look, Aurora is behind by less than one second of the
   leader's writes, and never more than :data:`CAUGHT_UP_FLOOR_BYTES` when the leader writes almost
   nothing): enough, whatever the ratio. While Aurora keeps up it can only apply what the leader writes,
   so applied ~= written and the ratio sits near 1 whatever the spare capacity; the ratio measures
   headroom only while there is a backlog to drain. An app that writes little is always in this case.
3. A backlog at either end: the apply rate must be at least ``min_headroom`` times the write rate over
   the sample (it drains the backlog *and* keeps up with new writes). Nothing written during the sample:
   any progress drains the backlog (headroom unbounded); nothing applied while behind: the apply is
   stalled - refuse.

>>> first = Look(at=100.0, leader_lsn=1_000_000, confirmed_lsn=1_000_000)
>>> judge(measure(first, Look(at=102.0, leader_lsn=1_200_000, confirmed_lsn=1_190_000)),
...       min_headroom=1.5, max_lag_bytes=64 << 20)[0]      # caught up at both ends: enough
True
>>> h = measure(Look(100.0, 1_000_000, 0), Look(102.0, 1_200_000, 100_000))   # a backlog, applied 100 kB for 200 kB
>>> judge(h, min_headroom=1.5, max_lag_bytes=64 << 20)
(False, 'apply headroom 0.50x is under 1.50x: Aurora applied 100,000 bytes while the leader wrote 200,000 in 2.0 s (backlog 1,000,000 -> 1,100,000 bytes)')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..pg import lsn_to_int

CAUGHT_UP_SECONDS = 1.0            # behind by less than this much of the leader's writes = caught up
# the least lag still counted as caught up: Aurora confirms a flush only after its WAL writer ran
# (wal_writer_delay, 200 ms), and the leader writes WAL of its own (running-xacts, checkpoints) meanwhile
CAUGHT_UP_FLOOR_BYTES = 64 * 1024


@dataclass(frozen=True)
class Look:
    at: float                       # the leader's clock, epoch seconds
    leader_lsn: int                 # pg_current_wal_lsn() on the leader
    confirmed_lsn: int | None       # the slot's confirmed_flush_lsn (None: no slot, or nothing confirmed yet)

    @property
    def lag(self) -> int | None:
        return None if self.confirmed_lsn is None else max(0, self.leader_lsn - self.confirmed_lsn)

    @classmethod
    def of(cls, lag: dict[str, Any]) -> "Look":
        """From :func:`runbook.replication.native.lag`'s answer."""
        return cls(float(lag["at"]), lsn_to_int(lag["leader_lsn"]) or 0, lsn_to_int(lag.get("confirmed_lsn")))


@dataclass(frozen=True)
class Headroom:
    seconds: float
    written_bytes: int
    applied_bytes: int
    lag_start: int | None
    lag_end: int | None

    @property
    def write_rate(self) -> float:
        return self.written_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def apply_rate(self) -> float:
        return self.applied_bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def ratio(self) -> float | None:
        """apply bytes/s over write bytes/s; None when the leader wrote nothing."""
        return self.applied_bytes / self.written_bytes if self.written_bytes > 0 else None

    def caught_up_at(self, lag: int | None) -> bool:
        if lag is None:
            return False
        return lag <= max(CAUGHT_UP_FLOOR_BYTES, self.write_rate * CAUGHT_UP_SECONDS)

    @property
    def caught_up(self) -> bool:
        """Caught up at both ends of the sample (rule 2)."""
        return self.caught_up_at(self.lag_start) and self.caught_up_at(self.lag_end)

    def to_json(self) -> dict[str, Any]:
        ratio = self.ratio
        return {"sample_seconds": round(self.seconds, 3), "written_bytes": self.written_bytes,
                "applied_bytes": self.applied_bytes, "write_bytes_per_second": round(self.write_rate, 1),
                "apply_bytes_per_second": round(self.apply_rate, 1),
                "headroom": None if ratio is None else round(ratio, 3), "caught_up": self.caught_up}


def measure(first: Look, last: Look) -> Headroom:
    seconds = max(0.0, last.at - first.at)
    written = max(0, last.leader_lsn - first.leader_lsn)
    applied = 0
    if first.confirmed_lsn is not None and last.confirmed_lsn is not None:
        applied = max(0, last.confirmed_lsn - first.confirmed_lsn)
    return Headroom(seconds, written, applied, first.lag, last.lag)


def judge(h: Headroom, *, min_headroom: float, max_lag_bytes: int) -> tuple[bool, str]:
    """(enough?, why) by the rule in the module docstring."""
    if h.lag_end is None:
        return False, "Aurora has confirmed nothing on the leader's slot: replication is not running"
    if h.lag_end > max_lag_bytes:
        return False, f"Aurora is {h.lag_end:,} bytes behind the leader (threshold {max_lag_bytes:,})"
    backlog = f"backlog {h.lag_start:,} -> {h.lag_end:,} bytes" if h.lag_start is not None else \
        f"backlog {h.lag_end:,} bytes"
    if h.caught_up:
        return True, (f"caught up at both ends of a {h.seconds:.1f} s sample ({backlog}; the leader wrote "
                      f"{h.written_bytes:,} bytes, Aurora confirmed {h.applied_bytes:,})")
    if h.written_bytes == 0:
        if h.applied_bytes > 0:
            return True, f"draining: nothing written, {h.applied_bytes:,} bytes applied in {h.seconds:.1f} s ({backlog})"
        return False, f"apply stalled: nothing applied in {h.seconds:.1f} s with a {backlog}"
    ratio = h.ratio or 0.0
    what = (f"Aurora applied {h.applied_bytes:,} bytes while the leader wrote {h.written_bytes:,} in "
            f"{h.seconds:.1f} s ({backlog})")
    if ratio < min_headroom:
        return False, f"apply headroom {ratio:.2f}x is under {min_headroom:.2f}x: {what}"
    return True, f"apply headroom {ratio:.2f}x (at least {min_headroom:.2f}x): {what}"


def lag_seconds(first: Look, last: Look, replay_lag: float | None) -> float | None:
    """How long ago the leader's WAL was where Aurora's confirmed position is at the last look.

    0 when Aurora confirmed the leader's current position. Behind by less than the sample (Aurora
    confirmed at least what the leader had written at the first look): interpolated between the
    leader's positions at the two looks, on the leader's own clock (no clock skew between hosts).
    Further behind: PostgreSQL's own measure, the walsender's ``replay_lag`` (it keeps the leader's
    flush time of each WAL position and reports how old the WAL was when Aurora applied it), at
    least the sample's length. None when no walsender runs (the bytes still say how far behind).

    >>> lag_seconds(Look(0.0, 1000, 1000), Look(2.0, 3000, 2000), None)
    1.0
    >>> lag_seconds(Look(0.0, 1000, 500), Look(2.0, 3000, 800), 7.5)
    7.5
    """
    lag = last.lag
    if lag is None:
        return None
    if lag == 0:
        return 0.0
    seconds = max(0.0, last.at - first.at)
    confirmed = last.confirmed_lsn or 0
    if confirmed >= first.leader_lsn and last.leader_lsn > first.leader_lsn:
        behind = (last.leader_lsn - confirmed) / (last.leader_lsn - first.leader_lsn) * seconds
        return round(min(seconds, behind), 3)
    if replay_lag is None:
        return None
    return round(max(float(replay_lag), seconds), 3)
