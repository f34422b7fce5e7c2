"""The report of a run: steps, the write-unavailability window, acknowledged writes lost.

JSON keys (stable):

``run_id``, ``kind``, ``outcome`` (completed | fell_back | fallback_failed | failed | in_progress; refused: hop 2's
preflight stopped it, nothing changed), ``reason``,
``candidate``, ``new_leader``, ``steps[]`` (``name``, ``started_at``, ``ended_at``, ``seconds``,
``outcome``, ``detail``), ``downtime`` (``maintenance_at``, ``switched_at``, ``app_started_at``),
``write_unavailability`` (``last_ack_on_source``, ``first_ack_on_target``, ``target``, ``seconds``;
from the app's ledger, sandbox only: the app's unavailability), ``database_unavailability`` (``fenced_at``,
``writable_at``, ``seconds``: the fence to the new database taking writes), ``switch_mode`` (pooler | url),
``client_errors`` and ``longest_held_query_seconds`` (from the ledger, around the window), ``acknowledged_writes``, ``missing_on_target`` (must be 0),
``missing_keys``, ``checked_on``, ``verification`` (the in-window gate), ``verification_full`` (every
row: hop 1 after the switch against a replica held at the final LSN; hop 2 before the freeze against an
EC2 standby held where Aurora's apply stopped), ``repoint_failures``, ``catchup_seconds``.

Every point in time is an ISO 8601 UTC string with milliseconds (``2026-11-27T11:20:31.123Z``);
durations are seconds. The journal keeps epoch seconds; only the report converts them.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .adapters import app_for
from .contract import Outputs
from .errors import ConfigError, RunbookError
from .failover.state import RunState
from .journal import Journal
from .pg import connect, url_endpoint


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds: ``2026-11-27T11:20:31.123Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(float(ts), timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build(journal: Journal, outputs: Outputs | None) -> dict[str, Any]:
    report = _build(journal, outputs)
    for step in report["steps"]:
        step["started_at"], step["ended_at"] = iso(step["started_at"]), iso(step["ended_at"])
    report["downtime"] = {k: iso(v) for k, v in report["downtime"].items()}
    w = report.get("write_unavailability")
    if w:
        w["last_ack_on_source"], w["first_ack_on_target"] = iso(w["last_ack_on_source"]), iso(w["first_ack_on_target"])
    return report


# the figures only the sandbox app's ledger gives; kept in the saved report for when the sandbox is gone
LEDGER_KEYS = ("write_unavailability", "acknowledged_writes", "missing_on_target", "missing_keys", "checked_on",
               "final_ledger_check")


def with_saved_figures(journal: Journal, report: dict[str, Any]) -> dict[str, Any]:
    """``report`` completed with the ledger figures saved at the end of the run (the sandbox may be gone)."""
    path = journal.run_dir / "report.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return report
    merged = dict(report)
    for key in LEDGER_KEYS:
        if saved.get(key) is not None and merged.get(key) in (None, {}):
            merged[key] = saved[key]
    return merged


def _build(journal: Journal, outputs: Outputs | None) -> dict[str, Any]:
    state = RunState.from_journal(journal)
    fallback = next((e for e in journal.events if e["step"] == "run" and e["event"] == "fallback_started"), None)
    outcome = journal.outcome()
    steps = [{"name": s.name, "started_at": s.started_at, "ended_at": s.ended_at,
              "seconds": None if s.started_at is None or s.ended_at is None else round(s.ended_at - s.started_at, 3),
              "outcome": s.outcome or "in progress", "detail": s.detail} for s in journal.steps()]
    report: dict[str, Any] = {
        "run_id": journal.run_id, "kind": journal.kind,
        "outcome": outcome[0] if outcome else ("failed" if any(s["outcome"] == "failed" for s in steps) else "in_progress"),
        "reason": outcome[1] if outcome else "",
        "candidate": state.candidate, "new_leader": state.new_leader,
        "steps": steps,
        "downtime": {"maintenance_at": state.maintenance_at, "switched_at": state.switched_at,
                     "app_started_at": state.started_at},
        "catchup_seconds": state.catchup_seconds,
        "verification": state.verification,
        "verification_full": state.verification_full,
        "repoint_failures": state.repoint_failures or {},
        "switch_mode": state.switch_mode or "url",
        "database_unavailability": database_unavailability(state),
        "write_unavailability": None, "acknowledged_writes": None, "missing_on_target": None, "missing_keys": {},
    }
    # the sandbox app's ledger (also when the Heroku stand-in drives that app)
    if outputs is not None and getattr(outputs.app, "state_dir", None):
        try:
            report.update(ledger_figures(outputs, state, fallback_at=fallback["ts"] if fallback else None))
        except RunbookError as exc:
            report["ledger_error"] = str(exc)
    return report


def database_unavailability(state: RunState) -> dict[str, Any] | None:
    """From the fence to the new database accepting writes: the promotion (hop 1) or the switch-over with the
    reverse replication running (hop 2). The app's own unavailability (``write_unavailability``) adds the
    switch of its endpoint and, in url mode, its dynos' restart."""
    ready = state.promoted_at or state.switched_over_at
    if state.fenced_at is None:
        return None
    return {"fenced_at": state.fenced_at, "writable_at": ready,
            "seconds": round(ready - state.fenced_at, 3) if ready else None}


def ledger_figures(outputs: Outputs, state: RunState, fallback_at: float | None = None) -> dict[str, Any]:
    """From the sandbox app's ledger: the window without acknowledged writes, and writes lost on the target."""
    from .workload import ledger

    entries = [e for e in ledger.read(outputs.app.state_dir)]
    acks = [e for e in entries if e.ev == "ack"]
    source = state.app_endpoint or state.source_endpoint   # pooler mode: the app writes to the pooler throughout
    leader = None
    if state.app_endpoint:
        leader = state.app_endpoint if state.new_leader else None
    elif state.new_leader and state.target_endpoint:
        leader = state.target_endpoint            # hop 2: Aurora (the rollback: the EC2 leader)
    elif state.new_leader:
        r = outputs.replica(state.new_leader)
        leader = f"{r.host}:{r.port}"
    figures: dict[str, Any] = {"acknowledged_writes": len(acks)}
    t_maint = state.maintenance_at or state.fenced_at
    if source and t_maint:
        # the source stopped taking writes at the fence (or, when the run fell back before it, at the
        # latest when the fallback began): the last write acknowledged there came before that moment
        cut = state.fenced_at or fallback_at or t_maint
        before = [e.ts for e in acks if e.endpoint == source and e.ts <= cut]
        last_src = max(before) if before else None
        after_target = leader or source   # fell back: the first write back on the source
        first = [e.ts for e in acks if e.endpoint == after_target and last_src is not None and e.ts > last_src]
        first_tgt = min(first) if first else None
        figures["write_unavailability"] = {
            "last_ack_on_source": last_src, "first_ack_on_target": first_tgt, "target": after_target,
            "seconds": round(first_tgt - last_src, 3) if first_tgt and last_src else None}
        if last_src is not None:
            # what a client saw meanwhile: errors (url mode: refused, restarted), or its query held (pooler mode)
            until = (first_tgt or last_src) + 2.0
            figures["client_errors"] = ledger.errors(entries, since=last_src, until=until)
            held = ledger.held_seconds(entries, since=last_src, until=until)
            figures["longest_held_query_seconds"] = None if held is None else round(held, 3)
    # every acknowledged write must be on the database the app uses now
    app = app_for(outputs.app)
    url = app.config_var(outputs.source.database_url_var)
    if url:
        with connect(url, purpose="report", timeout=5) as conn:
            check = ledger.check(entries, conn, exact=False)
        figures["missing_on_target"] = check.lost
        figures["missing_keys"] = {t: v[:20] for t, v in check.missing.items()}
        figures["checked_on"] = "{}:{}".format(*url_endpoint(url)[:2])
    return figures


def save(journal: Journal, report: dict[str, Any]) -> Path:
    path = journal.run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return path


def load_journal(state_dir: Path, run_id: str | None) -> Journal:
    """A run of the stack whose runs live in ``state_dir/runs`` (the latest when ``run_id`` is None)."""
    runs = Path(state_dir) / "runs"
    run_id = run_id or Journal.latest(state_dir)
    if run_id is None:
        raise ConfigError(f"no run recorded in {runs}")
    path = runs / run_id / "journal.jsonl"
    if not path.exists():
        raise ConfigError(f"no run {run_id!r} in {runs}")
    return Journal.load(state_dir, run_id)
