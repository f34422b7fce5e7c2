"""The CLI as an operator meets it, without PostgreSQL: bad input, settings from the environment,
flags, run state per stack, reports with ISO timestamps (every task run as a subprocess)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runbook.journal import Journal
from runbook.settings import Settings
from tests.unit.test_contract import GOOD

ROOT = Path(__file__).resolve().parents[2]
INVOKE = str(Path(sys.executable).with_name("invoke"))
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("INVOKE_TERN_")}
    full.update(env or {})
    return subprocess.run([INVOKE, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def dirs(tmp_path):
    """A sandbox dir with nothing in it and a state dir of our own: no test touches the repo's."""
    return {"INVOKE_TERN_SANDBOX_DIR": str(tmp_path / "sandbox"), "INVOKE_TERN_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture
def stack_file(tmp_path):
    path = tmp_path / "dev-outputs.json"
    path.write_text(json.dumps(GOOD))
    return path


def assert_bad_input(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit 2, one line on stderr naming the problem, nothing on stdout, no traceback."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-1500:])
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr[-1500:]
    assert lines[0].startswith("tern: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines
    assert res.stdout == ""


@pytest.mark.parametrize("args, needle", [
    (["sandbox.up", "--rate", "abc"], "--rate must be a number, got 'abc'"),
    (["sandbox.up", "--rate", "0"], "--rate must be greater than 0"),
    (["sandbox.up", "--rate", "nan"], "--rate must be a finite number"),
    (["sandbox.up", "--scale", "0"], "--scale must be between 1 and"),
    (["sandbox.up", "--scale", "1.5"], "--scale must be an integer"),
    (["sandbox.up", "--replicas", "abc"], "--replicas must be an integer, got 'abc'"),
    (["sandbox.up", "--replicas", "1"], "replicas must be between 2"),
    (["sandbox.up", "--dataset", "northwind"], "unknown dataset 'northwind'"),
    (["rehearse", "--seconds", "-1"], "--seconds must be between 0"),
    (["rehearse", "--seconds", "abc"], "--seconds must be a number"),
    (["rehearse", "--seconds", "inf"], "--seconds must be a finite number"),
    (["rehearse", "--rate", "abc"], "--rate must be a number"),
    (["rehearse", "--scale", "0"], "--scale must be between 1 and"),
    (["rehearse", "--dataset", "x"], "unknown dataset 'x'"),
    # a bad flag is named before any look at the environment (here: no sandbox up)
    (["failover-ec2", "--switch", "dns"], "--switch is pooler or url, not 'dns'"),
    (["failover-ec2", "--switch", "dns", "--dry-run"], "--switch is pooler or url, not 'dns'"),
    (["failover-aurora", "--switch", "dns"], "--switch is pooler or url, not 'dns'"),
    (["rehearse", "--switch", "dns"], "--switch is pooler or url, not 'dns'"),
    (["report", "--run", "../../etc"], "--run must be a run id"),
    (["report", "--run", "failover-ec2-1-1"], "no run 'failover-ec2-1-1'"),
    (["outputs", "--stack", ""], "--stack must be a non-empty name"),
    (["teardown"], "--stack is required"),
    (["status", "--nope"], "unknown task or flag '--nope'"),
    (["sandbox.up", "--rate"], "--rate needs a value"),
    (["no-such-task"], "unknown task or flag 'no-such-task'"),
])
def test_bad_flags_exit_2_with_one_line(dirs, args, needle):
    assert_bad_input(cli(*args, env=dirs), needle)


def test_bad_stack_files_exit_2_with_one_line(dirs, tmp_path, stack_file):
    (tmp_path / "torn.json").write_text('{"schema_version": 1, ')
    assert_bad_input(cli("status", "--stack", str(tmp_path / "torn.json"), env=dirs), "is not valid JSON")
    bad = copy.deepcopy(GOOD)
    del bad["source"]
    bad["aurora"]["passwrod"] = "x"
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    for task in ("status", "outputs", "restore", "failover-ec2", "report"):
        res = cli(task, "--stack", str(tmp_path / "bad.json"), env=dirs)
        if task == "report":   # reads the journal first: there is none for this stack
            assert_bad_input(res, "no run recorded in")
            continue
        # every field at fault, on one line
        assert_bad_input(res, "source: Field required", "aurora.passwrod: Extra inputs are not permitted")
    assert_bad_input(cli("restore", "--stack", str(tmp_path / "missing.json"), env=dirs), "does not exist")
    # a candidate that is not in the stack is refused before anything is reached
    assert_bad_input(cli("failover-ec2", "--stack", str(stack_file), "--candidate", "ec2-z", "--dry-run", env=dirs),
                     "unknown replica 'ec2-z'")


def test_bad_settings_from_the_environment_exit_2_naming_the_variable(dirs):
    for var, value in (("INVOKE_TERN_REPLICAS", "abc"), ("INVOKE_TERN_RESTORE_TIMEOUT", "-3"),
                       ("INVOKE_TERN_FLUSH_MODE", "sideways"), ("INVOKE_TERN_SAMPLE_PERCENT", "500")):
        res = cli("status", env={**dirs, var: value})
        assert_bad_input(res, var)
    assert_bad_input(cli("status", env={**dirs, "INVOKE_TERN_REPLICA": "3"}), "unknown setting INVOKE_TERN_REPLICA")


# -- settings: every field declared to invoke, each reachable through INVOKE_TERN_<KEY> ----------------
TEST_VALUES = {
    "sandbox_dir": "/tmp/tern-test-sandbox", "state_dir": "/tmp/tern-test-state", "pg_bindir": "/opt/pg/bin",
    "replicas": "3", "scale": "2", "dataset": "chinook", "app_rate": "250.5",
    "connect_timeout": "7", "restore_timeout": "901", "catchup_timeout": "121", "stop_app_timeout": "31",
    "promote_timeout": "61", "repoint_timeout": "62", "smoke_timeout": "33", "poll_interval": "0.2",
    "max_lag_bytes": "1048576", "sample_percent": "12.5", "flush_mode": "archive_timeout",
    "max_slot_wal_keep_size": "512MB", "switch_mode": "url", "pause_timeout": "4.5", "confirm_timeout": "30", "resume_max_age": "3600",
    "gate_sample_rows": "750", "gate_sample_timeout": "3.5", "full_verification": "skip",
    "min_apply_headroom": "2.5", "apply_sample_seconds": "1.5",
}


def test_every_setting_is_overridable_from_the_environment(monkeypatch):
    from invoke import Config, Context

    from runbook.tasks import build_namespace
    from runbook.tasks.common import settings

    fields = {f.name: f for f in dataclasses.fields(Settings)}
    assert set(TEST_VALUES) == set(fields), "give every setting a test value"
    for k in [k for k in os.environ if k.startswith("INVOKE_TERN_")]:
        monkeypatch.delenv(k)
    for name, value in TEST_VALUES.items():
        monkeypatch.setenv(f"INVOKE_TERN_{name.upper()}", value)
    config = Config(project_location=str(ROOT))
    config.load_project()
    config.load_collection(build_namespace().configuration())
    config.load_shell_env()
    s = settings(Context(config=config))
    expected = Settings.from_mapping(TEST_VALUES)
    for name in fields:
        assert getattr(s, name) == getattr(expected, name) != getattr(Settings(), name), name


def test_an_environment_setting_reaches_a_task(dirs, tmp_path):
    """Through the real CLI: restore_timeout was silently ignored before (invoke knew no such key)."""
    res = cli("status", env={**dirs, "INVOKE_TERN_RESTORE_TIMEOUT": "0"})
    assert_bad_input(res, "tern.restore_timeout must be a positive number", "INVOKE_TERN_RESTORE_TIMEOUT")


def test_every_setting_is_read_somewhere():
    sources = [p.read_text() for d in ("runbook", "bench") for p in (ROOT / d).rglob("*.py")
               if p.name != "settings.py"]
    for f in dataclasses.fields(Settings):
        assert any(re.search(rf"\.{f.name}\b", text) for text in sources), f"nothing reads tern.{f.name}"


def test_no_short_flags():
    """Auto-generated short flags meant different things in different tasks (-s: stack, scale, seconds)."""
    from runbook.tasks import all_tasks, build_namespace

    for t in all_tasks(build_namespace()):
        for arg in t.get_arguments():
            assert all(len(n) > 1 for n in arg.names), (t.name, arg.names)
    res = cli("--help", "rehearse")
    assert res.returncode == 0 and not re.search(r"^\s+-[a-z][ ,]", res.stdout, re.M), res.stdout


# -- run state: absolute, per stack; reports with ISO 8601 UTC ------------------------------------------
def test_state_dir_is_absolute_next_to_tasks_py():
    from runbook.settings import PROJECT_DIR

    assert PROJECT_DIR == ROOT and (ROOT / "tasks.py").exists()
    assert Settings().state_dir == ROOT / ".tern" and Settings().sandbox_dir == ROOT / ".sandbox"
    assert Settings.from_mapping({"state_dir": "elsewhere"}).state_dir == ROOT / "elsewhere"
    s = Settings(state_dir=Path("/srv/tern"))
    assert s.stack_state_dir(None) == s.stack_state_dir("local") == Path("/srv/tern/local")
    assert s.stack_state_dir("dev") == Path("/srv/tern/dev")
    one, two = s.stack_state_dir("/a/outputs.json"), s.stack_state_dir("/b/outputs.json")
    assert one.parent == s.state_dir and one.name.startswith("outputs-") and one != two


def fake_run(stack_dir: Path, candidate: str = "ec2-a") -> Journal:
    j = Journal.create(stack_dir, "failover-ec2", requested_candidate=None, stack="dev")
    j.record("preflight", "start")
    j.record("preflight", "done", detail=f"candidate {candidate} [x]", context={"candidate": candidate})
    j.record("maintenance_on", "start")
    j.record("maintenance_on", "done", context={"maintenance_at": 1795778431.123456})
    j.finish("fell_back", "fence: the source is unreachable")
    return j


def test_report_finds_the_stacks_runs_from_anywhere_and_prints_iso_timestamps(dirs, tmp_path, stack_file):
    state = Path(dirs["INVOKE_TERN_STATE_DIR"])
    j = fake_run(Settings(state_dir=state).stack_state_dir(str(stack_file)))
    other = fake_run(Settings(state_dir=state).stack_state_dir("local"), candidate="ec2-b")
    # from a subdirectory: invoke finds tasks.py above it, and the runs are where they were
    res = cli("report", "--stack", str(stack_file), "--json", env=dirs, cwd=ROOT / "tests")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["run_id"] == j.run_id and data["candidate"] == "ec2-a" and data["outcome"] == "fell_back"
    assert [s["name"] for s in data["steps"]] == ["preflight", "maintenance_on"]
    for step in data["steps"]:
        assert ISO.match(step["started_at"]) and ISO.match(step["ended_at"]), step
    assert data["downtime"]["maintenance_at"] == "2026-11-27T11:20:31.123Z"
    assert data["downtime"]["switched_at"] is None
    res = cli("report", "--json", env=dirs)   # the sandbox's runs (stack local), though it is gone
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["run_id"] == other.run_id and json.loads(res.stdout)["candidate"] == "ec2-b"
    text = cli("report", "--stack", str(stack_file), env=dirs)
    assert text.returncode == 0, text.stderr
    assert "2026-11-27T11:20:31.123Z" in text.stdout and "candidate ec2-a [x]" in text.stdout
    assert "1795778431" not in text.stdout


def test_outputs_prints_only_json(dirs, stack_file):
    res = cli("outputs", "--stack", str(stack_file), env=dirs)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["stack"] == "dev"


# -- the README, as typed ---------------------------------------------------------------------------
def test_readme_failover_steps_are_the_plans():
    from runbook.failover import ec2

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Failover 1"):readme.index("`invoke report --json` keys")]
    steps = sorted((int(n), name) for n, name in re.findall(r"(\d+)\. \*\*(\w+)\*\*", section))
    assert [n for n, _ in steps] == list(range(1, len(steps) + 1)), steps
    assert [name for _, name in steps] == ec2.STEP_NAMES


def test_readme_commands_run_as_typed():
    readme = (ROOT / "README.md").read_text()
    assert readme.startswith("# tern\n\n```sh\n./dev rehearse ")
    assert "\n./dev test " in readme.split("```")[1]
    blocks = readme.split("```")[1::2]
    bare = [line for block in blocks for line in block.splitlines() if line.startswith("invoke ")]
    assert not bare, f"`invoke` is only on PATH inside the virtualenv: {bare}"
    res = subprocess.run(["./dev", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "failover-ec2" in res.stdout, res.stderr[-1500:]
