"""The step runner with a small fake plan: resume, fallback (also of a step that failed half-way),
reverts that never succeed, a journal that cannot be written, the point of no return."""

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
