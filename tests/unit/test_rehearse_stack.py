"""``invoke rehearse --stack dev`` (runbook/rehearsal_stack.py) with no account reachable.

The ``pulumi`` CLI is faked at the process boundary (a script on PATH that logs its arguments and answers
from a scenario file); the hosts' first-boot check goes through the real SSM adapter
(:class:`~runbook.adapters.ssm_host.SsmHost`) under botocore's Stubber, which also checks that it asks the
instances the outputs name. The phases after the stack is up (restore, the failovers, replication into
Aurora) are the runbook's own entry points, tested against real PostgreSQL elsewhere; here they are
recorders in the same log as pulumi, so the order of everything - and what happens when one fails - is
asserted from one list. The rehearsal app is the real Heroku adapter against the Heroku stand-in
(runbook/standins/heroku.py): the failover recorders move its DATABASE_URL as the real switches do (and
journal their fence), ``app-back`` moves it back; lifting the fence on the source (a real PostgreSQL
elsewhere) and deleting the snapshots (moto, below) are recorders here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.stub import ANY, Stubber

from runbook.adapters.heroku_app import HerokuApp
from runbook.adapters.ssm_host import SsmHost
from runbook.errors import ConfigError, PreflightError, RunbookError, StepError
from runbook.journal import Journal
from runbook.rehearsal_stack import KIND, Phases, StackRehearsal
from runbook.settings import Settings
from runbook.standins.heroku import HerokuStandIn, MemoryBackend, endpoint

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = json.loads((ROOT / "examples" / "outputs.example.json").read_text())
WALG_SHA256 = "93f1d5f2a78f14eda725ed8214446efa27487877abecd2fcec0ba7d97a3b6680"   # a stand-in: the tests install nothing
SOURCE_URL = "postgres://u:heroku-db-secret@ec2-1.compute-1.amazonaws.com:5432/d"
HOSTS = [("ec2-a", "i-0aaaaaaaaaaaaaaa1"), ("ec2-b", "i-0bbbbbbbbbbbbbbb2"),
         ("pooler-a", "i-0ccccccccccccccc3"), ("pooler-b", "i-0ddddddddddddddd4")]

FAKE = """#!/bin/sh
# a stand-in for the pulumi CLI: logs its arguments, answers from the scenario's files ($FAKE_PULUMI_DIR)
line="$*"
echo "$line" >> "$FAKE_PULUMI_LOG"
d=$FAKE_PULUMI_DIR
if [ -s "$d/fail" ]; then
  while IFS='|' read -r prefix message; do
    case "$line" in "$prefix"*) echo "$message" >&2; exit 1 ;; esac
  done < "$d/fail"
fi
case "$line" in
  "stack output"*) cat "$d/outputs.json" ;;
  "config "*) cat "$d/config.json" ;;
  "stack export"*) cat "$d/export.json" ;;
  up*|destroy*|preview*) echo "Updating ($line)" ;;
esac
exit 0
"""

RESOURCES = ([{"type": "pulumi:pulumi:Stack"}, {"type": "pulumi:providers:aws"}]
             + [{"type": "aws:ec2/instance:Instance"}] * 4 + [{"type": "aws:rds/cluster:Cluster"}])


def cli_config(project: Path) -> dict:
    """What ``pulumi config --json`` prints for the stack file (secrets blinded, as without --show-secrets)."""
    data = yaml.safe_load((project / "Pulumi.dev.yaml").read_text())["config"]
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and set(value) == {"secure"}:
            out[key] = {"secret": True}
        elif isinstance(value, (dict, list)):
            out[key] = {"value": json.dumps(value), "objectValue": value, "secret": False}
        else:
            out[key] = {"value": str(value).lower() if isinstance(value, bool) else str(value), "secret": False}
    return out


class World:
    """A project directory, the fake CLI on PATH, the scenario it answers from, and the shared log."""

    def __init__(self, tmp_path: Path, monkeypatch) -> None:
        self.project = tmp_path / "project"
        self.project.mkdir()
        committed = (ROOT / "Pulumi.dev.yaml").read_text().replace(
            "AAABAKEPLACEHOLDERxSetWithPulumiConfigSetSecret", "v1:c2FsdA==:ZW5jcnlwdGVkIGJ5IHB1bHVtaQ==")
        (self.project / "Pulumi.dev.yaml").write_text(committed + f"  tern:walg_sha256: {WALG_SHA256}\n")
        (self.project / "Pulumi.prod.yaml").write_text((ROOT / "Pulumi.prod.yaml").read_text())
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "pulumi").write_text(FAKE)
        (bin_dir / "pulumi").chmod(0o755)
        self.log = tmp_path / "calls.log"
        self.dir = tmp_path / "scenario"
        self.dir.mkdir()
        self.scenario = {"outputs": EXAMPLE, "config": cli_config(self.project), "resources": RESOURCES, "fail": {}}
        self.save()
        self.env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_PULUMI_LOG": str(self.log),
                    "FAKE_PULUMI_DIR": str(self.dir), "HEROKU_API_KEY": "not-a-real-key"}
        for k, v in self.env.items():
            monkeypatch.setenv(k, v)
        self.state = tmp_path / "state" / "dev"
        self.failing: dict[str, BaseException] = {}
        self.heroku = HerokuStandIn(MemoryBackend({"DATABASE_URL": SOURCE_URL}, {"web": 1}), app="shop-staging",
                                    key=self.env["HEROKU_API_KEY"], boot_seconds=0.01, grace_seconds=0.05)
        self.unfence_error: BaseException | None = None

    def app_for(self, app) -> HerokuApp:
        """The real adapter against the stand-in; each config-var change is logged (hosts only, no secret)."""
        world = self

        class Logged(HerokuApp):
            def set_config_vars(self, changes):
                if changes:
                    world.record("app " + " ".join(f"{k}={'-' if v is None else endpoint(v)[0]}"
                                                   for k, v in sorted(changes.items())))
                super().set_config_vars(changes)

        return Logged(app.name, api_key_ref=app.api_key, base_url=self.heroku.url, sleep=lambda s: None,
                      stop_grace=0.05, stop_margin=0.05, poll_interval=0.01)

    def unfence(self, url: str, previous_limit: int) -> None:
        self.record(f"unfence {endpoint(url)[0]} limit {previous_limit}")
        if self.unfence_error is not None:
            raise self.unfence_error

    def delete_snapshots(self, labels, region):
        self.record(f"delete snapshots {' '.join(labels)} in {region}")
        return {"ebs": [f"snap-{i}" for i, _ in enumerate(labels)], "aurora": []}

    def save(self) -> None:
        (self.dir / "outputs.json").write_text(json.dumps(self.scenario["outputs"]))
        (self.dir / "config.json").write_text(json.dumps(self.scenario["config"]))
        (self.dir / "export.json").write_text(json.dumps({"version": 3, "deployment": {
            "resources": self.scenario["resources"]}}))
        (self.dir / "fail").write_text("".join(f"{prefix}|{message}\n" for prefix, message in self.scenario["fail"].items()))

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def record(self, what: str) -> None:
        with open(self.log, "a") as f:
            f.write(what + "\n")

    def phase(self, name: str):
        def run(outputs):
            self.record(f"phase {name} on {outputs.stack}")
            exc = self.failing.pop(name, None)
            if isinstance(exc, Crash):
                raise exc
            if name.startswith("failover-"):      # what the failover leaves: its journal (the fence), the switch
                j = Journal.create(self.state, name, source_connection_limit=40)
                j.record("fence", "start")
                if exc is not None:               # fell back: the app stays on (or went back to) where it was
                    raise exc
                app = self.app_for(outputs.app)
                if name == "failover-ec2":
                    r = outputs.replicas[0]
                    app.set_config_vars({"DATABASE_URL": f"postgres://u:p@{r.host}:{r.port}/d?sslmode=require",
                                         "TERN_SOURCE_DATABASE_URL": SOURCE_URL})
                else:
                    a = outputs.aurora
                    app.set_config_vars({"DATABASE_URL": f"postgres://u:p@{a.writer_endpoint}:{a.port}/d",
                                         "TERN_EC2_DATABASE_URL": app.config_var("DATABASE_URL")})
            if exc is not None:
                raise exc
            if name == "restore":
                return {r.name: "restored" for r in outputs.replicas}
            if name == "replicate-aurora":
                return {"initial_sync_seconds": 1.0}
            return {"run_id": f"{name}-20260101T000000-1", "kind": name, "outcome": "completed",
                    "missing_on_target": 0}
        return run

    def stubbed_ssm(self, statuses: dict[str, str]):
        """An SSM client answering ``cloud-init status --wait`` per host; checks who is asked, and as root."""
        client = boto3.client("ssm", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
        stub = Stubber(client)
        for i, (name, iid) in enumerate(HOSTS):
            if name not in statuses:
                continue
            command_id = f"0c0ffee0-0000-4000-8000-00000000000{i}"        # SSM's ids are UUIDs
            stub.add_response("send_command", {"Command": {"CommandId": command_id}}, {
                "InstanceIds": [iid], "DocumentName": "AWS-RunShellScript", "Comment": ANY,
                "Parameters": {"commands": ["cd / && runuser -u root -- cloud-init status --wait </dev/null"],
                               "executionTimeout": ANY},
                "TimeoutSeconds": ANY, "OutputS3BucketName": "tern-replicas-ssm-output-0123abcd",
                "OutputS3KeyPrefix": "tern/ssm"})
            stub.add_response("get_command_invocation", {
                "Status": "Success" if statuses[name] == "done" else "Failed",
                "ResponseCode": 0 if statuses[name] == "done" else 1,
                "StandardOutputContent": f"....\nstatus: {statuses[name]}\n", "StandardErrorContent": ""},
                {"CommandId": command_id, "InstanceId": iid})
        return client, stub

    def rehearsal(self, client, **kw) -> StackRehearsal:
        def host_for(node):
            c = node.commands
            return SsmHost(node.name, instance_id=c.instance_id, region=c.region, os_user=c.os_user,
                           output_bucket=c.output_bucket, output_prefix=c.output_prefix, client=client,
                           sleep=lambda s: None, poll_interval=0)

        phases = Phases(*(self.phase(n) for n in ("restore", "failover-ec2", "replicate-aurora", "failover-aurora")))
        kw.setdefault("confirm", lambda q: True)
        return StackRehearsal("dev", self.project, Settings().replace(state_dir=self.state), phases,
                              host_for=host_for, app_for=self.app_for, unfence=self.unfence,
                              delete_snapshots=self.delete_snapshots, sleep=lambda s: None, ready_interval=0, **kw)


@pytest.fixture
def world(tmp_path, monkeypatch):
    w = World(tmp_path, monkeypatch)
    with w.heroku:
        yield w


class Crash(BaseException):
    """The process dying mid-way (a laptop closed, a SIGKILL): no handler runs, the journal stays as it is."""


ALL_DONE = {name: "done" for name, _ in HOSTS}
BEFORE_UP = ["stack output --json -s dev", "config --json -s dev"]     # never `stack select`: -s on each call
UP = ["up --yes --non-interactive -s dev", "stack output --json --show-secrets -s dev"]
TEARDOWN = ["stack output --json -s dev", "destroy --yes --non-interactive -s dev"]
SOURCE_HOST = "ec2-1.compute-1.amazonaws.com"
HOP1 = ["phase failover-ec2 on dev", f"app DATABASE_URL=10.20.1.10 TERN_SOURCE_DATABASE_URL={SOURCE_HOST}"]
HOP2 = ["phase replicate-aurora on dev", "phase failover-aurora on dev",
        "app DATABASE_URL=tern-aurora-cluster.cluster-abcdefghijkl.us-east-1.rds.amazonaws.com TERN_EC2_DATABASE_URL=10.20.1.10"]
APP_BACK = [f"unfence {SOURCE_HOST} limit 40",
            f"app DATABASE_URL={SOURCE_HOST} TERN_EC2_DATABASE_URL=- TERN_SOURCE_DATABASE_URL=-"]


def labels(world) -> str:
    """The failover runs' ids (their snapshots' labels), oldest first."""
    runs = [Journal.load(world.state, p.name) for p in (world.state / "runs").iterdir()
            if p.is_dir() and p.name.startswith("failover-")]
    return " ".join(j.run_id for j in sorted(runs, key=lambda j: j.events[0]["ts"]))


def app_is_on_the_source(world) -> None:
    config = world.heroku.config
    assert config["DATABASE_URL"] == SOURCE_URL
    assert "TERN_SOURCE_DATABASE_URL" not in config and "TERN_EC2_DATABASE_URL" not in config


def test_the_whole_rehearsal_in_order_then_the_stack_is_destroyed(world):
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub:
        report = world.rehearsal(client).run()
    stub.assert_no_pending_responses()          # every host named by the outputs was asked, as root
    runs = labels(world)
    # the app back on its source (fence lifted first, then its URL, tern's vars removed) BEFORE the destroy
    assert world.calls() == BEFORE_UP + UP + ["phase restore on dev"] + HOP1 + HOP2 + APP_BACK + TEARDOWN + [
        f"delete snapshots {runs} in us-east-1"]
    app_is_on_the_source(world)
    assert len(runs.split()) == 2 and report["teardown"]["snapshots"]["deleted"] == {"ebs": ["snap-0", "snap-1"],
                                                                                     "aurora": []}
    assert report["kind"] == "failover-aurora" and report["failover_ec2"]["kind"] == "failover-ec2"
    assert report["stack"] == "dev" and report["restore"] == {"ec2-a": "restored", "ec2-b": "restored"}
    journal = Journal.load(world.state, report["rehearsal_run"])
    assert [(s.name, s.outcome) for s in journal.steps()] == [(n, "done") for n in (
        "pulumi-up", "outputs", "hosts-ready", "restore", "failover-ec2", "replicate-aurora", "failover-aurora",
        "report", "app-back", "teardown")]
    assert journal.outcome() == ("completed", "") and Journal.current(world.state, KIND) is None
    assert journal.context()["resources"]["replicas"] == {"ec2-a": "i-0aaaaaaaaaaaaaaa1", "ec2-b": "i-0bbbbbbbbbbbbbbb2"}
    assert (journal.run_dir / "pulumi-up.log").read_text() == "Updating (up --yes --non-interactive -s dev)\n"


def test_hop1_only_and_keep_leave_the_stack_up(world):
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub:
        report = world.rehearsal(client, hops=1, keep=True).run()
    assert world.calls() == BEFORE_UP + UP + ["phase restore on dev"] + HOP1     # --keep: the app stays on the stack
    assert report["kind"] == "failover-ec2" and "failover_ec2" not in report


def test_a_failure_after_up_tears_the_stack_down_and_ends_the_run(world):
    world.failing["failover-ec2"] = StepError("fell back to the source: smoke test failed",
                                             report={"run_id": "failover-ec2-x", "outcome": "fell_back"})
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub, pytest.raises(StepError) as exc:
        world.rehearsal(client).run()
    message = str(exc.value)
    assert "rehearsal on dev failed: failover-ec2: fell back to the source: smoke test failed" in message
    assert "the stack was torn down" in message
    # fell back: the app never left the source; the fence its run journaled is lifted again all the same
    assert world.calls() == BEFORE_UP + UP + ["phase restore on dev", "phase failover-ec2 on dev",
                                              f"unfence {SOURCE_HOST} limit 40", "stack export -s dev"] + TEARDOWN + [
        f"delete snapshots {labels(world)} in us-east-1"]
    app_is_on_the_source(world)
    run_id = Journal.latest(world.state, KIND)
    journal = Journal.load(world.state, run_id)
    assert journal.outcome()[0] == "failed" and Journal.current(world.state, KIND) is None
    # the fallen-back failover's report is kept beside the run
    assert json.loads((journal.run_dir / "failover-ec2.json").read_text())["outcome"] == "fell_back"


def test_a_failed_teardown_says_what_is_still_up_and_a_rerun_retries_only_the_teardown(world):
    world.failing["restore"] = RunbookError("ec2-a: no base backup in the archive")
    world.scenario["fail"] = {"destroy": "error: deleting aws:rds/cluster: InvalidDBClusterStateFault"}
    world.save()
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub, pytest.raises(StepError) as exc:
        world.rehearsal(client).run()
    message = str(exc.value)
    assert "rehearsal on dev failed: restore: ec2-a: no base backup in the archive" in message
    assert "AND its teardown failed" in message and "InvalidDBClusterStateFault" in message
    assert "STILL UP: 5 resources (4 aws:ec2/instance:Instance, 1 aws:rds/cluster:Cluster)" in message
    assert "i-0aaaaaaaaaaaaaaa1" in message and "run the same command again to retry the teardown" in message
    assert Journal.current(world.state, KIND) is not None          # open: the teardown is still owed

    first = len(world.calls())
    world.scenario["fail"] = {}
    world.save()
    with pytest.raises(StepError, match="restore: ec2-a: no base backup.*the stack was torn down"):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert world.calls()[first:] == BEFORE_UP + ["stack export -s dev"] + TEARDOWN    # no up, no phase again
    assert Journal.current(world.state, KIND) is None


def test_a_run_killed_midway_resumes_without_running_up_or_restore_again(world):
    world.failing["failover-ec2"] = Crash()
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub, pytest.raises(Crash):
        world.rehearsal(client).run()
    assert "destroy --yes --non-interactive -s dev" not in world.calls()
    first = len(world.calls())
    report = world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert world.calls()[first:] == BEFORE_UP + ["stack output --json --show-secrets -s dev"] + HOP1 + HOP2 + \
        APP_BACK + TEARDOWN + [f"delete snapshots {labels(world)} in us-east-1"]
    assert report["kind"] == "failover-aurora"
    assert sum(c.startswith("up ") for c in world.calls()) == 1
    assert sum(c.startswith("phase restore") for c in world.calls()) == 1


def test_an_up_cut_short_is_checked_with_a_preview_not_run_again_blindly(world, monkeypatch):
    import runbook.rehearsal_stack as mod

    real = mod.run_pulumi

    def dies_during_up(args, **kw):
        result = real(args, **kw)
        if args[0] == "up":
            raise Crash()
        return result

    monkeypatch.setattr(mod, "run_pulumi", dies_during_up)
    with pytest.raises(Crash):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    monkeypatch.setattr(mod, "run_pulumi", real)
    first = len(world.calls())
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub:
        world.rehearsal(client).run()
    assert world.calls()[first:first + 4] == BEFORE_UP + ["preview --expect-no-changes --non-interactive -s dev",
                                                          "stack output --json --show-secrets -s dev"]
    assert sum(c.startswith("up ") for c in world.calls()) == 1

    # had the preview found changes, `up` runs again (it converges; nothing is assumed)
    world.scenario["fail"] = {"preview": "error: 2 resources would change"}
    world.save()
    monkeypatch.setattr(mod, "run_pulumi", dies_during_up)
    with pytest.raises(Crash):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    monkeypatch.setattr(mod, "run_pulumi", real)
    first = len(world.calls())
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub:
        world.rehearsal(client).run()
    assert world.calls()[first:first + 4] == BEFORE_UP + ["preview --expect-no-changes --non-interactive -s dev",
                                                          "up --yes --non-interactive -s dev"]


def test_a_first_boot_that_failed_stops_the_rehearsal_saying_where_to_look(world):
    client, stub = world.stubbed_ssm({"ec2-a": "done", "ec2-b": "error"})
    with stub, pytest.raises(StepError) as exc:
        world.rehearsal(client).run()
    message = str(exc.value)
    assert "hosts-ready: ec2-b (i-0bbbbbbbbbbbbbbb2): its first-boot script failed (cloud-init status: error)" in message
    assert "tern:walg_sha256" in message and "/var/log/cloud-init-output.log" in message
    assert not any(c.startswith("phase") for c in world.calls()) and world.calls()[-1].startswith("destroy")


@pytest.mark.parametrize("change, error, match", [
    (lambda w: w.scenario["config"].pop("tern:walg_sha256"), ConfigError, "missing tern:walg_sha256"),
    (lambda w: w.scenario["config"].update({"tern:rehearsal": {"value": "false", "secret": False}}),
     PreflightError, "effective config does not say tern:rehearsal: true"),
    (lambda w: w.scenario["config"].update({"tern:replication_password": {"value": "hunter2", "secret": False}}),
     ConfigError, "replication_password is set in plain text"),
    (lambda w: w.scenario["config"].update({"tern:replica_count": {"value": "1", "secret": False}}),
     ConfigError, "replica_count must be at least 2"),
    (lambda w: w.scenario["fail"].update({"stack output --json -s dev": "error: no stack named 'dev' found"}),
     ConfigError, r"cannot be read .*pulumi stack init dev.*no stack named"),
])
def test_the_config_check_refuses_before_up(world, change, error, match):
    change(world)
    world.save()
    with pytest.raises(error, match=match):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert not any(c.startswith(("up", "destroy")) for c in world.calls())
    assert Journal.latest(world.state, KIND) is None           # no run was created


def test_a_stack_file_not_marked_rehearsal_is_refused_before_any_pulumi_call(world):
    (world.project / "Pulumi.qa.yaml").write_text("config:\n  tern:rehearsal: false\n")
    r = world.rehearsal(world.stubbed_ssm({})[0])
    r.stack = "qa"
    with pytest.raises(PreflightError, match="refusing to rehearse on 'qa': Pulumi.qa.yaml does not mark it"):
        r.run()
    assert world.calls() == []


# -- the CLI: a bad --stack exits 2 with nothing run -------------------------------------------------------------

def invoke(env, *args):
    exe = str(Path(sys.executable).with_name("invoke"))
    return subprocess.run([exe, "rehearse", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, why", [
    (["--stack", "prod", "--yes"], "refusing to rehearse on 'prod': production is never rehearsed on by tern"),
    (["--stack", "staging", "--yes"], "no stack config Pulumi.staging.yaml"),
    # the committed dev file still holds the placeholder secrets: refused after reading the config, before up
    (["--stack", "dev", "--yes"], "tern:replication_password is still the committed placeholder"),
])
def test_cli_bad_stack_exits_2_with_nothing_run(world, tmp_path, args, why):
    env = dict(os.environ, INVOKE_TERN_STATE_DIR=str(tmp_path / "state"))
    res = invoke(env, *args)
    assert res.returncode == 2, res.stderr
    assert f"tern: error: {why}" in res.stderr and "Traceback" not in res.stderr
    assert not any(c.startswith(("up", "destroy")) for c in world.calls())
    assert world.calls() in ([], BEFORE_UP)


def test_no_heroku_api_key_or_an_outputs_file_is_refused_before_pulumi(world, monkeypatch):
    from runbook.tasks.stack_rehearsal import rehearse_on_stack

    with pytest.raises(ConfigError, match="--stack names a Pulumi rehearsal stack here .*'outputs.json'"):
        rehearse_on_stack(None, "outputs.json", hops=2, keep=False, json=False, switch=None, yes=True,
                          sandbox_flags={})
    with pytest.raises(ConfigError, match="--boot-seconds is for the sandbox rehearsal"):
        rehearse_on_stack(None, "dev", hops=2, keep=False, json=False, switch=None, yes=True,
                          sandbox_flags={"seconds": None, "boot_seconds": "3"})
    monkeypatch.delenv("HEROKU_API_KEY")
    with pytest.raises(ConfigError, match="HEROKU_API_KEY is not set"):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert world.calls() == []


# -- the app back on its source before the destroy; a first `up` that saved no outputs; the snapshots --------------

def test_the_question_says_the_rehearsal_apps_writes_are_discarded(world):
    asked = []
    with pytest.raises(PreflightError, match="not confirmed"):
        world.rehearsal(world.stubbed_ssm({})[0], confirm=lambda q: asked.append(q) or False).run()
    assert "back on its source" in asked[0] and "DISCARDED with it" in asked[0]
    assert not any(c.startswith("up") for c in world.calls())


def test_an_app_that_cannot_go_back_stops_the_destroy_and_a_rerun_finishes_both(world):
    from runbook.errors import DatabaseError

    world.unfence_error = DatabaseError("cannot connect to ec2-1.compute-1.amazonaws.com:5432/d: Connection refused")
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub, pytest.raises(StepError) as exc:
        world.rehearsal(client).run()
    message = str(exc.value)
    assert "could not be put back on its source, so the stack was NOT destroyed" in message
    assert "Connection refused" in message and "ALTER DATABASE d CONNECTION LIMIT 40" in message
    assert "run the same command again" in message and "heroku-db-secret" not in message
    assert not any(c.startswith("destroy") for c in world.calls())
    assert world.heroku.config["DATABASE_URL"] != SOURCE_URL          # untouched: still on the stack
    assert Journal.current(world.state, KIND) is not None

    first = len(world.calls())
    world.unfence_error = None
    world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert world.calls()[first:] == BEFORE_UP + ["stack output --json --show-secrets -s dev"] + APP_BACK + TEARDOWN + [
        f"delete snapshots {labels(world)} in us-east-1"]
    app_is_on_the_source(world)
    assert Journal.current(world.state, KIND) is None


def test_a_failure_whose_app_cannot_go_back_destroys_nothing_until_it_can(world):
    from runbook.errors import DatabaseError

    world.failing["failover-aurora"] = RunbookError("replication lag too high")
    world.unfence_error = DatabaseError("source unreachable")
    client, stub = world.stubbed_ssm(ALL_DONE)
    with stub, pytest.raises(StepError, match="app could not be put back .*NOT destroyed.*source unreachable"):
        world.rehearsal(client).run()
    assert not any(c.startswith("destroy") for c in world.calls())
    world.unfence_error = None
    with pytest.raises(StepError, match="failover-aurora: replication lag too high.*the stack was torn down"):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    back = [APP_BACK[0], f"app DATABASE_URL={SOURCE_HOST} TERN_SOURCE_DATABASE_URL=-"]   # hop 2 fell back: on EC2
    calls = world.calls()
    assert calls.count(back[0]) == 2 and back[1] not in calls[:-6]       # refused once, then lifted
    assert calls[-6:] == back + ["stack export -s dev"] + TEARDOWN + [
        f"delete snapshots {labels(world)} in us-east-1"]
    app_is_on_the_source(world)


def test_a_first_up_that_failed_half_way_is_destroyed_and_a_retry_does_not_loop(world):
    """Pulumi saves no outputs when a stack's first update fails: this run's own check before its up stands in."""
    world.scenario["outputs"] = {}
    world.scenario["fail"] = {"up": "error: creating aws:rds/cluster: InvalidParameterCombination",
                              "destroy": "error: deleting aws:ec2/instance: RequestLimitExceeded"}
    world.save()
    with pytest.raises(StepError) as exc:
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert "pulumi-up" in str(exc.value) and "RequestLimitExceeded" in str(exc.value)
    assert "no live outputs" not in str(exc.value)
    assert world.calls()[-4:-1] == ["stack export -s dev"] + TEARDOWN      # the destroy was tried (then: what is left)
    first = len(world.calls())
    world.scenario["fail"] = {}
    world.save()
    with pytest.raises(StepError, match="pulumi-up: .*InvalidParameterCombination.*the stack was torn down"):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert world.calls()[first:] == BEFORE_UP + ["stack export -s dev"] + TEARDOWN
    assert Journal.current(world.state, KIND) is None


def test_outputs_that_say_anything_but_rehearsal_still_refuse_the_destroy(world):
    world.scenario["outputs"] = {"rehearsal": False, "stack": "dev"}
    world.scenario["fail"] = {"up": "error: half-way"}
    world.save()
    with pytest.raises(StepError, match="teardown failed: refusing to tear down 'dev': its live outputs do not say"):
        world.rehearsal(world.stubbed_ssm({})[0]).run()
    assert not any(c.startswith("destroy") for c in world.calls())


def test_only_this_rehearsals_snapshots_are_deleted(monkeypatch):
    """EBS and Aurora cluster snapshots outlive the volume and cluster pulumi destroys: the ones labelled by
    this rehearsal's runs go, another run's stay (moto)."""
    from moto import mock_aws

    from runbook.adapters.aws_snapshots import aurora_snapshot_id, delete_labelled

    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        ec2, rds = boto3.client("ec2", "us-east-1"), boto3.client("rds", "us-east-1")
        vol = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
        ours, other = "failover-ec2-20260101T000000-1", "failover-ec2-20250101T000000-9"
        snaps = {label: ec2.create_snapshot(VolumeId=vol, TagSpecifications=[{"ResourceType": "snapshot", "Tags": [
            {"Key": "tern:label", "Value": label}, {"Key": "tern:replica", "Value": "ec2-a"}]}])["SnapshotId"]
            for label in (ours, other)}
        rds.create_db_cluster(DBClusterIdentifier="c", Engine="aurora-postgresql", MasterUsername="u",
                              MasterUserPassword="password1")
        hop2 = "failover-aurora-20260101T000100-1"
        for label in (hop2, other):
            rds.create_db_cluster_snapshot(DBClusterIdentifier="c", DBClusterSnapshotIdentifier=aurora_snapshot_id(label))
        deleted = delete_labelled([ours, hop2], region="us-east-1", ec2=ec2, rds=rds, sleep=lambda s: None)
        assert deleted == {"ebs": [snaps[ours]], "aurora": [aurora_snapshot_id(hop2)]}
        left = {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
        assert snaps[other] in left and snaps[ours] not in left
        clusters = {s["DBClusterSnapshotIdentifier"] for s in rds.describe_db_cluster_snapshots()["DBClusterSnapshots"]}
        assert aurora_snapshot_id(other) in clusters and aurora_snapshot_id(hop2) not in clusters
        # again: nothing left to delete, nothing refused
        assert delete_labelled([ours, hop2], region="us-east-1", ec2=ec2, rds=rds, sleep=lambda s: None) == {
            "ebs": [], "aurora": []}
