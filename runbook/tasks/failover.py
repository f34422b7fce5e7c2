"""``invoke restore``, ``invoke failover-ec2`` and ``invoke report``."""

from __future__ import annotations

import sys

from invoke import Exit, task
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.prompt import Confirm
from rich.table import Table

from .. import report as report_mod
from ..errors import PreflightError, StepError
from ..failover.run import failover_ec2 as run_failover_ec2
from ..restore import restore_all
from .common import console, out, outputs, print_json, settings, task_errors


@task(help={"stack": "local (default), a .json outputs file, or a Pulumi stack"})
@task_errors
def restore(c, stack=None):
    """Restore every EC2 replica from the source's base backup and start it as a standby fed by the WAL archive."""
    o = outputs(c, stack)
    s = settings(c)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(f"restoring {name}", total=total or None)
            bar.update(tasks[name], completed=done)

        results = restore_all(o, timeout=s.restore_timeout, connect_timeout=s.connect_timeout, progress=progress)
    for name, what in results.items():
        console.print(f"{name}: {what}")


def make_confirm(yes: bool):
    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise PreflightError(f"{question} needs confirmation: run on a terminal or pass --yes")
        return Confirm.ask(question, console=console, default=False)

    return confirm


@task(name="failover-ec2",
      help={"candidate": "the replica to promote (default: the most advanced healthy one)",
            "dry_run": "print the plan against the current state and change nothing",
            "yes": "confirm the point of no return without asking", "stack": "local (default) or a stack",
            "json": "print the report as JSON"})
@task_errors
def failover_ec2(c, candidate=None, dry_run=False, yes=False, stack=None, json=False):
    """Failover 1: Heroku -> EC2. Freeze, fence, flush, verify, promote, repoint, switch, start, smoke test.

    Journaled: if killed, run the same command again to resume. Falls back to the source
    automatically on any failure before the promotion.
    """
    o = outputs(c, stack)
    s = settings(c)
    with console.status("failover-ec2") as st:
        try:
            result = run_failover_ec2(o, s, candidate=candidate, dry_run=dry_run, confirm=make_confirm(yes),
                                      progress=lambda m: (st.update(m), console.print(f"  {m}")))
        except StepError as exc:
            report = exc.context.get("report")
            if report:
                render_report(report, console if json else out)
                if json:
                    print_json(report)
            raise
    if dry_run:
        if json:
            print_json(result)
            return
        table = Table(title="failover-ec2 plan (dry run: nothing changed)")
        table.add_column("step")
        table.add_column("what")
        table.add_column("state")
        for row in result["plan"]:
            table.add_row(row["step"], row["title"], row["state"])
        out.print(table)
        out.print(f"candidate: {result['candidate']} {result['preflight']}")
        return
    render_report(result, console if json else out)
    if json:
        print_json(result)
    if result.get("missing_on_target"):
        raise Exit(f"tern: error: {result['missing_on_target']} acknowledged writes are missing", code=1)


@task(help={"run": "run id (default: the latest)", "json": "print JSON", "stack": "local (default) or a stack"})
@task_errors
def report(c, run=None, json=False, stack=None):
    """The report of a run: steps, write-unavailability window, acknowledged writes and those missing."""
    s = settings(c)
    journal = report_mod.load_journal(s.state_dir, run)
    try:
        o = outputs(c, stack)
    except Exception:  # noqa: BLE001 - the sandbox may be gone: report from the journal alone
        o = None
    data = report_mod.build(journal, o)
    if json:
        print_json(data)
        return
    render_report(data)


def render_report(r, out=out) -> None:
    table = Table(title=f"{r['kind']} {r['run_id']}: {r['outcome']}")
    for col in ("step", "outcome", "seconds", "detail"):
        table.add_column(col)
    for st in r["steps"]:
        table.add_row(st["name"], st["outcome"], "" if st["seconds"] is None else f"{st['seconds']:.2f}",
                      st["detail"] or "")
    out.print(table)
    if r.get("reason"):
        out.print(f"reason: {r['reason']}")
    w = r.get("write_unavailability")
    if w:
        secs = "n/a" if w["seconds"] is None else f"{w['seconds']:.2f} s"
        out.print(f"write-unavailability window: {secs} (last acknowledged write on the source to the first on "
                  f"{w['target']})")
    if r.get("acknowledged_writes") is not None:
        out.print(f"acknowledged writes: {r['acknowledged_writes']}; missing on {r.get('checked_on')}: "
                  f"{r['missing_on_target']}")
    if r.get("verification"):
        v = r["verification"]
        out.print(f"verification: {'equal' if v['ok'] else 'DIFFERENT'} ({v['tables']} tables, {v['rows']:,} rows, "
                  f"{v['sampled_rows']:,} sampled)")
    for name, why in (r.get("repoint_failures") or {}).items():
        out.print(f"[yellow]warning: {name}: {why}[/yellow]")
