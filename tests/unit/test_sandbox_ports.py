"""Port claims: two sandboxes on one machine never share a port, even while one's server is stopped."""

from __future__ import annotations

import socket

from runbook.sandbox import build


def test_a_port_claimed_by_a_live_sandbox_is_not_handed_out_again(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    first = build._free_ports(3, owner=a)
    # a's servers are all stopped (the ports are free to bind), yet b gets none of them
    second = build._free_ports(3, start=first[0], owner=b)
    assert not set(first) & set(second)
    build.release_ports(a)
    third = build._free_ports(1, start=first[0], owner=b)
    assert third == [first[0]]
    build.release_ports(b)


def test_a_stale_claim_is_taken_over_and_a_bound_port_skipped(tmp_path):
    gone, live = tmp_path / "gone", tmp_path / "live"
    gone.mkdir()
    live.mkdir()
    port = build._free_ports(1, owner=gone)[0]
    gone.rmdir()                                     # its sandbox was removed without `down`
    assert build._free_ports(1, start=port, owner=live) == [port]
    build.release_ports(live)
    with socket.socket() as s:                       # a port in use by anyone is never claimed
        s.bind(("127.0.0.1", 0))
        used = s.getsockname()[1]
        assert used not in build._free_ports(1, start=used, owner=live)
    build.release_ports(live)
