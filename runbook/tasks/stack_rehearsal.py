"""``invoke rehearse --stack NAME``: the task side (flags, settings, output) of :mod:`runbook.rehearsal_stack`.

No task is defined here: ``invoke rehearse`` (:mod:`.rehearsal`) hands over when ``--stack`` names a stack.
"""

from __future__ import annotations

from invoke import Exit

from ..errors import ConfigError
from ..rehearsal_stack import StackRehearsal, runbook_phases
from ..settings import PROJECT_DIR
from .common import human, parse_name, print_json, say, settings, stack_settings
from .failover import make_confirm, render_report, switch_mode

SANDBOX_ONLY = ("seconds", "scale", "dataset", "rate", "adapters", "boot_seconds")


def rehearse_on_stack(c, stack, *, hops: int, keep: bool, json: bool, switch, yes: bool,
                      sandbox_flags: dict) -> dict:
    """Refuses the sandbox's flags, then runs the rehearsal on ``stack`` and prints its report."""
    stack = parse_name("stack", stack, required=True)
    given = [name for name in SANDBOX_ONLY if sandbox_flags.get(name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(f"{flag} is for the sandbox rehearsal; --stack rehearses on the stack as it is deployed")
    if stack.endswith(".json") or "/" in stack:
        raise ConfigError(f"--stack names a Pulumi rehearsal stack here (such as dev), not an outputs file: {stack!r}")
    base = settings(c)
    s = stack_settings(base, stack).replace(switch_mode=switch_mode(switch))
    show = human(json)
    # plain lines, no live display: the run asks its one question on the terminal, and lasts an hour or so
    quarters: dict[str, int] = {}

    def restoring(name: str, done: int, total: int) -> None:
        q = 4 if total and done >= total else (done * 4 // total if total else 0)
        if quarters.get(name, -1) < q:
            quarters[name] = q
            say(f"restoring {name}: {done / 1048576:.0f} of {total / 1048576:.0f} MiB")

    rehearsal = StackRehearsal(stack, PROJECT_DIR, s, runbook_phases(s, progress=say, byte_progress=restoring),
                               hops=hops, keep=keep, confirm=make_confirm(yes, base.confirm_timeout), progress=say)
    report = rehearsal.run()
    if report.get("run_id"):     # the after-action review (runbook/review.py), as the sandbox rehearsal writes it
        from ..review import write_safely

        report["review"] = write_safely(s.state_dir, report["run_id"])
    if json:
        print_json(report)
    for r in ([report["failover_ec2"]] if report.get("failover_ec2") else []) + [report]:
        render_report(r, show)
    torn = "left up (--keep): `invoke teardown --stack " + stack + " --yes` when done" if rehearsal.keep \
        else ("torn down after the app went back on its source (its writes since hop 1 were discarded with the "
              f"stack): {(report.get('teardown') or {}).get('detail') or 'pulumi destroy done'}")
    show.print(f"rehearsal on stack {stack}: report saved in {rehearsal.report_path}; the stack was {torn}",
               markup=False)
    if report.get("missing_on_target") or (report.get("failover_ec2") or {}).get("missing_on_target"):
        raise Exit("tern: error: acknowledged writes are missing", code=1)
    say(f"`invoke report --stack {stack} --run {report.get('run_id')}` shows it again; after-action review: "
        f"{(report.get('review') or {}).get('html') or (report.get('review') or {}).get('error')}")
    return report
