"""Run (or resume, or dry-run) a failover plan with its journal, then write its report.

:func:`run_plan` does what every plan's entry point does - the dry run, the lock, the resume of an
unfinished run (that must belong to this migration), a completed run reported instead of redone, the
report saved, the error carrying it - once. :func:`failover_ec2`, :func:`failover_aurora` and
:func:`rollback_aurora` say only what differs: the plan, its context, what a dry run shows, when a
run is already done and whether a failed preflight is a refusal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import measure
from .. import pooler as pooler_mod
from .. import report as report_mod
from ..adapters import AppControl, app_for
from ..contract import Outputs
from ..errors import ConfigError, Refused, RunbookError, StepError
from ..journal import Journal, RunLock
from ..settings import Settings
from ..steps import Runner, Step
from . import ec2, pooler_switch
from .context import Context
from .state import RunState


@dataclass
class PlanRun:
    """What differs between the plans :func:`run_plan` runs."""

    kind: str
    plan: Callable[[str], list[Step]]          # the steps for a switch mode (pooler | url)
    context: Callable[[Journal], Context]      # the run's context over its journal (a dry run's too)
    # what a dry run returns, from its context, the plan's rows and whether a run is in progress
    dry_run: Callable[[Context, list[dict[str, Any]], bool], dict[str, Any]]
    created: dict[str, Any] = field(default_factory=dict)   # recorded in a new run's journal
    on_resume: Callable[[Journal], None] | None = None        # raises when the arguments contradict the run
    already_done: Callable[[], Journal | None] | None = None  # a completed run still in effect: reported again
    already_done_means: str = ""               # "... completed and <this>"
    refuses: bool = False                      # a failed preflight changed nothing: Refused (exit 2)


def run_plan(spec: PlanRun, outputs: Outputs, settings: Settings, app: AppControl, *, dry_run: bool,
             confirm: Callable[[str], bool], progress: Callable[[str], None] | None,
             hooks: dict[str, Callable[[Any], None]] | None) -> dict[str, Any]:
    """Run ``spec``'s plan (or resume its unfinished run, or dry-run it) and return its report.

    A run that failed or fell back raises its StepError with the report in ``context["report"]``;
    with ``spec.refuses``, a preflight that failed before anything else started raises Refused."""
    state_dir = Path(settings.state_dir)
    say = progress or (lambda m: None)

    def steps(journal: Journal | None) -> list[Step]:
        # a run keeps the switch mode it was created with
        mode = (RunState.from_journal(journal).switch_mode if journal is not None else None)
        return spec.plan(mode or spec.created.get("switch_mode") or "url")

    if dry_run:
        journal = resumable(spec, state_dir, outputs, settings, app)
        ctx = spec.context(journal or Journal(Path("/dev/null"), "dry-run", spec.kind))
        try:
            rows = [{"step": s.name, "title": s.title, "state": state}
                    for s, state in Runner(ctx.journal, steps(journal), confirm=confirm).plan(ctx)]
            return spec.dry_run(ctx, rows, journal is not None)
        finally:
            ctx.close()
    with RunLock(state_dir, spec.kind):
        journal = resumable(spec, state_dir, outputs, settings, app)
        if journal is not None:
            say(f"resuming run {journal.run_id}")
        else:
            finished = spec.already_done() if spec.already_done else None
            if finished is not None:
                say(f"already done: run {finished.run_id} completed and {spec.already_done_means}")
                return dict(report_mod.build(finished, outputs), already_done=True)
            journal = Journal.create(state_dir, spec.kind, **spec.created, **identity(outputs, app))
        ctx = spec.context(journal)
        runner = Runner(journal, steps(journal), confirm=confirm, hooks=hooks or {}, progress=say)
        error: StepError | None = None
        try:
            runner.run(ctx)
        except StepError as exc:
            error = exc
            why = refused_at_preflight(journal) if spec.refuses else None
            if why is not None:   # nothing acted: a refusal (exit 2), not a fallback
                journal.finish("refused", why)
                error = Refused(f"{spec.kind} refused, nothing changed: {why}")
        finally:
            ctx.close()
        report = report_mod.build(journal, outputs)
        report_mod.save(journal, report)
        measure.save_write_rate(journal, outputs)   # the sandbox app's ledger goes with it; the review keeps this
    if error is not None:
        error.context["report"] = report
        raise error
    return report


def resumable(spec: PlanRun, state_dir: Path, outputs: Outputs, settings: Settings, app) -> Journal | None:
    """The unfinished run of ``spec.kind``, once it is known to belong here; None when there is none."""
    journal = Journal.current(state_dir, spec.kind)
    if journal is not None:
        check_belongs(journal, outputs, settings, app)
        if spec.on_resume is not None:
            spec.on_resume(journal)
    return journal


def completed_in_use(state_dir: Path, kind: str, outputs: Outputs, app,
                     leader: Callable[[RunState], str | None], *, timeout: float = 5.0) -> Journal | None:
    """The last run of ``kind`` when it completed and the app still uses the replica ``leader`` names
    in its state (running it again is a no-op): its URL names that replica, or (pooler mode) names the
    pooler and every pooler node serves that replica."""
    from ..pg import url_endpoint

    run_id = Journal.latest(state_dir, kind)
    if run_id is None:
        return None
    journal = Journal.load(state_dir, run_id)
    outcome = journal.outcome()
    name = leader(RunState.from_journal(journal))
    if not outcome or outcome[0] != "completed" or not name:
        return None
    url = app.config_var(outputs.source.database_url_var)
    r = outputs.replica(name)
    if url and outputs.pooler is not None and pooler_mod.points_at_pooler(outputs.pooler, url):
        try:
            serves = pooler_mod.current_target(outputs.pooler, timeout=timeout)
        except RunbookError:
            return None     # a node down or the nodes disagree: not provably done; the new run's preflight says why
        return journal if serves is not None and (serves.host, serves.port) == (r.host, r.port) else None
    return journal if url and url_endpoint(url)[:2] == (r.host, r.port) else None


def identity(outputs: Outputs, app) -> dict[str, Any]:
    """What makes a run belong to one migration: the stack, a hash of its outputs, the source's endpoint."""
    import hashlib
    import json

    from ..pg import url_endpoint
    from ..status import source_url

    digest = hashlib.sha256(json.dumps(outputs.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    url = source_url(app, outputs)
    host, port, db = url_endpoint(url) if url else ("", 0, "")
    return {"stack": outputs.stack, "outputs_hash": digest, "source_database": f"{host}:{port}/{db}"}


def check_belongs(journal: Journal, outputs: Outputs, settings: Settings, app) -> None:
    """Refuse to resume a run of another migration, or one too old to trust."""
    created = next((e for e in journal.events if e["step"] == "run" and e["event"] == "created"), None)
    if created is None:
        return
    recorded = created.get("context") or {}
    mine = identity(outputs, app)
    for key, what in (("stack", "stack"), ("outputs_hash", "stack outputs"), ("source_database", "source database")):
        if recorded.get(key) is not None and recorded.get(key) != mine[key]:
            if key == "source_database" and recorded.get("source_database") and journal.is_done("switch"):
                continue   # after the switch the app's URL names the new leader: that is this migration
            raise ConfigError(f"run {journal.run_id} belongs to another migration (its {what}: "
                              f"{recorded.get(key)}, now: {mine[key]}); it was not resumed - finish or "
                              f"abandon it with the outputs it was started with")
    age = time.time() - float(created.get("ts", time.time()))
    if age > settings.resume_max_age:
        raise ConfigError(f"run {journal.run_id} was started {age / 3600:.1f} h ago, more than tern.resume_max_age "
                          f"({settings.resume_max_age / 3600:.1f} h): not resuming it; check the source and the "
                          f"app by hand, then remove its pointer (runs/current-{journal.kind}) to start anew")


def refused_at_preflight(journal: Journal) -> str | None:
    """The preflight's reason when it failed and no other step started (nothing changed), else None."""
    started = {e["step"] for e in journal.events if e["step"] != "run" and e["event"] == "start"}
    failed = [e for e in journal.events if e["step"] == "preflight" and e["event"] == "failed"]
    if failed and started <= {"preflight"}:
        return failed[-1].get("detail") or "preflight failed"
    return None


# -- the plans ------------------------------------------------------------------------------------
def failover_ec2(outputs: Outputs, settings: Settings, *, candidate: str | None = None, dry_run: bool = False,
                 confirm: Callable[[str], bool], progress: Callable[[str], None] | None = None,
                 hooks: dict[str, Callable[[Any], None]] | None = None) -> dict[str, Any]:
    """Failover 1 (Heroku -> EC2): run, resume or dry-run the plan of :mod:`.ec2`, then its report.
    A completed run whose new leader the app still uses is reported, not redone."""
    if candidate is not None:
        outputs.replica(candidate)  # unknown name: ContractError before anything happens
    app = app_for(outputs.app)

    def context(journal: Journal) -> Context:
        data = journal.context()
        data.setdefault("requested_candidate", candidate)
        return Context(outputs, settings, app, journal, data=data, progress=progress)

    def same_candidate(journal: Journal) -> None:
        previous = RunState.from_journal(journal).requested_candidate
        if candidate and previous and candidate != previous:
            raise ConfigError(f"run {journal.run_id} is in progress with candidate {previous}; "
                              f"run again without --candidate (or with --candidate {previous}) to resume it")

    def dry(ctx: Context, rows: list[dict[str, Any]], in_progress: bool) -> dict[str, Any]:
        if in_progress and progress:
            progress(f"resuming run {ctx.journal.run_id}")   # what the run would do: the plan below
        choice: dict[str, Any] = {}
        if ctx.data.candidate is None:
            try:
                choice = ec2.preflight(ctx)
            except Exception as exc:  # noqa: BLE001 - a dry run reports what would stop the real one
                choice = {"preflight_error": str(exc)}
        return {"dry_run": True, "run_id": ctx.journal.run_id if in_progress else None,
                "plan": rows, "candidate": ctx.data.candidate or choice.get("candidate"),
                "preflight": {k: v for k, v in choice.items() if k in ("detail", "preflight_error")}}

    spec = PlanRun(ec2.KIND, ec2.plan, context, dry,
                   created={"requested_candidate": candidate, "switch_mode": pooler_switch.choose(settings, outputs)},
                   on_resume=same_candidate,
                   already_done=lambda: completed_in_use(Path(settings.state_dir), ec2.KIND, outputs, app,
                                                         lambda state: state.new_leader,
                                                         timeout=settings.connect_timeout),
                   already_done_means="the app uses its new leader")
    return run_plan(spec, outputs, settings, app, dry_run=dry_run, confirm=confirm, progress=progress, hooks=hooks)


def hop2_dry_run(kind: str, preflight: Callable[[Context], dict[str, Any]], *, when_in_progress: bool):
    """What a hop-2 dry run returns: the plan, and the preflight's verdict (also on a run in progress
    when ``when_in_progress``)."""
    def dry(ctx: Context, rows: list[dict[str, Any]], in_progress: bool) -> dict[str, Any]:
        pre, error = {}, None
        try:
            if when_in_progress or not in_progress:
                pre = preflight(ctx)
        except Exception as exc:  # noqa: BLE001 - a dry run reports what would stop the real one
            error = str(exc)
        return {"dry_run": True, "kind": kind, "plan": rows, "preflight": pre.get("detail"),
                "preflight_error": error}
    return dry


def failover_aurora(outputs: Outputs, settings: Settings, *, dry_run: bool = False,
                    confirm: Callable[[str], bool], progress: Callable[[str], None] | None = None,
                    hooks: dict[str, Callable[[Any], None]] | None = None) -> dict[str, Any]:
    """Failover 2 (EC2 -> Aurora): run, resume or dry-run the plan of :mod:`.aurora`, then its report.
    Refused (exit 2, nothing changed) when its preflight does not hold."""
    from ..replication.leader import leader_url
    from . import aurora

    app = app_for(outputs.app)
    source = leader_url(app, outputs)

    def context(journal: Journal) -> Context:
        # the leader's URL as the app had it when this process started (after the switch: TERN_EC2_DATABASE_URL)
        return Context(outputs, settings, app, journal, data=journal.context(), progress=progress,
                       source_override=source)

    spec = PlanRun(aurora.KIND, aurora.plan, context,
                   hop2_dry_run(aurora.KIND, aurora.preflight, when_in_progress=True), refuses=True,
                   created={"switch_mode": pooler_switch.choose(settings, outputs, app)})
    return run_plan(spec, outputs, settings, app, dry_run=dry_run, confirm=confirm, progress=progress, hooks=hooks)


def rollback_aurora(outputs: Outputs, settings: Settings, *, dry_run: bool = False,
                    confirm: Callable[[str], bool], progress: Callable[[str], None] | None = None,
                    hooks: dict[str, Callable[[Any], None]] | None = None) -> dict[str, Any]:
    """Undo failover 2 (Aurora -> the EC2 leader): run, resume or dry-run the plan of :mod:`.rollback`,
    then its report. Refused (exit 2, nothing changed) when its preflight does not hold; a completed
    rollback whose leader the app still uses is reported, not redone."""
    from ..replication.leader import aurora_master_url
    from . import rollback

    app = app_for(outputs.app)

    def context(journal: Journal) -> rollback.RollbackContext:
        return rollback.RollbackContext(outputs, settings, app, journal, data=journal.context(), progress=progress,
                                        source_override=aurora_master_url(outputs))

    spec = PlanRun(rollback.KIND, rollback.plan, context,
                   hop2_dry_run(rollback.KIND, rollback.preflight, when_in_progress=False), refuses=True,
                   already_done=lambda: completed_in_use(Path(settings.state_dir), rollback.KIND, outputs, app,
                                                         lambda state: state.leader,
                                                         timeout=settings.connect_timeout),
                   already_done_means="the app uses the EC2 leader",
                   created={"switch_mode": pooler_switch.choose(settings, outputs, app)})
    return run_plan(spec, outputs, settings, app, dry_run=dry_run, confirm=confirm, progress=progress, hooks=hooks)
