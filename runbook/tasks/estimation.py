"""``invoke estimate``: how long each phase of the real migration takes, from the rehearsals' measurements."""

from __future__ import annotations

from invoke import task
from rich.table import Table
from rich.text import Text

from .. import estimate as estimate_mod
from .common import human, parse_name, print_json, settings, task_errors


@task(help={"size": "the real database's size: 1.4TB, 500GB, 1.4TiB (required)",
            "write_rate": "the real app's commits per second at the migration's hour (required)",
            "json": "print the estimate as JSON on stdout",
            "stack": "only the runs of this stack (default: every stack's under the state directory)",
            "network": "the replicas' network: 10Gbit, 1.25GB/s, or MB/s (default 5Gbit: r6i.4xlarge's baseline)",
            "disk": "the data volume's throughput (default 500MB/s: gp3 as infra/replicas.py makes it)",
            "backup_age": "how old the base backup is when the restore starts: 24h, 90min (default 24h)",
            "archive_latency": "seconds the cutover's last WAL segment takes through S3 (default 3)",
            "cpu_factor": "how much faster the real hosts run the CPU-bound phases than the rehearsal's (default 1)",
            "wal_per_commit": "WAL bytes a commit of the real app writes: 2KiB, 1500 (default: the rehearsal's)",
            "restore_rate": "base backup fetch rate (default: measured by the rehearsal's restore)",
            "replay_rate": "WAL replay rate (default: measured)",
            "sync_rate": "initial sync into Aurora, database bytes per second (default: measured)",
            "verify_rate": "full verification, database bytes per second (default: measured)"},
      auto_shortflags=False)
@task_errors
def estimate(c, size=None, write_rate=None, json=False, stack=None, network=None, disk=None, backup_age=None,
             archive_latency=None, cpu_factor=None, wal_per_commit=None, restore_rate=None, replay_rate=None,
             sync_rate=None, verify_rate=None):
    """Every phase of the real night - restore, catch-up, initial sync, full verifications, both windows -
    extrapolated from the throughputs the rehearsals measured, each figure with its assumption and the run
    it came from.

    With no rehearsal recorded the figures come from tern's documented defaults, and every line says so
    (basis: defaults); exit 0 either way. Exit 2 on a bad flag. The arguments are kept in
    <state_dir>/estimate.json: the after-action review (`invoke report --html`) shows the same estimate.
    """
    flags = {"network": network, "disk": disk, "backup_age": backup_age, "archive_latency": archive_latency,
             "cpu_factor": cpu_factor, "wal_per_commit": wal_per_commit, "restore_rate": restore_rate,
             "replay_rate": replay_rate, "sync_rate": sync_rate, "verify_rate": verify_rate}
    n, rate, assumptions = estimate_mod.arguments(size, write_rate, **flags)
    stack = parse_name("stack", stack)
    s = settings(c)
    stack_dir = s.stack_state_dir(stack) if stack else None
    measured = estimate_mod.gather(s.state_dir, stack_dir=stack_dir)
    result = estimate_mod.estimate(n, rate, measured, assumptions)
    estimate_mod.save_arguments(s.state_dir, {"size": size, "write_rate": write_rate, **flags})
    if json:
        print_json(result)
        return
    render(result, human(False))


def render(result, show) -> None:
    table = Table(title=f"the real night: {result['size']} at {result['write_rate']:g} commits/s "
                        f"(WAL {result['wal_bytes_per_second'] / 1e6:.3g} MB/s; basis: {result['basis']})")
    for col in ("phase", "estimate", "measured in the rehearsal", "assumption", "from"):
        table.add_column(col, overflow="fold")
    for p in result["phases"]:
        table.add_row(Text(p["phase"]), estimate_mod.human_seconds(p["seconds"]), Text(p.get("measured") or ""),
                      Text(p["assumption"]), Text(p["source"]))
    show.print(table)
    for w in result["warnings"]:
        show.print(f"warning: {w}", style="yellow", markup=False)
