"""Run (or resume, or dry-run) a failover plan with its journal, then write its report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .. import report as report_mod
from ..adapters import app_for
from ..contract import Outputs
from ..errors import ConfigError, Refused, StepError
from ..journal import Journal, RunLock
from ..settings import Settings
from ..steps import Runner
from . import ec2
from .context import Context


def _completed_run(state_dir: Path, outputs: Outputs, app) -> Journal | None:
    """The last completed failover-ec2 whose new leader the app still uses (running again is a no-op)."""
    from ..pg import url_endpoint

    run_id = Journal.latest(state_dir, ec2.KIND)
    if run_id is None:
        return None
    journal = Journal.load(state_dir, run_id)
    outcome = journal.outcome()
    leader = journal.context().get("new_leader")
    if not outcome or outcome[0] != "completed" or not leader:
        return None
    url = app.config_var(outputs.source.database_url_var)
    r = outputs.replica(leader)
    return journal if url and url_endpoint(url)[:2] == (r.host, r.port) else None


def failover_ec2(outputs: Outputs, settings: Settings, *, candidate: str | None = None, dry_run: bool = False,
                 confirm: Callable[[str], bool], progress: Callable[[str], None] | None = None,
                 hooks: dict[str, Callable[[Any], None]] | None = None) -> dict[str, Any]:
    if candidate is not None:
        outputs.replica(candidate)  # unknown name: ContractError before anything happens
    state_dir = Path(settings.state_dir)
    if dry_run:
        return _run(outputs, settings, state_dir, candidate, True, confirm, progress, hooks)
    with RunLock(state_dir, ec2.KIND):
        return _run(outputs, settings, state_dir, candidate, False, confirm, progress, hooks)


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
                          "app by hand, then remove its pointer (runs/current-failover-ec2) to start anew")


def _run(outputs: Outputs, settings: Settings, state_dir: Path, candidate: str | None, dry_run: bool,
         confirm: Callable[[str], bool], progress: Callable[[str], None] | None,
         hooks: dict[str, Callable[[Any], None]] | None) -> dict[str, Any]:
    journal = Journal.current(state_dir, ec2.KIND)
    app = app_for(outputs.app)
    if journal is not None:
        check_belongs(journal, outputs, settings, app)
        previous = journal.context().get("requested_candidate")
        if candidate and previous and candidate != previous:
            raise ConfigError(f"run {journal.run_id} is in progress with candidate {previous}; "
                              f"run again without --candidate (or with --candidate {previous}) to resume it")
        if progress:
            progress(f"resuming run {journal.run_id}")
    if journal is None and not dry_run:
        finished = _completed_run(state_dir, outputs, app)
        if finished is not None:
            if progress:
                progress(f"already done: run {finished.run_id} completed and the app uses its new leader")
            report = report_mod.build(finished, outputs)
            report["already_done"] = True
            return report
    if dry_run:
        journal = journal or Journal(Path("/dev/null"), "dry-run", ec2.KIND)
        ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress)
        ctx.data.setdefault("requested_candidate", candidate)
        runner = Runner(journal, ec2.plan(), confirm=confirm)
        rows = [{"step": s.name, "title": s.title, "state": state} for s, state in runner.plan(ctx)]
        choice: dict[str, Any] = {}
        if "candidate" not in ctx.data:
            try:
                choice = ec2.preflight(ctx)
            except Exception as exc:  # noqa: BLE001 - a dry run reports what would stop the real one
                choice = {"preflight_error": str(exc)}
        return {"dry_run": True, "run_id": journal.run_id if journal.path != Path("/dev/null") else None,
                "plan": rows, "candidate": ctx.data.get("candidate") or choice.get("candidate"),
                "preflight": {k: v for k, v in choice.items() if k in ("detail", "preflight_error")}}
    if journal is None:
        journal = Journal.create(state_dir, ec2.KIND, requested_candidate=candidate, **identity(outputs, app))
    ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress)
    runner = Runner(journal, ec2.plan(), confirm=confirm, hooks=hooks or {},
                    progress=progress or (lambda m: None))
    error: StepError | None = None
    try:
        runner.run(ctx)
    except StepError as exc:
        error = exc
    finally:
        ctx.close()
    report = report_mod.build(journal, outputs)
    report_mod.save(journal, report)
    if error is not None:
        error.context["report"] = report
        raise error
    return report


def failover_aurora(outputs: Outputs, settings: Settings, *, dry_run: bool = False,
                    confirm: Callable[[str], bool], progress: Callable[[str], None] | None = None,
                    hooks: dict[str, Callable[[Any], None]] | None = None) -> dict[str, Any]:
    """Failover 2 (EC2 -> Aurora): run, resume or dry-run the plan of :mod:`.aurora`, then its report."""
    from ..replication.leader import leader_url
    from . import aurora

    state_dir = Path(settings.state_dir)
    app = app_for(outputs.app)
    source = leader_url(app, outputs)
    journal = Journal.current(state_dir, aurora.KIND)
    if journal is not None:
        check_belongs(journal, outputs, settings, app)
    if dry_run:
        journal = journal or Journal(Path("/dev/null"), "dry-run", aurora.KIND)
        ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress,
                      source_override=source)
        runner = Runner(journal, aurora.plan(), confirm=confirm)
        rows = [{"step": s.name, "title": s.title, "state": state} for s, state in runner.plan(ctx)]
        try:
            pre = aurora.preflight(ctx)
            error = None
        except Exception as exc:  # noqa: BLE001 - a dry run reports what would stop the real one
            pre, error = {}, str(exc)
        return {"dry_run": True, "kind": aurora.KIND, "plan": rows, "preflight": pre.get("detail"),
                "preflight_error": error}
    with RunLock(state_dir, aurora.KIND):
        if journal is None:
            journal = Journal.create(state_dir, aurora.KIND, **identity(outputs, app))
        elif progress:
            progress(f"resuming run {journal.run_id}")
        ctx = Context(outputs, settings, app, journal, data=journal.context(), progress=progress,
                      source_override=journal.context().get("leader_url") or source)
        ctx.data.setdefault("leader_url", source)
        runner = Runner(journal, aurora.plan(), confirm=confirm, hooks=hooks or {},
                        progress=progress or (lambda m: None))
        error: StepError | None = None
        try:
            runner.run(ctx)
        except StepError as exc:
            error = exc
            why = refused_at_preflight(journal)
            if why is not None:   # nothing acted: a refusal (exit 2), not a fallback
                journal.finish("refused", why)
                error = Refused(f"failover-aurora refused, nothing changed: {why}")
        finally:
            ctx.close()
        report = report_mod.build(journal, outputs)
        report_mod.save(journal, report)
    if error is not None:
        error.context["report"] = report
        raise error
    return report


def refused_at_preflight(journal: Journal) -> str | None:
    """The preflight's reason when it failed and no other step started (nothing changed), else None."""
    started = {e["step"] for e in journal.events if e["step"] != "run" and e["event"] == "start"}
    failed = [e for e in journal.events if e["step"] == "preflight" and e["event"] == "failed"]
    if failed and started <= {"preflight"}:
        return failed[-1].get("detail") or "preflight failed"
    return None


def _completed_rollback(state_dir: Path, outputs: Outputs, app) -> Journal | None:
    """The last completed rollback-aurora whose EC2 leader the app still uses (running again is a no-op)."""
    from ..pg import url_endpoint
    from . import rollback

    run_id = Journal.latest(state_dir, rollback.KIND)
    journal = Journal.load(state_dir, run_id) if run_id else None
    if journal is None or (journal.outcome() or ("",))[0] != "completed" or not journal.context().get("leader"):
        return None
    url = app.config_var(outputs.source.database_url_var)
    r = outputs.replica(journal.context()["leader"])
    return journal if url and url_endpoint(url)[:2] == (r.host, r.port) else None


def rollback_aurora(outputs: Outputs, settings: Settings, *, dry_run: bool = False,
                    confirm: Callable[[str], bool], progress: Callable[[str], None] | None = None,
                    hooks: dict[str, Callable[[Any], None]] | None = None) -> dict[str, Any]:
    """Undo failover 2 (Aurora -> the EC2 leader): run, resume or dry-run the plan of :mod:`.rollback`,
    then its report. Refused (exit 2, nothing changed) when its preflight does not hold; a completed
    rollback whose leader the app still uses is reported, not redone."""
    from ..replication.leader import aurora_master_url
    from . import rollback

    state_dir = Path(settings.state_dir)
    app = app_for(outputs.app)
    journal = Journal.current(state_dir, rollback.KIND)
    if journal is not None:
        check_belongs(journal, outputs, settings, app)

    def context(j: Journal) -> rollback.RollbackContext:
        return rollback.RollbackContext(outputs, settings, app, j, data=j.context(), progress=progress,
                                        source_override=aurora_master_url(outputs))

    if dry_run:
        ctx = context(journal or Journal(Path("/dev/null"), "dry-run", rollback.KIND))
        rows = [{"step": s.name, "title": s.title, "state": state}
                for s, state in Runner(ctx.journal, rollback.plan(), confirm=confirm).plan(ctx)]
        pre, error = {}, None
        try:
            if journal is None:
                pre = rollback.preflight(ctx)
        except Exception as exc:  # noqa: BLE001 - a dry run reports what would stop the real one
            error = str(exc)
        finally:
            ctx.close()
        return {"dry_run": True, "kind": rollback.KIND, "plan": rows, "preflight": pre.get("detail"),
                "preflight_error": error}
    with RunLock(state_dir, rollback.KIND):
        if journal is None:
            finished = _completed_rollback(state_dir, outputs, app)
            if finished is not None:
                if progress:
                    progress(f"already done: run {finished.run_id} completed and the app uses the EC2 leader")
                return dict(report_mod.build(finished, outputs), already_done=True)
            journal = Journal.create(state_dir, rollback.KIND, **identity(outputs, app))
        elif progress:
            progress(f"resuming run {journal.run_id}")
        ctx = context(journal)
        runner = Runner(journal, rollback.plan(), confirm=confirm, hooks=hooks or {},
                        progress=progress or (lambda m: None))
        error: StepError | None = None
        try:
            runner.run(ctx)
        except StepError as exc:
            error = exc
            why = refused_at_preflight(journal)
            if why is not None:   # nothing acted: a refusal (exit 2), not a fallback
                journal.finish("refused", why)
                error = Refused(f"rollback-aurora refused, nothing changed: {why}")
        finally:
            ctx.close()
        report = report_mod.build(journal, outputs)
        report_mod.save(journal, report)
    if error is not None:
        error.context["report"] = report
        raise error
    return report
