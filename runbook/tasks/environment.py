"""``invoke outputs`` and ``invoke status``: what the environment is, and what it is doing."""

from __future__ import annotations

from invoke import task
from rich.table import Table

from .. import status as status_mod
from .common import out, outputs, parse_name, print_json, settings, task_errors


@task(name="outputs", help={"stack": "local (the sandbox, default), a .json outputs file, or a Pulumi stack name"})
@task_errors
def show_outputs(c, stack=None):
    """Print the outputs contract of a stack as JSON (credentials are references, shown as such)."""
    print_json(outputs(c, parse_name("stack", stack)).public_dict())


@task(help={"stack": "local (default), a .json outputs file, or a Pulumi stack", "json": "machine-readable output"})
@task_errors
def status(c, stack=None, json=False):
    """Every node's role, timeline, LSN and lag; the app's formation and maintenance; the ledger."""
    o = outputs(c, parse_name("stack", stack))
    data = status_mod.gather(o, timeout=settings(c).connect_timeout)
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
    for n in data["nodes"]:
        if n.get("error"):
            out.print(f"{n['name']}: {n['error']}", style="red", markup=False)
