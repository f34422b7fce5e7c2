"""invoke drill without PostgreSQL: --list, bad input, and the pure parts of the drills (where a fault
landed, what each scenario expects there, the ledger's post-fence check, the summary)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from runbook.drills import BY_NAME, SCENARIOS, names
from runbook.drills.run import journal_failed_at, post_fence_acks, summarise
from runbook.drills.scenarios import COMPLETED, FELL_BACK, STEPS, STOPPED, phase
from runbook.workload.ledger import Entry
from tests.unit.test_cli_input import assert_bad_input, cli


def test_list_shows_every_scenario_with_its_hops_and_expected_outcome(tmp_path):
    env = {"INVOKE_TERN_STATE_DIR": str(tmp_path / "state")}
    res = cli("drill", "--list", env=env)
    assert res.returncode == 0, res.stderr
    for s in SCENARIOS:
        assert s.name in res.stdout
    res = cli("drill", "--list", "--json", env=env)
    assert res.returncode == 0, res.stderr
    listed = json.loads(res.stdout)
    assert [s["name"] for s in listed] == names()
    assert all(s["hops"] and s["expected"] and s["description"] for s in listed)
    assert {"partition-replica-source", "partition-tern-source", "journal-disk-full", "runbook-killed",
            "slot-lost", "aurora-restart-catchup", "rogue-client"} <= set(names())


@pytest.mark.parametrize("args, needle", [
    (["drill", "--scenario", "meteor-strike"], "unknown scenario 'meteor-strike'; choose from: candidate-crash"),
    (["drill"], "--scenario is required"),
    (["drill", "--scenario", "slot-lost", "--hop", "1"], "scenario slot-lost has no hop 1"),
    (["drill", "--scenario", "traffic-surge", "--hop", "3"], "--hop must be between 1 and 2"),
    (["drill", "--scenario", "traffic-surge", "--runs", "0"], "--runs must be between 1 and 1000"),
    (["drill", "--scenario", "traffic-surge", "--seed", "-1"], "--seed must be between 0"),
    (["drill", "--scenario", "traffic-surge", "--seed", "x"], "--seed must be an integer"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    res = cli(*args, env={"INVOKE_TERN_STATE_DIR": str(tmp_path / "state"),
                          "INVOKE_TERN_SANDBOX_DIR": str(tmp_path / "sandbox")})
    assert_bad_input(res, needle)
    assert not (tmp_path / "sandbox").exists()


def test_the_unknown_scenario_message_names_every_valid_one(tmp_path):
    res = cli("drill", "--scenario", "nope", env={"INVOKE_TERN_STATE_DIR": str(tmp_path / "state")})
    assert all(n in res.stderr for n in names())


def test_phase_of_each_step_around_the_point_of_no_return():
    assert [phase(1, s) for s in ("fence", "promote", "repoint")] == ["before", "at", "after"]
    assert [phase(2, s) for s in ("catch_up", "switch_over", "smoke_test")] == ["before", "at", "after"]
    assert phase(1, None) == "after"


def drill(name: str, hop: int, landed, **params):
    return SimpleNamespace(scenario=BY_NAME[name], hop=hop, landed=landed, params=params, bit=None)


def test_expectations_follow_where_the_fault_landed():
    cc = BY_NAME["candidate-crash-catchup"].expect
    assert cc(drill("candidate-crash-catchup", 1, "detach_others", crash="postgres")) == {COMPLETED}
    assert cc(drill("candidate-crash-catchup", 1, "detach_others", crash="host")) == {STOPPED}
    assert cc(drill("candidate-crash-catchup", 1, "flush", crash="postgres")) == {COMPLETED, FELL_BACK}
    assert cc(drill("candidate-crash-catchup", 1, "verify", crash="postgres")) == {FELL_BACK}
    assert cc(drill("candidate-crash-catchup", 2, "catch_up")) == {FELL_BACK}
    after = BY_NAME["candidate-crash-after-promotion"].expect
    assert after(drill("candidate-crash-after-promotion", 1, "start_app")) == {STOPPED}
    assert after(drill("candidate-crash-after-promotion", 1, None)) == {COMPLETED}   # the run had ended
    src = BY_NAME["source-unreachable-fence"].expect
    assert src(drill("source-unreachable-fence", 1, "fence")) == {FELL_BACK}
    part = BY_NAME["partition-tern-source"].expect
    assert part(drill("partition-tern-source", 1, "sample")) == {COMPLETED, FELL_BACK}
    assert FELL_BACK not in part(drill("partition-tern-source", 1, "verify_full"))
    disk = BY_NAME["journal-disk-full"].expect
    d = drill("journal-disk-full", 1, "fence")
    for bit, expected in ((("detach_others", "none"), {FELL_BACK}), (("promote", "none"), {FELL_BACK}),
                          (("promote", "start"), {FELL_BACK}), (("promote", "progress"), {STOPPED}),
                          (("switch", "none"), {STOPPED})):
        d.bit = bit
        assert disk(d) == expected, bit


def test_where_the_journal_first_failed():
    ev = lambda step, event: {"step": step, "event": event}  # noqa: E731
    steps = STEPS[1]
    assert journal_failed_at([ev("run", "created")], steps) == ("preflight", "none")
    assert journal_failed_at([ev("run", "created"), ev("fence", "start"), ev("fence", "done")], steps) == \
        ("detach_others", "none")
    assert journal_failed_at([ev("promote", "start"), ev("promote", "progress")], steps) == ("promote", "progress")


def entry(ev, ts, key, endpoint="127.0.0.1:5432", began=None, dyno="web.1"):
    return Entry(ev, ts, dyno, "orders", key, endpoint, began)


def test_post_fence_writes_are_transactions_begun_on_the_old_database_while_the_fence_held():
    old = ("127.0.0.1", 5432)
    entries = [entry("intent", 10.0, "before", began=9.0), entry("ack", 10.1, "before"),          # before the fence
               entry("intent", 20.0, "leak", began=19.0), entry("ack", 20.1, "leak"),             # through it
               entry("intent", 20.0, "new", "127.0.0.1:6000", began=19.5),
               entry("ack", 20.2, "new", "127.0.0.1:6000"),                                       # the new leader
               entry("intent", 31.0, "back", began=30.5), entry("ack", 31.1, "back")]             # after the revert
    assert post_fence_acks(entries, old, since=15.0, until=30.0) == ["leak"]
    assert post_fence_acks(entries, old, since=15.0, until=None) == ["leak", "back"]
    assert post_fence_acks(entries, old, since=None, until=None) == []


def test_summary_counts_first_outcomes_and_sums_the_checks():
    runs = [{"scenario": "a", "hop": 1, "first_outcome": "completed", "outcome": "completed", "ok": True, "lost": 0,
             "duplicates": 0, "post_fence": 0, "seconds": 10.0},
            {"scenario": "a", "hop": 1, "first_outcome": "stopped", "outcome": "completed", "ok": True, "lost": 0,
             "duplicates": 0, "post_fence": 0, "seconds": 20.0},
            {"scenario": "a", "hop": 1, "first_outcome": "killed", "outcome": "completed", "ok": False, "lost": 2,
             "duplicates": 1, "post_fence": 3, "seconds": 30.0}]
    (row,) = summarise(runs)
    assert (row["runs"], row["completed"], row["stopped"], row["fell_back"], row["failed"]) == (3, 2, 1, 0, 1)
    assert (row["lost"], row["duplicates"], row["post_fence"], row["median_seconds"]) == (2, 1, 3, 20.0)


def test_a_seed_replays_the_same_moment():
    from runbook.drills.run import Drill

    s = BY_NAME["partition-tern-source"]
    a, b = Drill(s, 1, 42, lambda m: None), Drill(s, 1, 42, lambda m: None)
    assert [a.rng.random() for _ in range(5)] == [b.rng.random() for _ in range(5)]
    assert Drill(s, 1, 43, lambda m: None).rng.random() != Drill(s, 1, 42, lambda m: None).rng.random()
    assert Drill(BY_NAME["slow-archive"], 1, 42, lambda m: None).rng.random() != \
        random.Random(42).random()   # one stream per scenario, not the bare seed


def test_every_scenario_has_points_for_each_of_its_hops_on_real_steps():
    for s in SCENARIOS:
        for hop in s.hops:
            assert s.points[hop], s.name
            if s.kills_runbook:
                continue
            for point in s.points[hop]:
                when, _, step = point.partition(":")
                assert when in ("before", "after") and step in STEPS[hop], (s.name, point)


@pytest.mark.parametrize("mountable", [True, False])
def test_a_full_disk_makes_the_next_journal_record_fail_then_frees_it(tmp_path, monkeypatch, mountable):
    """On its own small tmpfs when this process may mount one (root with CAP_SYS_ADMIN), else the journal
    linked to /dev/full: either way the next record fails with ENOSPC and nothing recorded is lost."""
    import errno
    import os

    from runbook.drills.faults import FullDisk
    from runbook.journal import Journal

    state = tmp_path / "state"
    j = Journal.create(state, "failover-ec2")
    j.record("fence", "done")
    if not mountable:
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    disk = FullDisk(state)
    how = disk.mount()
    if mountable and not disk.mounted:
        pytest.skip(f"this process may not mount a tmpfs ({how})")
    try:
        assert ("tmpfs" in how) == mountable
        disk.fill(j.path, pad=True)
        with pytest.raises(OSError) as exc:
            j.record("detach_others", "start")
        assert exc.value.errno == errno.ENOSPC
        disk.free()
        j.record("detach_others", "start")
    finally:
        disk.unmount()
    assert [(e["step"], e["event"]) for e in Journal.load(state, j.run_id).events] == \
        [("run", "created"), ("fence", "done"), ("detach_others", "start")]
