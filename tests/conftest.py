"""Shared fixtures. Functional tests start real PostgreSQL clusters in /tmp and stop them afterwards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Under pytest-xdist (./dev test runs 2 workers) each worker keeps its runs in a state directory of its own:
# two tests on two workers must never share a run lock or a "current run" pointer. Sandboxes already take
# their own ports (runbook/sandbox/build.py claims them) and directories.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("INVOKE_TERN_STATE_DIR"):
    os.environ["INVOKE_TERN_STATE_DIR"] = tempfile.mkdtemp(prefix=f"tern-state-{os.environ['PYTEST_XDIST_WORKER']}-",
                                                          dir="/tmp")


def _have_postgres() -> bool:
    try:
        from runbook.pg import bindir

        bindir()
        return True
    except Exception:  # noqa: BLE001
        return False


HAVE_PG = _have_postgres()


def pytest_collection_modifyitems(config, items):
    if HAVE_PG:
        return
    skip = pytest.mark.skip(reason="PostgreSQL server binaries not found")
    for item in items:
        if "functional" in item.keywords:
            item.add_marker(skip)


def make_root(prefix: str = "tern-test-") -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    return root


@pytest.fixture
def tmp_root():
    root = make_root()
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def sandbox():
    """A sandbox up with the app writing, shared by one test module."""
    from runbook.sandbox import Sandbox

    root = make_root()
    sb = Sandbox(root / "sandbox")
    sb.up(replicas=2, scale=1, rate=100)
    yield sb
    sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


def run_invoke(*args: str, sandbox_dir: Path | None = None, state_dir: Path | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``invoke ARGS`` in the project as an operator would."""
    env = dict(os.environ)
    if sandbox_dir is not None:
        env["INVOKE_TERN_SANDBOX_DIR"] = str(sandbox_dir)
    if state_dir is not None:
        env["INVOKE_TERN_STATE_DIR"] = str(state_dir)
    invoke = Path(sys.executable).with_name("invoke")
    return subprocess.run([str(invoke), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


# The slowest parametrizations (a failover killed after each of its steps, each rogue client kind)
# run in full with TERN_TESTS=all; by default a representative subset keeps the suite well under
# 30 minutes on 2 cores.
ALL = __import__("os").environ.get("TERN_TESTS") == "all"


def subset(values, keep):
    """``values`` when TERN_TESTS=all, else only those in ``keep`` (in their order)."""
    return list(values) if ALL else [v for v in values if v in keep]
