"""``invoke restore``, ``invoke failover-ec2`` and ``invoke report``."""

from __future__ import annotations

import re
import sys

from invoke import Exit, task
from rich.table import Table
from rich.text import Text

from .. import report as report_mod
from ..contract import Outputs
from ..errors import ConfigError, PreflightError, Refused, StepError
from ..failover import ec2
from ..failover.run import failover_ec2 as run_failover_ec2
from ..journal import Journal
from ..restore import restore_all
from ..status import replica_status
from .common import (byte_progress, console, human, out, outputs, parse_name, print_json, progress_status, say,
                     settings, stack_settings, task_errors)

STACK_HELP = "local (the sandbox, default), a .json outputs file, or a Pulumi stack name"


@task(help={"stack": STACK_HELP})
@task_errors
def restore(c, stack=None):
    """Restore every EC2 replica from the source's base backup and start it as a standby fed by the WAL archive."""
    stack = parse_name("stack", stack)
    o = outputs(c, stack)
    s = stack_settings(settings(c), stack)
    with byte_progress("restoring") as progress:
        results = restore_all(o, timeout=s.restore_timeout, connect_timeout=s.connect_timeout, progress=progress,
                              state_dir=s.state_dir)
    for name, what in results.items():
        say(f"{name}: {what}")


SWITCH_MODE_HELP = ("pooler: PgBouncer PAUSE, repoint, RESUME (no config-var change, no dyno restart); url: "
                    "swap DATABASE_URL (every dyno restarts). Default: pooler when the stack has one")


def switch_mode(value) -> str | None:
    """--switch: pooler | url | auto (None keeps the setting, tern.switch_mode)."""
    if value is None:
        return None
    if value not in ("pooler", "url", "auto"):
        raise ConfigError(f"--switch is pooler or url, not {value!r}")
    return value


def make_confirm(yes: bool, timeout: float):
    """The point-of-no-return prompt: yes only on an explicit answer within ``timeout`` seconds."""
    def confirm(question: str) -> bool:
        if yes:
            return True
        if not sys.stdin.isatty():
            raise PreflightError(f"{question} needs confirmation: run on a terminal or pass --yes")
        return ask(question, timeout)

    return confirm


def ask(question: str, timeout: float, stream=None) -> bool:
    """Ask on stderr, read one line from ``stream`` (stdin); no answer within ``timeout`` counts as no."""
    import select

    stream = stream or sys.stdin
    console.print(f"{question} [y/N] (no answer in {timeout:.0f}s = no) ", end="", markup=False, highlight=False)
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        console.print("\nno answer: not proceeding", markup=False, highlight=False)
        return False
    return stream.readline().strip().lower() in ("y", "yes")


def restore_command(stack: str | None) -> str:
    return "invoke restore" + (f" --stack {stack}" if stack and stack != "local" else "")


def check_restored(o: Outputs, stack: str | None, candidate: str | None) -> None:
    """Before a new run: the replicas must have been restored (an empty host cannot be a candidate)."""
    wanted = [o.replica(candidate)] if candidate else o.replicas
    empty = [r.name for r in wanted if replica_status(r, None)["role"] == "empty"]
    if len(empty) == len(wanted):
        what = f"{empty[0]} is" if len(empty) == 1 else f"{', '.join(empty)} are"
        raise ConfigError(f"the EC2 replicas are not restored yet ({what} empty): run `{restore_command(stack)}` first")


@task(name="failover-ec2",
      help={"candidate": "the replica to promote (default: the most advanced healthy one)",
            "dry_run": "print the plan against the current state and change nothing",
            "yes": "confirm the point of no return without asking", "stack": STACK_HELP,
            "json": "print the report (or, with --dry-run, the plan) as JSON on stdout; the rest goes to stderr",
            "switch": SWITCH_MODE_HELP})
@task_errors
def failover_ec2(c, candidate=None, dry_run=False, yes=False, stack=None, json=False, switch=None):
    """Failover 1: Heroku -> EC2. Freeze, fence, flush, verify, promote, switch, start, smoke test, repoint.

    Journaled: if killed, run the same command again to resume. Falls back to the source
    automatically on any failure before the promotion. Exit 1 when it fell back.
    """
    stack = parse_name("stack", stack)
    candidate = parse_name("candidate", candidate)
    mode = switch_mode(switch)   # every flag before any look at the environment
    o = outputs(c, stack)
    if candidate is not None:
        o.replica(candidate)   # an unknown name is bad input, before anything else
    s = stack_settings(settings(c), stack).replace(switch_mode=mode)
    if Journal.current(s.state_dir, ec2.KIND) is None:
        check_restored(o, stack, candidate)
    show = human(json)
    result = run_reported("failover-ec2", show, json,
                          lambda update: run_failover_ec2(o, s, candidate=candidate, dry_run=dry_run,
                                                          confirm=make_confirm(yes, s.confirm_timeout),
                                                          progress=update))
    if dry_run:
        render_plan(result, show)
        if json:
            print_json(result)
        return
    render_report(result, show)
    if json:
        print_json(result)
    if result.get("missing_on_target"):
        raise Exit(f"tern: error: {result['missing_on_target']} acknowledged writes are missing", code=1)


def run_reported(title: str, show, json: bool, run):
    """``run(progress)`` under a progress display; a run that failed or fell back still shows (and,
    with --json, prints) the report it carries before the error becomes the exit status."""
    with progress_status(title, echo=True) as update:
        try:
            return run(update)
        except StepError as exc:
            report = exc.context.get("report")
            if report and not isinstance(exc, Refused):   # refused: nothing happened, one line says why
                render_report(report, show)
                if json:
                    print_json(report)
            raise


def render_plan(result, show=out) -> None:
    table = Table(title="failover-ec2 plan (dry run: nothing changed)")
    table.add_column("step")
    table.add_column("what")
    table.add_column("state")
    for row in result["plan"]:
        table.add_row(row["step"], Text(row["title"]), Text(row["state"]))
    show.print(table)
    pre = result.get("preflight") or {}
    if pre.get("preflight_error"):
        show.print(f"preflight would stop the run now: {pre['preflight_error']}", markup=False)
    else:
        detail = f" ({pre['detail']})" if pre.get("detail") else ""
        show.print(f"candidate: {result['candidate']}{detail}", markup=False)


RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@task(help={"run": "run id (default: the latest of the stack)", "json": "print the report as JSON on stdout",
            "stack": STACK_HELP,
            "html": "also write the after-action review: a self-contained HTML page (default <run dir>/review.html, "
                    "or the path given); both hops when the run ended a rehearsal. Its path goes to stderr (with "
                    "--json, to the JSON's review field)",
            "png": "also write the review's picture alone to this PNG file"},
      optional=["html"])
@task_errors
def report(c, run=None, json=False, stack=None, html=None, png=None):
    """The report of a run: steps, write-unavailability window, acknowledged writes and those missing.

    Runs are kept per stack in <state_dir>/<stack>/runs (state_dir: <repo>/.tern by default), so a
    rehearsal's report is still there after the sandbox is gone. --html / --png draw the after-action
    review from the same records (runbook/review.py).
    """
    stack = parse_name("stack", stack)
    run = parse_name("run", run)
    if run is not None and not RUN_ID.match(run):
        raise ConfigError(f"--run must be a run id such as failover-ec2-20260101T000000-123, got {run!r}")
    s = stack_settings(settings(c), stack)
    journal = report_mod.load_journal(s.state_dir, run)
    try:
        o = outputs(c, stack)
    except Exception:  # noqa: BLE001 - the sandbox may be gone: report from the journal (and the saved report)
        o = None
    data = report_mod.build(journal, o)
    if o is None:
        data = report_mod.with_saved_figures(journal, data)
    written = None
    if html or png:
        written = write_review(s.state_dir, journal.run_id, html=html, png=parse_name("png", png),
                               state_root=settings(c).state_dir)
    if json:
        print_json(dict(data, review=written) if written else data)
    else:
        render_report(data)
    for what, path in (written or {}).items():
        say(f"after-action review ({what}): {path}")


def write_review(state_dir, run_id: str, *, html=None, png=None, state_root=None) -> dict[str, str]:
    """The after-action review of ``run_id`` (:mod:`runbook.review`): ``html`` True (the run directory's
    review.html) or a path, ``png`` a path or None. Returns what was written where."""
    from pathlib import Path

    from .. import review

    html_path = None if html in (None, True) else Path(parse_name("html", html))
    try:
        return review.write(state_dir, run_id, html_path=html_path, png_path=Path(png) if png else None,
                            state_root=state_root, page_too=bool(html))
    except ImportError as exc:   # matplotlib: a dependency of the project (./dev installs it)
        raise ConfigError(f"the review needs matplotlib ({exc}): run ./dev setup") from None


def render_report(r, out=out) -> None:
    table = Table(title=f"{r['kind']} {r['run_id']}: {r['outcome']}")
    for col in ("step", "started (UTC)", "outcome", "seconds", "detail"):
        table.add_column(col)
    for st in r["steps"]:
        table.add_row(st["name"], st.get("started_at") or "", st["outcome"],
                      "" if st["seconds"] is None else f"{st['seconds']:.2f}", Text(st["detail"] or ""))
    out.print(table)
    if r.get("reason"):
        out.print(f"reason: {r['reason']}", markup=False)
    d = r.get("downtime") or {}
    if d.get("maintenance_at"):
        out.print(f"maintenance on at {d['maintenance_at']}; switched at {d.get('switched_at') or 'n/a'}; "
                  f"app started at {d.get('app_started_at') or 'n/a'}", markup=False)
    w = r.get("write_unavailability")
    if w:
        secs = "n/a" if w["seconds"] is None else f"{w['seconds']:.2f} s"
        out.print(f"app unavailability (write-unavailability window): {secs} (last acknowledged write on the "
                  f"source {w.get('last_ack_on_source') or 'n/a'} to the first on {w['target']} "
                  f"{w.get('first_ack_on_target') or 'n/a'}; switch: {r.get('switch_mode') or 'url'})", markup=False)
        if r.get("longest_held_query_seconds") is not None or r.get("client_errors") is not None:
            held = r.get("longest_held_query_seconds")
            out.print(f"clients meanwhile: {r.get('client_errors') or 0} errors; longest write held "
                      f"{'n/a' if held is None else f'{held:.2f} s'}", markup=False)
    du = r.get("database_unavailability")
    if du and du.get("seconds") is not None:
        out.print(f"database unavailability: {du['seconds']:.2f} s (the fence to the new database taking writes)",
                  markup=False)
    if r.get("acknowledged_writes") is not None:
        out.print(f"acknowledged writes: {r['acknowledged_writes']}; missing on {r.get('checked_on')}: "
                  f"{r['missing_on_target']}", markup=False)
    if r.get("verification"):
        v = r["verification"]
        out.print(f"verification: {'equal' if v['ok'] else 'DIFFERENT'} ({v['tables']} tables, {v['rows']:,} rows, "
                  f"{v['sampled_rows']:,} sampled)")
    full = r.get("verification_full")
    if full:
        if full.get("ok") is None:
            out.print(f"full verification: {full.get('note')}", markup=False)
        else:
            where = f" against {full.get('standby') or full.get('witness')}" if (full.get("standby") or
                                                                                   full.get("witness")) else ""
            rows = "" if full.get("rows") is None else f"{full['rows']:,} rows, "   # DMS's validation counts none
            out.print(f"full verification{where}: {'equal' if full['ok'] else 'DIFFERENT'} ({full['tables']} tables, "
                      f"{rows}{full.get('seconds', 0):.1f} s)", markup=False)
    for name, why in (r.get("repoint_failures") or {}).items():
        out.print(f"warning: {name}: {why}", style="yellow", markup=False)

