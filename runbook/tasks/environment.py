"""``invoke outputs`` and ``invoke status``: what the environment is, and what it is doing."""

from __future__ import annotations

from invoke import task
from rich.table import Table

from .. import status as status_mod
from .common import out, outputs, parse_name, print_json, settings, stack_settings, task_errors


@task(name="outputs", help={"stack": "local (the sandbox, default), a .json outputs file, or a Pulumi stack name"})
@task_errors
def show_outputs(c, stack=None):
    """Print the outputs contract of a stack as JSON (credentials are references, shown as such)."""
    print_json(outputs(c, parse_name("stack", stack)).public_dict())


@task(help={"stack": "local (default), a .json outputs file, or a Pulumi stack", "json": "machine-readable output"})
@task_errors
def status(c, stack=None, json=False):
    """Every node's role, timeline, LSN and lag; the app's formation and maintenance; the ledger; replication
    into Aurora (per-table state, lag from the EC2 leader's current LSN, apply rate against write rate)."""
    stack = parse_name("stack", stack)
    o = outputs(c, stack)
    s = stack_settings(settings(c), stack)
    data = status_mod.gather(o, timeout=s.connect_timeout, sample_seconds=s.apply_sample_seconds,
                             state_dir=s.state_dir)
    if json:
        print_json(data)
        return
    render(data)


def render(data, out=out) -> None:
    table = Table(title=f"tern status - stack {data['stack']}")
    for col in ("node", "kind", "zone", "role", "TL", "LSN", "lag bytes", "lag s", "upstream", "last segment"):
        table.add_column(col)
    for n in data["nodes"]:
        role = (n["role"] or "") + (" (fenced)" if n.get("fenced") else "")
        table.add_row(n["name"], n["kind"], n.get("availability_zone") or "", role,
                      str(n.get("timeline") or ""), n.get("lsn") or "",
                      "" if n.get("lag_bytes") is None else f"{n['lag_bytes']:,}",
                      "" if n.get("lag_seconds") is None else f"{n['lag_seconds']:.1f}",
                      n.get("upstream") or "", n.get("last_segment") or "")
    out.print(table)
    a = data["app"]
    out.print(f"app {a['name']}: database {a['database_endpoint']}, maintenance {'on' if a['maintenance'] else 'off'}, "
              f"formation {a['formation']}, running {a['running']}")
    if data["ledger"] is not None:
        out.print(f"ledger: {data['ledger']['acknowledged']} acknowledged writes, {data['ledger']['in_doubt']} in doubt")
    render_replication(data.get("replication"), out)
    render_pooler(data.get("pooler"), out)
    for n in data["nodes"]:
        if n.get("error"):
            out.print(f"{n['name']}: {n['error']}", style="red", markup=False)


def render_pooler(p, out=out) -> None:
    if not p:
        return
    out.print(f"pooler {p['endpoint']} ({'the app writes through it' if p['app_uses_it'] else 'the app does not use it'})",
              markup=False)
    for n in p["nodes"]:
        if n.get("error"):
            out.print(f"  {n['node']}: {n['error']}", style="red", markup=False)
        else:
            out.print(f"  {n['node']}: -> {n.get('target')}, {'PAUSED' if n.get('paused') else 'running'}, clients "
                      f"{n.get('clients_active')} active / {n.get('clients_waiting')} waiting (longest "
                      f"{n.get('longest_wait_seconds', 0):.1f} s), servers {n.get('servers_active')} active / "
                      f"{n.get('servers_idle')} idle", markup=False)


def render_replication(rep, out=out) -> None:
    if not rep:
        return
    head = f"replication into Aurora ({rep['engine']}"
    head += f", from {rep['leader']}): " if rep.get("leader") else "): "
    out.print(head + rep["state"] + (f" - {rep['note']}" if rep.get("note") else ""), markup=False)
    if rep.get("error"):
        out.print(f"replication: {rep['error']}", style="red", markup=False)
    tables = rep.get("tables") or {}
    if tables:
        table = Table(title=f"Aurora tables: {rep['tables_ready']} of {rep['tables_total']} ready")
        table.add_column("table")
        table.add_column("state")
        from ..replication.native import STATES

        done = "Table completed" if rep.get("engine") == "dms" else "r"
        shown = sorted(tables.items(), key=lambda kv: (kv[1] == done, kv[0]))
        for name, state in shown[:40]:
            table.add_row(name, state if rep.get("engine") == "dms" else f"{state} ({STATES.get(state, '?')})")
        out.print(table)
        if len(shown) > 40:
            out.print(f"... and {len(shown) - 40} more tables ready", markup=False)
    task = rep.get("task")
    if task:
        out.print(f"DMS task {task['status']}" + (f" ({task['stop_reason']})" if task.get("stop_reason") else "")
                  + f": full load {task.get('full_load_percent') or 0}%, {task.get('tables_loaded') or 0} tables loaded, "
                    f"{task.get('tables_errored') or 0} errored", markup=False)
    summary = (rep.get("validation") or {}).get("summary")
    if summary:
        out.print(f"DMS validation: {summary['validated']} tables validated, {summary['failed_records']:,} failed, "
                  f"{summary['suspended_records']:,} suspended, {summary['pending_records']:,} pending records",
                  markup=False)
    if rep.get("lag_bytes") is not None:
        secs = "?" if rep.get("lag_seconds") is None else f"{rep['lag_seconds']:.2f} s"
        out.print(f"lag behind {rep['leader']}'s current LSN {rep['leader_lsn']}: {rep['lag_bytes']:,} bytes, {secs} "
                  f"(Aurora confirmed {rep['confirmed_lsn']})", markup=False)
    if rep.get("sample_seconds") is not None:
        ratio = "n/a (nothing written)" if rep.get("headroom") is None else f"{rep['headroom']:.2f}x"
        out.print(f"over {rep['sample_seconds']:.1f} s: the leader wrote {rep['write_bytes_per_second']:,.0f} B/s, "
                  f"Aurora applied {rep['apply_bytes_per_second']:,.0f} B/s (headroom {ratio}"
                  f"{', caught up' if rep.get('caught_up') else ''})", markup=False)
