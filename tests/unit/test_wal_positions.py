"""Where a standby that replayed everything before an insert position reports itself (runbook.pg.replay_target)."""

from __future__ import annotations

import doctest

import pytest

import runbook.pg as pg
from runbook.pg import lsn_to_int, replay_target

SEGMENT = 16 * 1024 * 1024


def test_pg_doctests():
    failures, tried = doctest.testmod(pg)
    assert tried >= 1 and failures == 0


@pytest.mark.parametrize("insert, replayed_end", [
    ("0/3000028", "0/3000000"),     # right after a segment switch: past the long header, the boundary
    ("5/FF000028", "5/FF000000"),
    ("0/3002018", "0/3002000"),     # a record ended at a page boundary: past the short header
])
def test_a_position_just_past_a_page_header_is_the_boundary(insert, replayed_end):
    assert replay_target(lsn_to_int(insert)) == lsn_to_int(replayed_end)


@pytest.mark.parametrize("insert", ["0/3000030", "0/3002030", "0/3001FF8", "0/30000A0", "1/0"])
def test_any_other_position_is_itself(insert):
    assert replay_target(lsn_to_int(insert)) == lsn_to_int(insert)


def test_never_later_than_the_position_nor_earlier_than_its_page():
    for lsn in range(3 * SEGMENT - 3 * 8192, 3 * SEGMENT + 3 * 8192, 8):
        t = replay_target(lsn)
        assert lsn - lsn % 8192 <= t <= lsn
