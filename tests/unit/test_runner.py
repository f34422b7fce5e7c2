"""The step runner with a small fake plan: resume, fallback (also of a step that failed half-way, and
one interrupted), reverts retried to their deadline, a journal that cannot be written, the point of no
return (refused, declined, crossed by a killed run), ``checkpoint()`` (the only way a step journals), the
typed run state (a journal of the old code loads and resumes) and ``run_plan`` (run, resume, refusal,
already done, dry run)."""

from __future__ import annotations

import pytest

from runbook.errors import NotPromoted, StepError
from runbook.journal import Journal
from runbook.steps import Runner, Step


class Ctx:
    def __init__(self) -> None:
        self.data: dict = {}
        self.world: dict[str, bool] = {}   # what is in place on the "source"
        self.calls: list[str] = []


def plan(fail_at: str | None = None, half_way: bool = False, revert_breaks: str | None = None,
         promote_refuses: bool = False, recheck_fails: bool = False) -> list[Step]:
    def act(name):
        def run(ctx):
            ctx.calls.append(name)
            ctx.world[name] = True        # applied ...
            if name == fail_at:
                if not half_way:
                    ctx.world[name] = False
                raise StepError(f"{name} broke")   # ... and then the proof failed
            if name == "promote" and promote_refuses:
                ctx.world[name] = False
                raise NotPromoted("the source moved after the final LSN")
            return {f"{name}_at": 1.0}
        return run

    def revert(name):
        def run(ctx):
            if name == revert_breaks:
                raise RuntimeError(f"cannot undo {name}")
            ctx.world[name] = False
            ctx.calls.append(f"revert {name}")
        return run

    def recheck(ctx):
        if recheck_fails:
            raise StepError("the fence no longer holds")

    return [Step("stop", "stop", act("stop"), revert=revert("stop"), revert_hint="scale the workers back"),
            Step("fence", "fence", act("fence"), revert=revert("fence"), recheck=recheck,
                 revert_hint="lift the fence by hand"),
            Step("flush", "flush", act("flush")),
            Step("promote", "promote", act("promote"), point_of_no_return=True),
            Step("switch", "switch", act("switch"))]


def runner(tmp_path, steps, journal=None) -> Runner:
    journal = journal or Journal.create(tmp_path, "fake")
    return Runner(journal, steps, confirm=lambda q: True, fallback_timeout=0.2)


def test_completes_and_resumes_without_repeating(tmp_path):
    ctx = Ctx()
    r = runner(tmp_path, plan())
    assert r.run(ctx) == "completed"
    assert ctx.calls == ["stop", "fence", "flush", "promote", "switch"]


def test_a_step_that_failed_half_way_is_reverted_too(tmp_path):
    ctx = Ctx()
    r = runner(tmp_path, plan(fail_at="fence", half_way=True))
    with pytest.raises(StepError, match="fell back"):
        r.run(ctx)
    assert ctx.world == {"stop": False, "fence": False}
    assert ctx.calls == ["stop", "fence", "revert fence", "revert stop"]
    assert r.journal.outcome()[0] == "fell_back"


def test_a_revert_that_never_succeeds_is_reported_as_such(tmp_path):
    ctx = Ctx()
    r = runner(tmp_path, plan(fail_at="flush", revert_breaks="fence"))
    with pytest.raises(StepError, match="FALLBACK FAILED") as info:
        r.run(ctx)
    outcome, reason = r.journal.outcome()
    assert outcome == "fallback_failed"
    assert "fence NOT reverted" in reason and "lift the fence by hand" in reason
    assert "lift the fence by hand" in str(info.value)
    assert ctx.world["stop"] is False   # the others were still reverted


def test_a_point_of_no_return_that_refuses_to_cross_falls_back(tmp_path):
    ctx = Ctx()
    r = runner(tmp_path, plan(promote_refuses=True))
    with pytest.raises(StepError, match="fell back"):
        r.run(ctx)
    assert r.journal.outcome()[0] == "fell_back"
    assert ctx.world == {"stop": False, "fence": False, "flush": True, "promote": False}
    assert not r.past_point_of_no_return()


def test_after_the_point_of_no_return_a_failure_stops_for_the_operator(tmp_path):
    ctx = Ctx()
    r = runner(tmp_path, plan(fail_at="switch"))
    with pytest.raises(StepError, match="no automatic fallback"):
        r.run(ctx)
    assert r.journal.outcome() is None and ctx.world["fence"] is True
    # fixed: the same run resumes after the failed step
    r2 = runner(tmp_path, plan(), journal=Journal.load(tmp_path, r.journal.run_id))
    ctx2 = Ctx()
    assert r2.run(ctx2) == "completed"
    assert ctx2.calls == ["switch"]


def test_on_resume_what_no_longer_holds_falls_back(tmp_path):
    ctx = Ctx()
    first = runner(tmp_path, plan())
    first.journal.record("stop", "start")
    first.journal.record("stop", "done")
    first.journal.record("fence", "start")
    first.journal.record("fence", "done")
    resumed = runner(tmp_path, plan(recheck_fails=True), journal=Journal.load(tmp_path, first.journal.run_id))
    with pytest.raises(StepError, match="no longer holds"):
        resumed.run(ctx)
    assert resumed.journal.outcome()[0] == "fell_back"
    assert ctx.calls == ["revert fence", "revert stop"]


class FullJournal(Journal):
    """A journal whose disk fills up after ``room`` more records."""

    room = 0

    def record(self, step, event, **data):
        if FullJournal.room <= 0:
            raise OSError(28, "No space left on device")
        FullJournal.room -= 1
        return super().record(step, event, **data)


def test_a_journal_that_cannot_be_written_still_falls_back_and_says_so(tmp_path):
    j = Journal.create(tmp_path, "fake")
    full = FullJournal(j.path, j.run_id, j.kind, list(j.events))
    FullJournal.room = 4       # stop and fence start/done, then the disk is full
    ctx = Ctx()
    r = runner(tmp_path, plan(), journal=full)
    with pytest.raises(StepError) as info:
        r.run(ctx)
    message = str(info.value)
    assert "fell back" in message and "No space left on device" in message
    assert ctx.calls == ["stop", "fence", "revert fence", "revert stop"]   # flush never acted
    assert ctx.world == {"stop": False, "fence": False}


def test_a_resume_must_belong_to_the_same_migration(tmp_path, monkeypatch):
    import time as _time

    from runbook.errors import ConfigError
    from runbook.failover import run as run_mod
    from runbook.settings import Settings

    mine = {"stack": "dev", "outputs_hash": "abc", "source_database": "db.example:5432/app"}
    monkeypatch.setattr(run_mod, "identity", lambda outputs, app: dict(mine))
    settings = Settings(state_dir=tmp_path, resume_max_age=3600)

    same = Journal.create(tmp_path, "failover-ec2", **mine)
    run_mod.check_belongs(same, None, settings, None)          # no error

    for key, other in (("stack", "prod"), ("outputs_hash", "def"), ("source_database", "other:5432/app")):
        j = Journal.create(tmp_path / key, "failover-ec2", **{**mine, key: other})
        with pytest.raises(ConfigError, match="belongs to another migration"):
            run_mod.check_belongs(j, None, settings, None)

    old = Journal.create(tmp_path / "old", "failover-ec2", **mine)
    old.events[0]["ts"] = _time.time() - 7200
    with pytest.raises(ConfigError, match="more than tern.resume_max_age"):
        run_mod.check_belongs(old, None, settings, None)


# -- reverts retried to their deadline (an injected clock: no real waiting) ------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def test_a_revert_that_fails_for_a_while_is_retried_until_it_succeeds(tmp_path):
    clock, attempts = Clock(), []

    def flaky_unfence(ctx):
        attempts.append(clock.now())
        if len(attempts) < 4:
            raise RuntimeError("the source is restarting")
        ctx.world["fence"] = False

    steps = plan(fail_at="flush")
    steps[1].revert = flaky_unfence
    r = Runner(Journal.create(tmp_path, "fake"), steps, confirm=lambda q: True, fallback_timeout=10.0,
               sleep=clock.sleep, clock=clock.now)
    ctx = Ctx()
    with pytest.raises(StepError, match="fell back"):
        r.run(ctx)
    assert len(attempts) == 4 and clock.slept == [0.5, 0.5, 0.5]
    assert r.journal.outcome()[0] == "fell_back"
    assert ctx.world == {"stop": False, "fence": False, "flush": False}
    assert [e["step"] for e in r.journal.events if e["event"] == "reverted"] == ["fence", "stop"]


def test_a_revert_is_given_up_at_its_deadline_and_the_others_still_run(tmp_path):
    clock = Clock()
    r = Runner(Journal.create(tmp_path, "fake"), plan(fail_at="flush", revert_breaks="fence"),
               confirm=lambda q: True, fallback_timeout=3.0, sleep=clock.sleep, clock=clock.now)
    ctx = Ctx()
    with pytest.raises(StepError, match="FALLBACK FAILED"):
        r.run(ctx)
    assert 3.0 < clock.t <= 3.5                      # retried every 0.5 s until the deadline, not longer
    assert ctx.world["stop"] is False
    failed = [e for e in r.journal.events if e["event"] == "revert_failed"]
    assert [e["step"] for e in failed] == ["fence"] and "cannot undo fence" in failed[0]["detail"]


def test_an_interrupted_fallback_resumes_without_reverting_twice(tmp_path):
    first = runner(tmp_path, plan(fail_at="flush", revert_breaks="stop"))
    with pytest.raises(StepError):
        first.run(Ctx())
    # as if the process died during the fallback: the journal says started, fence reverted, not finished
    j = Journal.load(tmp_path, first.journal.run_id)
    j.events = [e for e in j.events if not (e["step"] in ("run", "stop") and e["event"] in
                                            ("finished", "revert_failed"))]
    ctx = Ctx()
    with pytest.raises(StepError, match="fell back"):
        runner(tmp_path, plan(), journal=j).run(ctx)
    assert ctx.calls == ["revert stop"]        # the fence was reverted already; only the rest runs


# -- the point of no return ---------------------------------------------------------------------------
def test_the_operator_declining_the_point_of_no_return_falls_back(tmp_path):
    asked: list[str] = []
    r = Runner(Journal.create(tmp_path, "fake"), plan(), confirm=lambda q: asked.append(q) or False,
               fallback_timeout=0.2)
    ctx = Ctx()
    with pytest.raises(StepError, match="declined the point of no return"):
        r.run(ctx)
    assert asked == ["promote: this is a point of no return. Proceed?"]
    assert "promote" not in ctx.calls and ctx.world["fence"] is False
    assert r.journal.outcome()[0] == "fell_back" and not r.past_point_of_no_return()


def test_a_run_killed_inside_the_point_of_no_return_never_falls_back_and_is_not_asked_again(tmp_path):
    def die(ctx):
        ctx.calls.append("promote")
        raise KeyboardInterrupt        # the process died inside the act: not journaled as failed

    steps = plan()
    steps[3].act = die
    first = runner(tmp_path, steps)
    with pytest.raises(KeyboardInterrupt):
        first.run(Ctx())
    assert first.past_point_of_no_return()     # started, not refused: it may have acted
    # resumed: promote fails now - after the point of no return that stops for the operator
    asked: list[str] = []
    steps = plan(fail_at="promote")
    resumed = Runner(Journal.load(tmp_path, first.journal.run_id), steps,
                     confirm=lambda q: asked.append(q) or True, fallback_timeout=0.2)
    ctx = Ctx()
    with pytest.raises(StepError, match="no automatic fallback"):
        resumed.run(ctx)
    assert asked == []                        # confirmed once, by the run that started it
    assert not any(c.startswith("revert") for c in ctx.calls)
    assert resumed.journal.outcome() is None


# -- checkpoint(): only the runner journals ------------------------------------------------------
def test_checkpoint_journals_progress_of_the_running_step_and_updates_the_state(tmp_path):
    def flush(ctx):
        ctx.runner.checkpoint(ctx, final_lsn="0/5000000")
        assert ctx.data["final_lsn"] == "0/5000000"    # applied at once
        return {"catchup_seconds": 0.1}

    steps = plan()
    steps[2].act = flush
    r = runner(tmp_path, steps)
    ctx = Ctx()
    assert r.run(ctx) == "completed"
    progress = [e for e in r.journal.events if e["event"] == "progress"]
    assert [(e["step"], e["context"]) for e in progress] == [("flush", {"final_lsn": "0/5000000"})]
    assert r.journal.context()["final_lsn"] == "0/5000000" and ctx.data["catchup_seconds"] == 0.1
    assert r.current is None


def test_a_checkpointed_value_survives_a_crash_and_the_resumed_step_reuses_it(tmp_path):
    from runbook.failover.state import RunState

    taken: list[str] = []

    def flush(ctx):
        if ctx.data.final_lsn is None:                  # a resumed run waits for the same LSN
            taken.append(f"0/{len(taken) + 5}000000")
            ctx.runner.checkpoint(ctx, final_lsn=taken[-1])
        if "resumed" not in ctx.calls:
            raise KeyboardInterrupt                     # killed after the checkpoint, before done
        return {"detail": f"caught up to {ctx.data.final_lsn}"}

    steps = plan()
    steps[2].act = flush
    first = runner(tmp_path, steps)
    ctx = Ctx()
    ctx.data = RunState()
    with pytest.raises(KeyboardInterrupt):
        first.run(ctx)
    journal = Journal.load(tmp_path, first.journal.run_id)
    ctx2 = Ctx()
    ctx2.data = RunState.from_journal(journal)
    ctx2.calls.append("resumed")
    assert runner(tmp_path, steps, journal=journal).run(ctx2) == "completed"
    assert taken == ["0/5000000"]                       # one final LSN, taken once
    assert next(s for s in journal.steps() if s.name == "flush").detail == "caught up to 0/5000000"


def test_checkpoint_in_a_revert_is_journaled_as_the_reverted_steps(tmp_path):
    def unfence(ctx):
        ctx.runner.checkpoint(ctx, consistent_point_hold=None)
        ctx.world["fence"] = False

    steps = plan(fail_at="flush")
    steps[1].revert = unfence
    r = runner(tmp_path, steps)
    with pytest.raises(StepError, match="fell back"):
        r.run(Ctx())
    progress = [e for e in r.journal.events if e["event"] == "progress"]
    assert [(e["step"], e["context"]) for e in progress] == [("fence", {"consistent_point_hold": None})]


def test_checkpoint_that_cannot_be_written_fails_the_step_and_falls_back_saying_so(tmp_path):
    def flush(ctx):
        ctx.runner.checkpoint(ctx, final_lsn="0/5000000")
        ctx.calls.append("flush acted past its checkpoint")

    steps = plan()
    steps[2].act = flush
    j = Journal.create(tmp_path, "fake")
    full = FullJournal(j.path, j.run_id, j.kind, list(j.events))
    FullJournal.room = 5       # stop and fence start/done, flush start; then the disk is full
    ctx = Ctx()
    with pytest.raises(StepError) as info:
        runner(tmp_path, steps, journal=full).run(ctx)
    assert "fell back" in str(info.value) and "No space left on device" in str(info.value)
    assert "flush acted past its checkpoint" not in ctx.calls and "final_lsn" not in ctx.data
    assert ctx.world == {"stop": False, "fence": False}


def test_checkpoint_outside_a_run_is_refused():
    from runbook.failover.context import Context

    ctx = Context(outputs=None, settings=None, app=None, journal=None)
    with pytest.raises(RuntimeError, match="outside a run"):
        ctx.checkpoint(final_lsn="0/1")
    r = Runner(Journal(None, "x", "fake"), plan(), confirm=lambda q: True)
    with pytest.raises(RuntimeError, match="outside a step"):
        r.checkpoint(Ctx(), final_lsn="0/1")


def test_no_step_writes_the_journal_behind_the_runners_back():
    """Only the runner (and the journal itself) call Journal.record; steps use ctx.checkpoint().

    rehearsal_stack.py is a runner too: its teardown after a failed phase is its fallback, recorded
    outside any step as the Runner records its own."""
    import pathlib
    import re

    root = pathlib.Path(__file__).parents[2] / "runbook"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name not in ("steps.py", "journal.py", "rehearsal_stack.py") and re.search(r"\.record\(", p.read_text())]
    assert offenders == []


# -- the typed run state; a journal written by the old code still loads and resumes -------------------
OLD_JOURNAL = [
    {"ts": 1700000000.0, "step": "run", "event": "created", "kind": "failover-ec2",
     "context": {"requested_candidate": None, "stack": "dev", "outputs_hash": "abc",
                 "source_database": "127.0.0.1:5432/app"}},
    {"ts": 1700000001.0, "step": "preflight", "event": "start"},
    {"ts": 1700000002.0, "step": "preflight", "event": "done", "detail": "candidate ec2-a",
     "context": {"candidate": "ec2-a", "others": ["ec2-b"], "source_timeline": 1,
                 "source_endpoint": "127.0.0.1:5432", "source_connection_limit": -1,
                 "formation": {"web": 1, "worker": 1}, "a_key_from_another_version": {"x": 1}}},
    {"ts": 1700000003.0, "step": "maintenance_on", "event": "done", "context": {"maintenance_at": 1700000003.0}},
    {"ts": 1700000004.0, "step": "fence", "event": "done", "context": {"fenced_at": 1700000004.0}},
    {"ts": 1700000005.0, "step": "flush", "event": "start"},
    {"ts": 1700000006.0, "step": "flush", "event": "progress", "context": {"final_lsn": "0/5000028"}},
    {"ts": 1700000007.0, "step": "flush", "event": "progress", "context": {"final_next_xid": "745"}},
]


def write_old_journal(tmp_path, kind="failover-ec2", run_id="failover-ec2-20231114T221320-42"):
    import json

    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "journal.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in OLD_JOURNAL)
                                          + '{"ts": 1700000008.0, "step": "flu')   # a line torn by the kill
    (tmp_path / "runs" / f"current-{kind}").write_text(run_id)
    return run_id


def test_a_journal_written_by_the_old_code_loads_into_the_typed_state(tmp_path):
    from runbook.failover.context import Context
    from runbook.failover.state import RunState

    write_old_journal(tmp_path)
    journal = Journal.current(tmp_path, "failover-ec2")
    state = RunState.from_journal(journal)
    assert state.candidate == "ec2-a" and state.others == ["ec2-b"] and state.source_timeline == 1
    assert state.final_lsn == "0/5000028" and state.final_next_xid == "745"   # checkpointed mid-step
    assert state.maintenance_at == 1700000003.0 and state.requested_candidate is None
    assert state.new_leader is None and state.sealed is None
    assert state.extra == {"a_key_from_another_version": {"x": 1}}        # kept, not dropped
    assert {k: v for k, v in journal.context().items() if v is not None} == dict(state)
    # the mapping view the plans still use: absent until known
    assert state["candidate"] == "ec2-a" and "new_leader" not in state and state.get("seal_next_xid") is None
    with pytest.raises(KeyError):
        state["new_leader"]
    # a Context built from the journal's context holds the typed state
    ctx = Context(outputs=None, settings=None, app=None, journal=journal, data=journal.context())
    assert isinstance(ctx.data, RunState) and ctx.data.final_lsn == "0/5000028"


def test_an_in_flight_journal_of_the_old_code_resumes_where_it_stopped(tmp_path):
    from runbook.failover.state import RunState

    run_id = write_old_journal(tmp_path)
    seen: dict = {}

    def step(name):
        def act(ctx):
            ctx.calls.append(name)
            if name == "flush":
                seen.update(final_lsn=ctx.data.final_lsn, candidate=ctx.data["candidate"])
            return {f"{name}_at": 2.0}
        return act

    steps = [Step(n, n, step(n)) for n in ("preflight", "maintenance_on", "fence", "flush", "verify")]
    journal = Journal.load(tmp_path, run_id)
    ctx = Ctx()
    ctx.data = RunState.from_journal(journal)
    assert runner(tmp_path, steps, journal=journal).run(ctx) == "completed"
    assert ctx.calls == ["flush", "verify"]
    assert seen == {"final_lsn": "0/5000028", "candidate": "ec2-a"}
    assert RunState.from_journal(Journal.load(tmp_path, run_id)).extra["verify_at"] == 2.0


def test_run_state_mapping_view():
    from runbook.failover.state import FIELDS, RunState

    s = RunState(candidate="ec2-a")
    s.update({"final_lsn": "0/1", "sealed": True, "something_new": 1})
    assert s.final_lsn == "0/1" and s.sealed is True and s.extra == {"something_new": 1}
    s["seal_next_xid"] = None                      # None: as if absent
    assert "seal_next_xid" not in s and s.setdefault("seal_next_xid", "9") == "9" and s.seal_next_xid == "9"
    assert s.pop("something_new") == 1 and s.pop("missing", None) is None and s.extra == {}
    del s["sealed"]
    assert s.sealed is None
    assert dict(s) == {"candidate": "ec2-a", "final_lsn": "0/1", "seal_next_xid": "9"} == s.to_context()
    assert RunState.from_context(s.to_context()) == s
    assert "extra" not in FIELDS and {"candidate", "final_lsn", "new_leader", "verification_full"} <= set(FIELDS)


# -- run_plan: the run / resume / dry run / report written once for every plan ----------------------
class PlanCtx(Ctx):
    def __init__(self, journal) -> None:
        super().__init__()
        from runbook.failover.state import RunState

        self.journal = journal
        self.data = RunState.from_journal(journal)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def fake_spec(tmp_path, monkeypatch, steps=None, **kw):
    from types import SimpleNamespace

    from runbook.failover import run as run_mod

    monkeypatch.setattr(run_mod, "identity", lambda outputs, app: {"stack": "dev", "outputs_hash": "abc",
                                                                    "source_database": "db:5432/app"})
    made: list[PlanCtx] = []

    def context(journal):
        made.append(PlanCtx(journal))
        return made[-1]

    spec = run_mod.PlanRun("fake-plan", lambda mode: steps if steps is not None else plan(), context,
                           dry_run=lambda ctx, rows, in_progress: {"dry_run": True, "rows": rows,
                                                                   "in_progress": in_progress}, **kw)
    outputs = SimpleNamespace(app=SimpleNamespace(kind="heroku"))
    return run_mod, spec, outputs, made


def test_run_plan_runs_saves_the_report_and_resumes_an_unfinished_run(tmp_path, monkeypatch):
    from runbook.settings import Settings

    run_mod, spec, outputs, made = fake_spec(tmp_path, monkeypatch, steps=plan(fail_at="switch"))
    settings = Settings(state_dir=tmp_path)
    said: list[str] = []
    with pytest.raises(StepError, match="no automatic fallback") as info:
        run_mod.run_plan(spec, outputs, settings, None, dry_run=False, confirm=lambda q: True,
                         progress=said.append, hooks=None)
    report = info.value.context["report"]
    assert report["outcome"] == "failed" and report["kind"] == "fake-plan" and made[-1].closed
    run_id = report["run_id"]
    assert (tmp_path / "runs" / run_id / "report.json").exists()
    # fixed: the same command resumes the run (the switch only) and completes it
    spec.plan = plan
    report = run_mod.run_plan(spec, outputs, settings, None, dry_run=False, confirm=lambda q: True,
                              progress=said.append, hooks=None)
    assert report["run_id"] == run_id and report["outcome"] == "completed"
    assert f"resuming run {run_id}" in said and made[-1].calls == ["switch"]


def test_run_plan_refuses_when_the_preflight_fails_and_nothing_else_started(tmp_path, monkeypatch):
    from runbook.errors import PreflightError, Refused
    from runbook.journal import Journal as J
    from runbook.settings import Settings

    def preflight(ctx):
        raise PreflightError("replication is not running")

    steps = [Step("preflight", "preflight", preflight)] + plan()
    run_mod, spec, outputs, _ = fake_spec(tmp_path, monkeypatch, steps=steps, refuses=True)
    with pytest.raises(Refused, match="fake-plan refused, nothing changed: preflight: replication is not running") as info:
        run_mod.run_plan(spec, outputs, Settings(state_dir=tmp_path), None, dry_run=False,
                         confirm=lambda q: True, progress=None, hooks=None)
    assert info.value.context["report"]["outcome"] == "refused"   # the CLI exits 2 for a Refused
    assert J.current(tmp_path, "fake-plan") is None          # finished: the next run starts afresh


def test_run_plan_reports_a_completed_run_still_in_effect_instead_of_redoing_it(tmp_path, monkeypatch):
    from runbook.settings import Settings

    done = Journal.create(tmp_path, "fake-plan")
    done.record("promote", "done", context={"new_leader": "ec2-a"})
    done.finish("completed")
    run_mod, spec, outputs, made = fake_spec(tmp_path, monkeypatch, already_done=lambda: done,
                                             already_done_means="the app uses its new leader")
    said: list[str] = []
    report = run_mod.run_plan(spec, outputs, Settings(state_dir=tmp_path), None, dry_run=False,
                              confirm=lambda q: True, progress=said.append, hooks=None)
    assert report["already_done"] is True and report["run_id"] == done.run_id and report["new_leader"] == "ec2-a"
    assert said == [f"already done: run {done.run_id} completed and the app uses its new leader"]
    assert made == [] and Journal.current(tmp_path, "fake-plan") is None


def test_run_plan_dry_run_changes_nothing_and_refuses_a_run_of_another_migration(tmp_path, monkeypatch):
    from runbook.errors import ConfigError
    from runbook.settings import Settings

    run_mod, spec, outputs, made = fake_spec(tmp_path, monkeypatch)
    settings = Settings(state_dir=tmp_path)
    result = run_mod.run_plan(spec, outputs, settings, None, dry_run=True, confirm=lambda q: False,
                              progress=None, hooks=None)
    assert result["in_progress"] is False and [r["step"] for r in result["rows"]] == [s.name for s in plan()]
    assert made[-1].calls == [] and made[-1].closed and not (tmp_path / "runs").exists()
    other = Journal.create(tmp_path, "fake-plan", stack="prod", outputs_hash="abc", source_database="db:5432/app")
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=f"run {other.run_id} belongs to another migration"):
            run_mod.run_plan(spec, outputs, settings, None, dry_run=dry_run, confirm=lambda q: True,
                             progress=None, hooks=None)
