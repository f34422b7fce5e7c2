"""tern's invoke entry point: only wires the collections (see runbook/tasks/)."""

from runbook.tasks import build_namespace

ns = build_namespace()
