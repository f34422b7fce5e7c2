"""rollback-aurora's pure parts: which failover-aurora it undoes, the role fence's statements."""

from __future__ import annotations

import pytest

from runbook.errors import PreflightError
from runbook.failover import fence
from runbook.failover.rollback import STEP_NAMES, last_failover, plan
from runbook.journal import Journal


def test_refused_without_a_completed_failover_aurora(tmp_path):
    with pytest.raises(PreflightError, match="failover-aurora has not run"):
        last_failover(tmp_path)
    running = Journal.create(tmp_path, "failover-aurora")
    with pytest.raises(PreflightError, match=f"{running.run_id} is unfinished"):
        last_failover(tmp_path)
    running.finish("fell_back", "catch_up: timed out")
    with pytest.raises(PreflightError, match="ended fell_back, not completed"):
        last_failover(tmp_path)


def test_the_last_completed_failover_aurora_is_the_one_undone(tmp_path):
    done = Journal.create(tmp_path, "failover-aurora")
    done.record("preflight", "done", context={"source_connection_limit": -1})
    done.finish("completed")
    assert last_failover(tmp_path).run_id == done.run_id


def test_the_plan_has_one_point_of_no_return_and_falls_back_before_it():
    steps = plan()
    crossing = [s.name for s in steps if s.point_of_no_return]
    assert crossing == ["switch_back"]
    before = STEP_NAMES[:STEP_NAMES.index("switch_back")]
    # what changes the world before the point of no return can be undone
    assert {s.name for s in steps if s.name in before and s.revert} == {"hold_leader", "stop_workers",
                                                                          "maintenance_on", "fence"}


def test_the_role_fence_and_its_lift():
    fenced = [st.as_string(None) for st in fence.role_fence_statements('app "x"')]
    assert fenced == ['ALTER ROLE "app ""x""" CONNECTION LIMIT 0',
                      'ALTER ROLE "app ""x""" SET default_transaction_read_only = on']
    lifted = [" ".join(st.as_string(None).split()) for st in fence.role_lift_statements("app", -1)]
    assert lifted == ['ALTER ROLE "app" CONNECTION LIMIT -1', 'ALTER ROLE "app" RESET default_transaction_read_only']
