"""``invoke verify``: compare two databases; non-zero exit on any difference or anything unchecked."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from invoke import Exit, task
from rich.table import Table

from ..errors import ConfigError
from ..pg import url_endpoint, with_password
from ..redact import redact
from ..secrets import is_reference, resolve
from ..verify import MODES, verify as run_verify
from .common import console, out, outputs, parse_choice, parse_float, parse_int, parse_name, print_json, say, \
    settings, task_errors


def _is_url(name: str) -> bool:
    return name.startswith(("postgres://", "postgresql://"))


def _password(flag: str, ref: str | None) -> str | None:
    if ref is None:
        return None
    if not is_reference(ref):
        # never echo it: it may be the password itself
        raise ConfigError(f"--{flag} takes a credential reference (env:NAME, file:/path#key, "
                          "aws-secretsmanager:ARN[#key], ssm-parameter:NAME), not a value")
    return resolve(ref)


@task(help={"source": "node to read as the reference: source, ec2-a..., aurora, or a postgresql:// URL",
            "target": "node to compare with it (a name, or a postgresql:// URL)",
            "mode": "schema | counts | sample | full (default full)",
            "sample_pct": "percent of rows to sample in sample mode (default from tern.sample_percent)",
            "tables": "comma-separated tables (default: all)", "jobs": "parallel workers (default 2)",
            "chunk_rows": "rows per checksum chunk in full mode (default 50000)",
            "source_password": "the source's password as a credential reference (env:NAME, file:/path#key, "
                               "aws-secretsmanager:ARN[#key], ssm-parameter:NAME); else PGPASSWORD or ~/.pgpass",
            "target_password": "the target's password as a credential reference (as --source-password)",
            "json": "machine-readable result on stdout (nothing else there)",
            "stack": "local (default), a .json outputs file, or a stack; not needed when both are URLs"},
      auto_shortflags=False)
@task_errors
def verify(c, source=None, target=None, mode=None, sample_pct=None, tables=None, jobs=None, chunk_rows=None,
           source_password=None, target_password=None, json=False, stack=None):
    """Compare two databases: schema, counts, a sample, or every row (chunk checksums, bisected to rows).

    Exit 0 only when everything requested was checked and equal; 1 on any difference; 2 on bad input.
    With two postgresql:// URLs no sandbox or stack is needed. Passwords: in --source-password /
    --target-password as references, or from PGPASSWORD / ~/.pgpass; never printed.
    """
    source = parse_name("source", source, required=True)
    target = parse_name("target", target, required=True)
    mode = parse_choice("mode", mode, MODES) or "full"
    s = settings(c)
    pct = parse_float("sample_pct", sample_pct, max=100, above=0)
    pct = s.sample_percent if pct is None else pct
    n_jobs = parse_int("jobs", jobs, min=1, max=64) or 2
    rows = parse_int("chunk_rows", chunk_rows, min=1) or 50_000
    table_list = [t.strip() for t in tables.split(",") if t.strip()] if tables else None
    if tables is not None and not table_list:
        raise ConfigError("--tables names no table")
    src_pw = _password("source-password", source_password)
    dst_pw = _password("target-password", target_password)
    if _is_url(source) and _is_url(target):
        src, dst = source, target          # no sandbox, no stack
    else:
        from ..adapters import app_for
        from ..endpoints import node_url

        o = outputs(c, stack)
        app = app_for(o.app)
        src, dst = node_url(o, app, source), node_url(o, app, target)
    for url in (src, dst):
        url_endpoint(url)                   # a malformed URL is bad input (exit 2), named without its password
    if src_pw is not None:
        src = with_password(src, src_pw)
    if dst_pw is not None:
        dst = with_password(dst, dst_pw)
    source_label, target_label = redact(source), redact(target)
    with table_progress() as progress:
        report = run_verify(src, dst, mode=mode, tables=table_list, sample_percent=pct, jobs=n_jobs,
                            chunk_rows=rows, timeout=s.connect_timeout, progress=progress)
    if json:
        print_json(report.to_json())
    else:
        render(report, source_label, target_label)
    if not report.ok:
        raise Exit(f"tern: verify: {len(report.differences())} differences between {source_label} and "
                   f"{target_label}", code=1)


@contextlib.contextmanager
def table_progress() -> Iterator[Callable[[str, int, int], None]]:
    """``progress(table, chunks_done, chunks)``: bars on a terminal, else a line per table when it is done."""
    if not console.is_terminal:
        def progress(table: str, done: int, total: int) -> None:
            if total and done >= total:
                say(f"verified {table} ({total} chunks)")

        yield progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        ids: dict[str, int] = {}

        def progress(table: str, done: int, total: int) -> None:
            if table not in ids:
                ids[table] = bar.add_task(table, total=total or 1)
            bar.update(ids[table], completed=done if total else 1, total=total or 1)

        yield progress


def render(report, source: str, target: str) -> None:
    table = Table(title=f"verify {report.mode}: {redact(source)} -> {redact(target)}")
    for col in ("table", "source rows", "target rows", "chunks", "checked rows", "result", "seconds"):
        table.add_column(col)
    for t in report.tables:
        result = "equal" if t.ok else ("ERROR" if t.error else f"{len(t.rows) + len(t.problems)} differences")
        table.add_row(t.table, _n(t.source_rows), _n(t.target_rows), str(t.chunks), _n(t.checked_rows), result,
                      f"{t.seconds:.2f}")
    out.print(table)
    for line in report.differences():
        out.print(redact(line), style="red", markup=False, highlight=False)
    out.print(f"{'EQUAL' if report.ok else 'DIFFERENT'} in {report.seconds:.2f}s "
              f"(snapshots: source {report.snapshot.get('source')}, target {report.snapshot.get('target')})")


def _n(v) -> str:
    return "" if v is None else f"{v:,}"
