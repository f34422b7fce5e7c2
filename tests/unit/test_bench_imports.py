"""The hop-2 benchmarks import and parse their arguments (no sandbox, no pgcopydb needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failover_aurora_arguments_and_summary():
    m = bench("failover_aurora")
    a = m.parse_args([])
    assert (a.runs, a.rate, a.scale, a.json) == (5, 200, 1, False)
    assert m.parse_args(["--runs", "1", "--json"]).json is True
    with pytest.raises(SystemExit):
        m.parse_args(["--runs", "0"])
    ok = {"outcome": "completed", "window": 1.2, "hop1_outcome": "completed", "hop1_window": 1.5, "lost": 0}
    s = m.summarise([ok, dict(ok, window=1.8)])
    assert s["hop2_median"] == pytest.approx(1.5) and s["hop2_max"] == 1.8 and s["goal_met"] is True
    assert m.summarise([ok, dict(ok, lost=1)])["goal_met"] is False
    assert m.summarise([ok, dict(ok, outcome="fallback", window=None)])["goal_met"] is False


def test_initial_sync_arguments_and_scale():
    m = bench("initial_sync")
    a = m.parse_args([])
    assert (a.size_gb, a.scale, a.table_jobs, a.index_jobs) == (1.0, None, None, m.INDEX_JOBS)
    assert 140 <= m.scale_for(1.0) <= 160 and m.scale_for(0.001) == 1
    with pytest.raises(SystemExit):
        m.parse_args(["--size-gb", "0"])
    summary = m.pgcopydb_summary("12:00:00 1 INFO done\n        Step   Connection    Duration   Concurrency\n"
                                 "  ---  ---\n  Total Wall Clock Duration   both   7s624   2 + 3\n")
    assert summary[0].strip().startswith("Step") and "Total Wall Clock" in summary[-1]


def test_switch_bench_arguments_and_figures():
    m = bench("switch")
    for bad in (["--runs", "0"], ["--modes", "dns"], ["--boot", "-1"], ["--rate", "0"]):
        with pytest.raises(SystemExit) as exc:
            m.main(bad)
        assert exc.value.code == 2
    report = {"outcome": "completed", "write_unavailability": {"seconds": 1.2},
              "database_unavailability": {"seconds": 0.8}, "longest_held_query_seconds": 1.1, "client_errors": 0,
              "missing_on_target": 0}
    assert m.figures(report) == {"outcome": "completed", "app": 1.2, "database": 0.8, "held": 1.1, "errors": 0,
                                 "missing": 0}


def test_drills_bench_arguments_plan_and_table():
    m = bench("drills")
    a = m.parse_args([])
    assert (a.runs, a.hops, a.seed) == (5, [1, 2], 1000) and "slot-lost" in a.scenarios
    for bad in (["--runs", "0"], ["--hops", "3"], ["--scenarios", "nope"], ["--hops", "x"]):
        with pytest.raises(SystemExit):
            m.parse_args(bad)
    # hop-2-only scenarios are not planned for hop 1, and hop 1 comes first
    assert m.plan(["slot-lost", "traffic-surge"], [1, 2]) == [("traffic-surge", 1), ("slot-lost", 2),
                                                              ("traffic-surge", 2)]
    row = {"scenario": "traffic-surge", "hop": 1, "runs": 5, "completed": 5, "fell_back": 0, "stopped": 0, "lost": 0,
           "duplicates": 0, "post_fence": 0, "failed": 0, "median_seconds": 9.5, "max_seconds": 12.0}
    text = m.table([row])
    assert "post-fence" in text.splitlines()[0] and "traffic-surge" in text.splitlines()[1]
