"""The after-action review: one self-contained HTML page (and its picture as a PNG) for a run or a rehearsal.

The picture is a timeline per failover (both hops for a rehearsal): the app's acknowledged commits per
second (its ledger, saved beside the run as ``writes.json``: :mod:`.measure`), the replication lag where
the run sampled it (``lag.jsonl``), each step as a horizontal bar coloured by its outcome, the app's and
the database's unavailability shaded, the point of no return marked. Beside it: the outcome, the switch
mode, both unavailability figures, the verifications, acknowledged writes lost, the snapshots taken, what
to do next, and - when ``invoke estimate`` was asked - the real night's estimate beside what was measured.

A rehearsal is recognised by its last hop's saved report (``rehearse`` saves hop 1's inside hop 2's).
Everything comes from the run directories: the page can be drawn long after the sandbox is gone. Every
text shown is redacted and HTML-escaped; the page loads nothing from anywhere (the picture is inline).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import measure
from . import report as report_mod
from .failover.state import RunState
from .journal import Journal
from .redact import redact

REVIEW_FILE = "review.html"
PICTURE_FILE = "review.png"

# colours the page's test looks for in a screenshot: keep them distinct from each other and from grey
RATE_COLOUR = "#1f77b4"        # the app's commits/s
ERROR_COLOUR = "#d62728"       # client errors/s
LAG_COLOUR = "#9467bd"         # replication lag
APP_WINDOW_COLOUR = "#d62728"  # the app's write unavailability (shaded)
DB_WINDOW_COLOUR = "#ff7f0e"   # the database's unavailability (shaded)
STEP_COLOURS = {"done": "#2ca02c", "skipped": "#9a9a9a", "failed": "#d62728", "reverted": "#ff7f0e",
                "revert_failed": "#8c564b", "in progress": "#bcbd22"}


# -- what the picture draws: extracted from a run directory --------------------------------------------------
@dataclass
class Bar:
    name: str
    start: float
    end: float
    outcome: str


@dataclass
class Hop:
    run_id: str
    kind: str
    report: dict[str, Any]                       # as `invoke report --json` gives it, with the saved ledger figures
    start: float                                 # the run's creation, epoch seconds
    end: float                                   # its last event
    bars: list[Bar] = field(default_factory=list)
    app_window: tuple[float, float] | None = None
    db_window: tuple[float, float] | None = None
    point_of_no_return: tuple[str, float | None] | None = None   # (step, when crossed; None: not reached)
    writes: dict[str, Any] | None = None
    lag: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    snapshots: dict[str, str] = field(default_factory=dict)


def epoch(value: Any) -> float | None:
    """An ISO 8601 time of a report (``...Z``) or epoch seconds, as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def rate_points(writes: dict[str, Any] | None, key: str = "acks") -> list[tuple[float, float]]:
    """(bin centre, per second) from a saved write series."""
    if not writes or not writes.get(key):
        return []
    width, start = float(writes["bin_seconds"]), float(writes["start"])
    return [(start + (i + 0.5) * width, n / width) for i, n in enumerate(writes[key])]


def bars(journal: Journal) -> list[Bar]:
    """Each step's span; a step still running ends at the journal's last event."""
    last = float(journal.events[-1]["ts"]) if journal.events else 0.0
    out = []
    for s in journal.steps():
        if s.started_at is None:
            continue
        out.append(Bar(s.name, s.started_at, s.ended_at if s.ended_at is not None else last,
                       s.outcome or "in progress"))
    return out


def database_window(state: RunState) -> tuple[float, float] | None:
    """The fence to the new database taking writes (None before the fence; open-ended runs end unknown)."""
    ready = state.promoted_at or state.switched_over_at
    if state.fenced_at is None or ready is None:
        return None
    return (float(state.fenced_at), float(ready))


def app_window(report: dict[str, Any]) -> tuple[float, float] | None:
    """The last write acknowledged on the source to the first on the target (the ledger, via the report)."""
    w = report.get("write_unavailability") or {}
    a, b = epoch(w.get("last_ack_on_source")), epoch(w.get("first_ack_on_target"))
    return (a, b) if a is not None and b is not None else None


def point_of_no_return_step(kind: str) -> str | None:
    from .failover import aurora, ec2, rollback

    plans = {ec2.KIND: ec2.plan, aurora.KIND: aurora.plan, rollback.KIND: rollback.plan}
    plan = plans.get(kind)
    return next((s.name for s in plan() if s.point_of_no_return), None) if plan else None


def point_of_no_return(journal: Journal) -> tuple[str, float | None] | None:
    """(step, when it began) once the run began it and did not refuse to cross; (step, None) before."""
    name = point_of_no_return_step(journal.kind)
    if name is None:
        return None
    events = [e for e in journal.events if e["step"] == name]
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    if not starts:
        return (name, None)
    refused = any(e["event"] == "failed" and e.get("crossed") is False for e in events[starts[-1]:])
    return (name, None if refused else float(events[starts[0]]["ts"]))


def load_hop(state_dir: Path, run_id: str) -> Hop:
    journal = report_mod.load_journal(state_dir, run_id)
    data = report_mod.with_saved_figures(journal, report_mod.build(journal, None))
    saved = saved_report(journal)
    for key in ("adapters", "final_ledger_check", "standins", "client_errors", "longest_held_query_seconds"):
        if saved.get(key) is not None:
            data.setdefault(key, saved[key])
    state = RunState.from_journal(journal)
    events = journal.events
    start = float(events[0]["ts"]) if events else 0.0
    end = float(events[-1]["ts"]) if events else start
    return Hop(run_id=journal.run_id, kind=journal.kind, report=data, start=start, end=end, bars=bars(journal),
               app_window=app_window(data), db_window=database_window(state),
               point_of_no_return=point_of_no_return(journal), writes=measure.read_writes(journal.run_dir),
               lag=measure.read_lag(journal.run_dir), snapshots=dict(state.snapshot or {}))


def saved_report(journal: Journal) -> dict[str, Any]:
    try:
        data = json.loads((journal.run_dir / "report.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def runs_of(state_dir: Path, run_id: str | None) -> list[str]:
    """The run ids a review covers: both hops when ``run_id`` (default: the latest run) ended a rehearsal."""
    journal = report_mod.load_journal(state_dir, run_id)
    first = (saved_report(journal).get("failover_ec2") or {}).get("run_id")
    if first and (Path(state_dir) / "runs" / first / "journal.jsonl").exists():
        return [first, journal.run_id]
    return [journal.run_id]


def between(state_dir: Path, kind: str, after: float, before: float) -> Journal | None:
    """The latest run of ``kind`` created in (after, before): replicate-aurora between a rehearsal's hops."""
    runs = Path(state_dir) / "runs"
    found = []
    for p in runs.glob(f"{kind}-*"):
        if (p / "journal.jsonl").exists():
            j = Journal.load(state_dir, p.name)
            if j.events and after < float(j.events[0]["ts"]) < before:
                found.append((float(j.events[0]["ts"]), j))
    return max(found, key=lambda t: t[0])[1] if found else None


# -- the picture ------------------------------------------------------------------------------------------------
def _bytes_axis(max_bytes: float) -> tuple[float, str]:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if max_bytes >= size:
            return size, unit
    return 1.0, "bytes"


def picture(hops: list[Hop], *, dpi: int = 100) -> bytes:
    """The timeline as PNG bytes (matplotlib, Agg backend; no global state touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    heights = [2.4 + 0.24 * max(len(h.bars), 1) + 0.9 for h in hops]
    fig = Figure(figsize=(12, sum(heights)), dpi=dpi)   # margins by hand: a layout engine costs 1-2 s a picture
    FigureCanvasAgg(fig)
    subfigs = fig.subfigures(len(hops), 1, height_ratios=heights) if len(hops) > 1 else [fig]
    for n, (hop, sub, height) in enumerate(zip(hops, subfigs, heights)):
        rate_ax, steps_ax = sub.subplots(2, 1, sharex=True, height_ratios=[2.4, 0.24 * max(len(hop.bars), 1) + 0.4])
        sub.subplots_adjust(left=0.09, right=0.93, top=1 - 0.35 / height, bottom=0.55 / height, hspace=0.06)
        t0 = hop.start
        points = rate_points(hop.writes)
        lo = min([0.0] + [p[0] - t0 for p in points[:1]])
        hi = max(hop.end - t0, 1.0)
        handles = []
        if points:
            xs, ys = [p[0] - t0 for p in points], [p[1] for p in points]
            handles += rate_ax.plot(xs, ys, color=RATE_COLOUR, linewidth=2.2, drawstyle="steps-mid",
                                    label="app commits/s (its ledger)")
            errors = rate_points(hop.writes, "errors")
            if any(e[1] for e in errors):
                handles += rate_ax.plot([e[0] - t0 for e in errors], [e[1] for e in errors], color=ERROR_COLOUR,
                                        linewidth=1.2, drawstyle="steps-mid", label="client errors/s")
            rate_ax.set_ylim(0, max(ys + [1.0]) * 1.6)   # room for the legend
        else:
            rate_ax.text(0.5, 0.5, "no write-rate record (the app's ledger exists only in the sandbox)",
                         transform=rate_ax.transAxes, ha="center", va="center", color="#666666")
        rate_ax.set_ylabel("commits/s")
        if hop.lag:
            lag_ax = rate_ax.twinx()
            peak = max(b for pts in hop.lag.values() for _, b in pts) or 1
            scale, unit = _bytes_axis(peak)
            for node, pts in sorted(hop.lag.items()):
                zero = not any(b for _, b in pts)
                handles += lag_ax.plot([t - t0 for t, _ in pts], [b / scale for _, b in pts], color=LAG_COLOUR,
                                       marker="o", markersize=3, linewidth=1.2,
                                       label=f"lag of {node}: "
                                       + ("0 bytes when sampled" if zero else f"{unit} behind"))
            lag_ax.set_ylim(0, peak / scale * 1.6)
            lag_ax.set_ylabel(f"lag ({unit})", color=LAG_COLOUR)
        for ax in (rate_ax, steps_ax):
            if hop.app_window:
                ax.axvspan(hop.app_window[0] - t0, hop.app_window[1] - t0, color=APP_WINDOW_COLOUR, alpha=0.18,
                           linewidth=0)
            if hop.db_window:
                ax.axvspan(hop.db_window[0] - t0, hop.db_window[1] - t0, facecolor="none", edgecolor=DB_WINDOW_COLOUR,
                           hatch="///", linewidth=0.8)
            if hop.point_of_no_return and hop.point_of_no_return[1] is not None:
                ax.axvline(hop.point_of_no_return[1] - t0, color="black", linestyle="--", linewidth=1.4)
        r = hop.report
        if hop.app_window:
            handles.append(Patch(color=APP_WINDOW_COLOUR, alpha=0.18,
                                 label=f"app unavailable {(r.get('write_unavailability') or {}).get('seconds')} s"))
        if hop.db_window:
            seconds = (r.get("database_unavailability") or {}).get("seconds")
            handles.append(Patch(facecolor="none", edgecolor=DB_WINDOW_COLOUR, hatch="///",
                                 label=f"database unavailable {seconds} s"))
        if hop.point_of_no_return:
            name, at = hop.point_of_no_return
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], color="black", linestyle="--",
                                  label=f"point of no return ({name})" + ("" if at is not None else ": not reached")))
        rate_ax.legend(handles=handles, loc="upper left", fontsize=8, ncol=3, framealpha=0.85)
        title = f"hop {n + 1}: " if len(hops) > 1 else ""
        rate_ax.set_title(f"{title}{hop.kind} {hop.run_id}: {r.get('outcome')}", loc="left", fontsize=11,
                          color="#b00000" if r.get("outcome") not in ("completed",) else "black")
        rate_ax.grid(axis="x", alpha=0.3)
        # the steps, first at the top
        for i, b in enumerate(hop.bars):
            y = len(hop.bars) - 1 - i
            width = max(b.end - b.start, (hi - lo) * 0.002)
            steps_ax.barh(y, width, left=b.start - t0, height=0.62, color=STEP_COLOURS.get(b.outcome, "#7f7f7f"))
            steps_ax.text(b.start - t0 + width + (hi - lo) * 0.004, y, f"{b.end - b.start:.2f} s", va="center",
                          fontsize=7, color="#333333")
        steps_ax.set_yticks(range(len(hop.bars)), [b.name for b in reversed(hop.bars)], fontsize=8)
        steps_ax.set_ylim(-0.7, max(len(hop.bars), 1) - 0.3)
        steps_ax.set_xlim(lo, hi + (hi - lo) * 0.06)
        steps_ax.set_xlabel(f"seconds since {report_mod.iso(t0)} (UTC)")
        steps_ax.grid(axis="x", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# -- the page ---------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(redact("" if value is None else value))


def _secs(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f} s"


def next_steps(hop: Hop) -> str:
    """What the operator does now, from how the run ended."""
    r = hop.report
    outcome, reason, kind = r.get("outcome"), r.get("reason") or "", hop.kind
    lost = r.get("missing_on_target")
    snaps = ", ".join(f"{k}: {v}" for k, v in hop.snapshots.items()) or "none"
    pnr = hop.point_of_no_return
    if outcome == "completed":
        if kind == "failover-ec2":
            return (f"Hop 1 is done: the app writes to {r.get('new_leader')}. Next: `invoke replicate-aurora`, then "
                    "`invoke failover-aurora` once its preflight passes. Keep the Heroku database until hop 2 is "
                    "behind you.")
        if kind == "failover-aurora":
            return ("Both hops are done: the app writes to Aurora. `invoke rollback-aurora` returns it to the EC2 "
                    "leader without loss while the reverse replication runs; tear the EC2 hosts down only after "
                    "you decided not to.")
        if kind == "replicate-aurora":
            return "Replication into Aurora runs: `invoke failover-aurora` once its preflight passes."
        return "Done: nothing to do."
    if outcome == "fell_back":
        return (f"It fell back before the point of no return: the source is unfenced and the app writes to it "
                f"again ({'no' if not lost else lost} acknowledged writes missing). Cause: {reason}. Fix it, check "
                f"`invoke status`, then run `invoke {kind}` again (a new run). Snapshots taken: {snaps}.")
    if outcome == "fallback_failed":
        return (f"The fallback did NOT complete: {reason}. Undo what is still in place by hand (the reason names it) "
                f"before the app can write again; then `invoke status`. Snapshots taken: {snaps}.")
    if outcome == "refused":
        return f"Refused by its preflight; nothing changed: {reason}. Fix that, then run `invoke {kind}` again."
    failed = next((b.name for b in hop.bars if b.outcome == "failed"), None)
    crossed = pnr is not None and pnr[1] is not None
    if crossed:
        return (f"Stopped after the point of no return ({pnr[0]}){f' at {failed}' if failed else ''}: no automatic "
                f"fallback. Fix the cause and run `invoke {kind}` again: it resumes where it stopped.")
    return (f"The run has not finished{f' (it failed at {failed})' if failed else ''}: run `invoke {kind}` again to "
            "resume it; it re-checks what it did and falls back if that no longer holds.")


def facts(hop: Hop) -> list[tuple[str, str]]:
    r = hop.report
    rows = [("outcome", r.get("outcome") or "n/a")]
    if r.get("reason"):
        rows.append(("reason", r["reason"]))
    rows.append(("switch", r.get("switch_mode") or "url"))
    w = r.get("write_unavailability") or {}
    d = r.get("database_unavailability") or {}
    rows.append(("app unavailable", _secs(w.get("seconds")) + " (last write acknowledged on the source to the "
                                                              "first on the target)"))
    rows.append(("database unavailable", _secs(d.get("seconds")) + " (the fence to the new database taking writes)"))
    if r.get("client_errors") is not None or r.get("longest_held_query_seconds") is not None:
        rows.append(("clients meanwhile", f"{r.get('client_errors') or 0} errors; longest write held "
                                          f"{_secs(r.get('longest_held_query_seconds'))}"))
    if r.get("catchup_seconds") is not None:
        rows.append(("catch-up", _secs(r["catchup_seconds"])))
    v = r.get("verification")
    if v:
        rows.append(("verification (in the window)", f"{'equal' if v.get('ok') else 'DIFFERENT'}: {v.get('tables')} "
                                                     f"tables, {v.get('sampled_rows', 0):,} rows sampled, sequences "
                                                     f"{'checked' if v.get('sequences_checked') else 'not checked'}"))
    full = r.get("verification_full")
    if full:
        if full.get("ok") is None:
            rows.append(("full verification", str(full.get("note") or "not run")))
        else:
            where = full.get("standby") or full.get("witness")
            rows_n = "" if full.get("rows") is None else f"{full['rows']:,} rows, "
            rows.append(("full verification", f"{'equal' if full['ok'] else 'DIFFERENT'}"
                                              f"{f' against {where}' if where else ''} ({full.get('tables')} tables, "
                                              f"{rows_n}{_secs(full.get('seconds'))})"))
    if r.get("acknowledged_writes") is not None:
        rows.append(("acknowledged writes lost", f"{r.get('missing_on_target')} of {r['acknowledged_writes']:,} "
                                                 f"(checked on {r.get('checked_on')})"))
    final = r.get("final_ledger_check")
    if final:
        rows.append(("ledger after the app stopped", f"{final.get('missing')} lost, {final.get('unexplained')} "
                                                     f"unexplained, {final.get('acknowledged'):,} acknowledged"))
    rows.append(("snapshots taken", "; ".join(f"{k}: {v}" for k, v in hop.snapshots.items()) or "none"))
    for name, why in (r.get("repoint_failures") or {}).items():
        rows.append((f"warning: {name}", why))
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table class=facts>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _steps_table(hop: Hop) -> str:
    head = "<tr><th>step</th><th>started (UTC)</th><th>seconds</th><th>outcome</th><th>detail</th></tr>"
    body = []
    for s in hop.report.get("steps") or []:
        secs = "" if s.get("seconds") is None else f"{s['seconds']:.2f}"
        body.append(f"<tr class={_e(s['outcome'].replace(' ', '_'))}><td>{_e(s['name'])}</td>"
                    f"<td>{_e(s.get('started_at'))}</td><td class=num>{secs}</td><td>{_e(s['outcome'])}</td>"
                    f"<td>{_e(s.get('detail'))}</td></tr>")
    return f"<table class=steps>{head}{''.join(body)}</table>"


def _estimate_section(est: dict[str, Any] | None, extra: list[tuple[str, str]]) -> str:
    parts = []
    if extra:
        parts.append("<h2>Measured around the failovers</h2>" + _table(extra))
    if est is None:
        parts.append("<h2>The real night</h2><p>No estimate asked for yet: <code>invoke estimate --size 1.4TB "
                     "--write-rate 500</code> extrapolates every phase from this rehearsal, and this page shows it "
                     "beside what was measured.</p>")
        return "".join(parts)
    head = (f"<h2>The real night: {_e(est['size'])} at {est['write_rate']:g} commits/s</h2>"
            f"<p>Estimated from the runs recorded up to this rehearsal ({_e(est['basis'])}); each assumption beside "
            f"its figure. <code>invoke estimate</code> prints the same.</p>")
    rows = "".join(f"<tr><td>{_e(p['phase'])}</td><td>{_e(p.get('measured') or '')}</td>"
                   f"<td class=num>{_e(_duration(p['seconds']))}</td><td class=small>{_e(p['assumption'])}</td></tr>"
                   for p in est["phases"])
    warn = "".join(f"<p class=warn>{_e(w)}</p>" for w in est.get("warnings") or [])
    parts.append(head + warn + "<table class=steps><tr><th>phase</th><th>measured in the rehearsal</th>"
                 "<th>estimate</th><th>assumption</th></tr>" + rows + "</table>")
    return "".join(parts)


def _duration(seconds: Any) -> str:
    from .estimate import human_seconds

    return human_seconds(seconds)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:16px 24px;color:#111;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:18px 0 6px} .sub{color:#555;margin:0 0 12px}
.layout{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.picture{flex:3 1 760px;min-width:600px} .picture img{width:100%;height:auto;border:1px solid #ddd}
.side{flex:1 1 320px;min-width:300px;max-width:560px} table{border-collapse:collapse;font-size:13px;margin-bottom:8px}
table.facts{width:100%;table-layout:fixed} table.facts th{width:38%} td{overflow-wrap:anywhere}
table.facts th{text-align:left;vertical-align:top;padding:3px 8px 3px 0;color:#444;font-weight:600}
table.facts td{padding:3px 0;vertical-align:top}
table.steps{width:100%} table.steps th,table.steps td{border-bottom:1px solid #eee;padding:3px 6px;text-align:left;
vertical-align:top} .num{white-space:nowrap} .small{font-size:12px;color:#333}
tr.failed td,tr.revert_failed td{color:#b00000} tr.reverted td{color:#a65e00}
.outcome-completed{color:#176f17} .outcome-bad{color:#b00000} .next{background:#f6f6f0;border-left:4px solid #999;
padding:6px 10px;font-size:13px} .warn{color:#a65e00;font-size:13px} code{background:#f2f2f2;padding:0 3px}
"""


def page(hops: list[Hop], png: bytes, *, estimate: dict[str, Any] | None = None,
         extra: list[tuple[str, str]] | None = None) -> str:
    """The review as one HTML document: nothing is fetched, the picture is a data: URI."""
    rehearsal = len(hops) > 1
    what = "rehearsal" if rehearsal else hops[0].kind
    outcome = "completed" if all(h.report.get("outcome") == "completed" for h in hops) else next(
        h.report.get("outcome") for h in hops if h.report.get("outcome") != "completed")
    ids = ", ".join(h.run_id for h in hops)
    side = []
    for n, hop in enumerate(hops):
        label = f"hop {n + 1}: {hop.kind}" if rehearsal else hop.kind
        side.append(f"<h2>{_e(label)}</h2>{_table(facts(hop))}"
                    f"<p class=next><b>What next.</b> {_e(next_steps(hop))}</p>")
    steps = "".join(f"<h2>Steps of {_e(h.run_id)}</h2>{_steps_table(h)}" for h in hops)
    img = base64.b64encode(png).decode()
    cls = "outcome-completed" if outcome == "completed" else "outcome-bad"
    return (f"<!doctype html>\n<html lang=en><head><meta charset=utf-8><title>After-action review: {_e(what)} "
            f"{_e(ids)}</title><style>{STYLE}</style></head><body>"
            f"<h1>After-action review: {_e(what)} <span class={cls}>{_e(outcome)}</span></h1>"
            f"<p class=sub>{_e(ids)}; from {_e(report_mod.iso(hops[0].start))} to {_e(report_mod.iso(hops[-1].end))}"
            f" (UTC)</p><div class=layout><div class=picture><img id=timeline alt=\"timeline: the app's commits per "
            f"second, replication lag, each step, the unavailability windows, the point of no return\" "
            f"src=\"data:image/png;base64,{img}\"></div><div class=side>{''.join(side)}</div></div>"
            f"{_estimate_section(estimate, extra or [])}{steps}</body></html>\n")


# -- around the failovers: restore and the initial sync (rehearsal) ----------------------------------------------
def surroundings(state_dir: Path, hops: list[Hop]) -> list[tuple[str, str]]:
    """The restore before the first hop and the initial sync between the hops, as measured."""
    from .estimate import human_bytes, human_rate

    rows: list[tuple[str, str]] = []
    first = hops[0].start
    restores = [r for r in measure.read_throughput(state_dir) if r.get("what") == "restore" and r["ts"] <= first]
    if restores:
        last = max(r["ts"] for r in restores)
        for r in (r for r in restores if last - r["ts"] < 3600):
            fetch = r.get("fetch_bytes") or 0
            line = (f"{human_bytes(fetch)} base backup in {r.get('fetch_seconds')} s "
                    f"({human_rate(fetch / r['fetch_seconds']) if r.get('fetch_seconds') else 'n/a'})")
            if r.get("replay_bytes") is not None:
                line += (f"; {human_bytes(r['replay_bytes'])} of WAL replayed to a standby taking connections in "
                         f"{r.get('replay_seconds')} s")
            if r.get("database_bytes"):
                line += f"; database {human_bytes(r['database_bytes'])}, {r.get('database_rows', 0):,} rows"
            rows.append((f"restore of {r.get('replica')} ({report_mod.iso(r['ts'])})", line))
    if len(hops) > 1:
        sync = between(state_dir, "replicate-aurora", hops[0].start, hops[1].start)
        if sync is not None:
            ctx = sync.context()
            secs, size = ctx.get("initial_sync_seconds"), ctx.get("initial_sync_bytes")
            line = f"{secs} s" + (f" for {human_bytes(size)} ({ctx.get('initial_sync_rows', 0):,} rows): "
                                  f"{human_rate(size / secs)}" if secs and size else "")
            rows.append((f"initial sync into Aurora ({sync.run_id}, {(sync.outcome() or ('in progress',))[0]})", line))
    return rows


# -- writing it -------------------------------------------------------------------------------------------------
def write(state_dir: Path, run_id: str | None = None, *, html_path: Path | None = None,
          png_path: Path | None = None, state_root: Path | None = None, page_too: bool = True) -> dict[str, str]:
    """Draw the review of ``run_id`` (default: the latest run; both hops when it ended a rehearsal) and write
    the page (default ``<run_dir>/review.html``) and, when asked, the picture alone. Returns the paths."""
    from . import estimate as estimate_mod

    ids = runs_of(state_dir, run_id)
    hops = [load_hop(state_dir, i) for i in ids]
    png = picture(hops)
    written: dict[str, str] = {}
    if png_path is not None:
        Path(png_path).parent.mkdir(parents=True, exist_ok=True)
        Path(png_path).write_bytes(png)
        written["png"] = str(png_path)
    if page_too:
        root = Path(state_root) if state_root is not None else Path(state_dir).parent
        try:
            est = estimate_mod.for_review(root, until=hops[-1].end, stack_dir=Path(state_dir))
        except Exception:  # noqa: BLE001 - the page without the estimate rather than no page
            est = None
        doc = page(hops, png, estimate=est, extra=surroundings(state_dir, hops))
        target = Path(html_path) if html_path is not None else Path(state_dir) / "runs" / ids[-1] / REVIEW_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(doc)
        written["html"] = str(target)
    return written


def write_safely(state_dir: Path, run_id: str) -> dict[str, str]:
    """:func:`write` for ``rehearse``: ``{"html": path}``, or ``{"error": why}`` - a rehearsal that ran is
    never failed by its picture."""
    try:
        return {"html": write(state_dir, run_id)["html"]}
    except Exception as exc:  # noqa: BLE001 - reported on the rehearsal's last line instead
        return {"error": f"the after-action review was not written: {redact(exc)}"}
