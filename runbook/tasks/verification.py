"""``invoke verify``: compare two databases; non-zero exit on any difference or anything unchecked."""

from __future__ import annotations

from invoke import Exit, task
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..adapters import app_for
from ..endpoints import node_url
from ..errors import ConfigError
from ..verify import MODES, verify as run_verify
from .common import console, out, outputs, print_json, settings, task_errors


@task(help={"source": "node to read as the reference: source, ec2-a..., aurora, or a postgresql:// URL",
            "target": "node to compare with it", "mode": "schema | counts | sample | full (default full)",
            "sample_pct": "percent of rows to sample in sample mode (default from tern.sample_percent)",
            "tables": "comma-separated tables (default: all)", "jobs": "parallel workers (default 2)",
            "chunk_rows": "rows per checksum chunk in full mode (default 50000)",
            "json": "machine-readable result", "stack": "local (default), a .json outputs file, or a stack"})
@task_errors
def verify(c, source=None, target=None, mode="full", sample_pct=None, tables=None, jobs=2, chunk_rows=50000,
           json=False, stack=None):
    """Compare two databases: schema, counts, a sample, or every row (chunk checksums, bisected to rows).

    Exit 0 only when everything requested was checked and equal; 1 on any difference; 2 on bad input.
    """
    if not source or not target:
        raise ConfigError("both --source and --target are required")
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    s = settings(c)
    o = outputs(c, stack)
    app = app_for(o.app)
    src, dst = node_url(o, app, source), node_url(o, app, target)
    table_list = [t.strip() for t in tables.split(",") if t.strip()] if tables else None
    pct = float(sample_pct) if sample_pct is not None else s.sample_percent
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        ids: dict[str, int] = {}

        def progress(table: str, done: int, total: int) -> None:
            if table not in ids:
                ids[table] = bar.add_task(table, total=total or 1)
            bar.update(ids[table], completed=done if total else 1, total=total or 1)

        report = run_verify(src, dst, mode=mode, tables=table_list, sample_percent=pct, jobs=int(jobs),
                            chunk_rows=int(chunk_rows), timeout=s.connect_timeout, progress=progress)
    if json:
        print_json(report.to_json())
    else:
        render(report, source, target)
    if not report.ok:
        raise Exit(f"tern: verify: {len(report.differences())} differences between {source} and {target}", code=1)


def render(report, source: str, target: str) -> None:
    table = Table(title=f"verify {report.mode}: {source} -> {target}")
    for col in ("table", "source rows", "target rows", "chunks", "checked rows", "result", "seconds"):
        table.add_column(col)
    for t in report.tables:
        result = "equal" if t.ok else ("ERROR" if t.error else f"{len(t.rows) + len(t.problems)} differences")
        table.add_row(t.table, _n(t.source_rows), _n(t.target_rows), str(t.chunks), _n(t.checked_rows), result,
                      f"{t.seconds:.2f}")
    out.print(table)
    for line in report.differences():
        out.print(line, style="red", markup=False, highlight=False)
    out.print(f"{'EQUAL' if report.ok else 'DIFFERENT'} in {report.seconds:.2f}s "
              f"(snapshots: source {report.snapshot.get('source')}, target {report.snapshot.get('target')})")


def _n(v) -> str:
    return "" if v is None else f"{v:,}"
