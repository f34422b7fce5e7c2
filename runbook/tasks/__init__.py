"""The invoke task layer: flags, config, output. Domain errors become ``invoke.Exit`` here, and only here."""

from __future__ import annotations

import re

from invoke import Collection, Exit
from invoke.exceptions import ParseError
from invoke.program import Program

from ..settings import Settings
from . import drill, environment, estimation, failover, hop2, infrastructure, rehearsal, sandbox, verification


def build_namespace() -> Collection:
    ns = Collection()
    ns.add_collection(Collection.from_module(sandbox), name="sandbox")
    for module in (drill, environment, estimation, failover, hop2, infrastructure, rehearsal, verification):
        for t in Collection.from_module(module).tasks.values():
            ns.add_task(t)
    # Short flags are not generated: from first letters they meant different things in different
    # tasks (-s: --stack, --scale, --seconds, --source). Every flag is spelled out.
    for t in all_tasks(ns):
        t.auto_shortflags = False
    # Every setting declared, so that each INVOKE_TERN_<KEY> reaches it (invoke ignores a variable
    # whose key it does not know); the values are None: Settings holds the defaults and checks types.
    ns.configure({"tern": Settings.invoke_defaults()})
    _parse_errors_exit_2()
    return ns


def all_tasks(ns: Collection):
    yield from ns.tasks.values()
    for sub in ns.collections.values():
        yield from all_tasks(sub)


def _parse_errors_exit_2() -> None:
    """An unknown task or flag, or a flag without its value, is bad input: exit 2 (invoke exits 1,
    which tern keeps for a difference found or a failover that fell back)."""
    if getattr(Program.parse_tasks, "_tern", False):
        return
    original = Program.parse_tasks

    def parse_tasks(self) -> None:
        try:
            original(self)
        except ParseError as exc:
            raise Exit(f"tern: error: {_parse_message(exc)}", code=2) from None

    parse_tasks._tern = True  # type: ignore[attr-defined]
    Program.parse_tasks = parse_tasks  # type: ignore[method-assign]


def _parse_message(exc: ParseError) -> str:
    text = str(exc)
    m = re.match(r"No idea what '(.*)' is!", text)
    if m:
        return f"unknown task or flag {m.group(1)!r} (see `invoke --list` and `invoke --help <task>`)"
    m = re.match(r"Flag <Argument: (\w+)[^>]*> needed value", text)
    if m:
        return f"--{m.group(1).replace('_', '-')} needs a value"
    return text
