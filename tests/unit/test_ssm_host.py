"""The SSM command channel: against the SSM stand-in (as strict as the service's documentation), against
moto for the request's shape, and botocore's Stubber for answers neither can be made to give on cue."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from runbook.adapters.ssm_host import SsmHost
from runbook.errors import CommandError, CommandTimeout, TimeoutExpired
from runbook.standins.ssm import SsmStandIn

CMD = "0b5f5a5e-1111-4222-8333-444455556666"
NO_RETRIES = {"retries": {"mode": "standard", "total_max_attempts": 1}}   # as the adapter makes its clients


# -- against the stand-in ---------------------------------------------------------------------------
@pytest.fixture
def ssm():
    with SsmStandIn(latency=0.05, visible_after=0.0) as service:
        service.add_bucket("tern-ssm-output")
        yield service


def host_on(service: SsmStandIn, *, bucket: str | None = "tern-ssm-output", **kw) -> SsmHost:
    kw = {"poll_interval": 0.05, "api_first_wait": 0.05, "api_max_wait": 0.2, **kw}
    return SsmHost("ec2-a", instance_id=service.add_instance(), region=service.region, output_bucket=bucket,
                   client=service.client(**NO_RETRIES), s3=service.client("s3", **NO_RETRIES), **kw)


def sent_script(service: SsmStandIn) -> dict:
    return service.client().list_commands()["Commands"][0]["Parameters"]


def test_a_command_that_succeeds_runs_as_the_database_user(ssm):
    host = host_on(ssm)
    res = host.run(["sh", "-c", "id -un; pwd; echo warning >&2"], timeout=45)
    assert (res.returncode, res.stdout, res.stderr) == (0, "postgres\n/\n", "warning\n")
    params = sent_script(ssm)
    assert params["commands"][0].startswith("cd / && runuser -u postgres -- sh -c")
    assert params["executionTimeout"] == ["45"]


def test_a_failure_surfaces_exit_code_and_stderr_without_secrets(ssm):
    host = host_on(ssm)
    script = 'echo "FATAL: password=hunter2 rejected for postgres://app:s3cr3t@db/app" >&2; exit 3'
    with pytest.raises(CommandError) as exc:
        host.run(["sh", "-c", script], timeout=30)
    message = str(exc.value)
    assert "exited 3 (Failed)" in message and "FATAL" in message
    assert "hunter2" not in message and "s3cr3t" not in message
    res = host.run(["sh", "-c", script], timeout=30, check=False)
    assert res.returncode == 3 and "hunter2" in res.stderr      # the caller gets the real stderr


def test_stdout_past_the_inline_limit_is_read_in_full(ssm):
    host = host_on(ssm)
    res = host.run(["seq", "1", "10000"], timeout=30)
    expected = "".join(f"{i}\n" for i in range(1, 10001))
    assert len(expected) > 24_000 and res.stdout == expected
    assert ("GetObject", "ok") in ssm.calls
    inline = ssm.client().get_command_invocation(CommandId=sent_command_id(ssm), InstanceId=host.instance_id)
    assert len(inline["StandardOutputContent"]) == 24_000      # what SSM itself returned: cut


def sent_command_id(service: SsmStandIn) -> str:
    return service.client().list_commands()["Commands"][0]["CommandId"]


def test_a_cut_stdout_is_refused_without_an_output_bucket(ssm):
    host = host_on(ssm, bucket=None)
    with pytest.raises(CommandError, match="refusing to use a cut output"):
        host.run(["seq", "1", "10000"], timeout=30)
    res = host.run(["sh", "-c", "seq 1 5000 >&2; echo ok"], timeout=30)    # stderr is only shown: marked
    assert res.stdout == "ok\n" and res.stderr.endswith("[tern: stderr cut by SSM at 8,000 characters; "
                                                        "commands.output_bucket keeps it all]")


def test_a_missing_output_object_is_an_error_not_a_cut_output(ssm):
    host = host_on(ssm, bucket="not-made-by-infra")           # the agent cannot upload: it only logs
    with pytest.raises(CommandError, match=r"s3://not-made-by-infra/.*NoSuchBucket"):
        host.run(["seq", "1", "10000"], timeout=30)


def test_throttled_polls_are_retried_until_they_pass():
    with SsmStandIn(latency=0.3, visible_after=0.0, poll_rate=4.0, poll_burst=1) as service:
        host = host_on(service, bucket=None, poll_interval=0.01)
        assert host.run(["echo", "done"], timeout=30).stdout == "done\n"
        assert ("GetCommandInvocation", "ThrottlingException") in service.calls


def test_throttling_that_never_ends_gives_up_clearly_and_cancels(monkeypatch):
    with SsmStandIn(latency=0.05, visible_after=0.0, poll_rate=0.001, poll_burst=0) as service:
        # the client the adapter makes itself, pointed here the way a rehearsal does: the environment
        settings = service.client_settings()
        monkeypatch.setenv("AWS_ENDPOINT_URL_SSM", settings["endpoint_url"])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", settings["aws_access_key_id"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", settings["aws_secret_access_key"])
        host = SsmHost("ec2-a", instance_id=service.add_instance(), region=service.region, poll_interval=0.05,
                       api_attempts=3, api_first_wait=0.05, api_max_wait=0.2)
        with pytest.raises(CommandError, match=r"GetCommandInvocation: ThrottlingException: Rate exceeded "
                                               r"\(gave up after 3 attempts\)"):
            host.run(["sleep", "30.987"], timeout=60)
        cid = sent_command_id(service)
        assert service.wait(cid, host.instance_id, timeout=10)["Status"] == "Cancelled"
        # botocore's own retries are off: three attempts are three requests
        assert [op for op, outcome in service.calls if op == "GetCommandInvocation"] == ["GetCommandInvocation"] * 3


def test_invocation_not_yet_visible_right_after_send():
    with SsmStandIn(latency=0.05, visible_after=0.3) as service:
        host = host_on(service, bucket=None)
        assert host.run(["echo", "seen"], timeout=30).stdout == "seen\n"
        assert ("GetCommandInvocation", "InvocationDoesNotExist") in service.calls


def test_an_invocation_that_never_appears_is_an_error():
    with SsmStandIn(latency=0.05, visible_after=60) as service:
        host = host_on(service, bucket=None, visible_within=0.3)
        with pytest.raises(CommandError, match="SSM shows no invocation"):
            host.run(["true"], timeout=30)
        assert ("CancelCommand", "ok") in service.calls


def test_execution_timeout_kills_on_the_host_and_is_the_runbooks_timeout_error(ssm):
    host = host_on(ssm)
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="timed out on the host after 1s") as exc:
        host.run(["sleep", "30.246"], timeout=1)
    assert isinstance(exc.value, TimeoutExpired) and isinstance(exc.value, CommandError)
    assert time.monotonic() - started < 10
    assert sent_script(ssm)["executionTimeout"] == ["1"]
    assert not any(p.name.isdigit() and _cmdline(p) == b"sleep\x0030.246\x00" for p in Path("/proc").iterdir())


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_multi_hour_timeouts_fit_and_past_48_hours_are_refused_before_sending(ssm):
    host = host_on(ssm)
    assert host.execution_timeout(6 * 3600 + 0.5, "backup-fetch") == 21601
    with pytest.raises(CommandError, match="at most 172800s"):
        host.run(["true"], timeout=49 * 3600)
    assert ssm.invocations == {}


def test_a_client_for_another_region_is_refused_by_the_service(ssm):
    settings = {**ssm.client_settings(), "region_name": "eu-west-1"}
    host = SsmHost("ec2-a", instance_id=ssm.add_instance(), region="eu-west-1",
                   client=boto3.client("ssm", **settings), sleep=lambda s: None)
    with pytest.raises(CommandError, match="SendCommand.*InvalidSignatureException"):
        host.run(["true"], timeout=30)


# -- the request's shape, against moto ---------------------------------------------------------------
@pytest.fixture
def instance_id():
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        image = ec2.describe_images()["Images"][0]["ImageId"]
        inst = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"]
        yield inst


def test_run_through_moto(instance_id):
    client = boto3.client("ssm", region_name="us-east-1")
    host = SsmHost("ec2-a", instance_id=instance_id, client=client, sleep=lambda s: None)
    res = host.run(["pg_ctl", "status", "-D", "/var/lib/postgresql/15/main"], timeout=30)
    assert res.returncode == 0
    sent = client.list_commands()["Commands"][0]
    script = sent["Parameters"]["commands"][0]
    assert script.startswith("cd / && runuser -u postgres -- pg_ctl status")
    assert sent["DocumentName"] == "AWS-RunShellScript"


def test_input_is_piped_not_on_the_command_line():
    host = SsmHost("ec2-a", instance_id="i-1", client=object(), sleep=lambda s: None)
    script = host.script(["psql", "-f", "-"], "SELECT 1;")
    assert "SELECT 1" not in script and base64.b64encode(b"SELECT 1;").decode() in script


# -- answers on cue, through botocore's Stubber --------------------------------------------------------
def stubbed(responses):
    client = boto3.client("ssm", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(client)
    stub.add_response("send_command", {"Command": {"CommandId": CMD}},
                      {"InstanceIds": ["i-1"], "DocumentName": "AWS-RunShellScript", "Comment": ANY,
                       "Parameters": ANY, "TimeoutSeconds": ANY})
    for r in responses:
        if r == "missing":
            stub.add_client_error("get_command_invocation", service_error_code="InvocationDoesNotExist")
        else:
            stub.add_response("get_command_invocation", r, {"CommandId": CMD, "InstanceId": "i-1"})
    return client, stub


def test_polls_until_done_and_surfaces_output():
    client, stub = stubbed(["missing", {"Status": "InProgress"}, {"Status": "Cancelling"},
                            {"Status": "Success", "ResponseCode": 0, "StandardOutputContent": "ok\n",
                             "StandardErrorContent": ""}])
    sleeps = []
    with stub:
        res = SsmHost("ec2-a", instance_id="i-1", client=client, sleep=sleeps.append).run(["true"], timeout=30)
    assert res.stdout == "ok\n" and len(sleeps) == 3


def test_bounded_wait_times_out_and_cancels():
    client, stub = stubbed([{"Status": "InProgress"}] * 4)
    stub.add_response("cancel_command", {}, {"CommandId": CMD, "InstanceIds": ["i-1"]})
    now = [0.0]
    host = SsmHost("ec2-a", instance_id="i-1", client=client, poll_interval=40, clock=lambda: now[0],
                   sleep=lambda s: now.__setitem__(0, now[0] + s))
    with stub, pytest.raises(CommandTimeout, match=r"did not finish within 95s \(SSM status InProgress\)"):
        host.run(["sleep", "99"], timeout=5)          # 60 s delivery + 5 s execution + 30 s margin
    stub.assert_no_pending_responses()


def test_delivery_timed_out_says_the_agent_is_unreachable():
    client, stub = stubbed([{"Status": "TimedOut", "StatusDetails": "Delivery Timed Out", "ResponseCode": -1}])
    with stub, pytest.raises(CommandError, match="never reached i-1 within 60s") as exc:
        SsmHost("ec2-a", instance_id="i-1", client=client, sleep=lambda s: None).run(["true"], timeout=30)
    assert not isinstance(exc.value, TimeoutExpired)


def test_repoint_passfile_over_ssm_never_carries_the_password(monkeypatch):
    """Over SSM the replica's host reads the password from Secrets Manager itself (a host method:
    the repoint plan no longer checks which adapter it has), naming the secret's region (the ARN's,
    not the host's) to the CLI."""
    import runbook.secrets

    monkeypatch.setattr(runbook.secrets, "resolve", lambda ref: pytest.fail("resolved on the runbook's side"))
    client, stub = stubbed([{"Status": "Success", "ResponseCode": 0, "StandardOutputContent": "",
                             "StandardErrorContent": ""}])
    host = SsmHost("ec2-b", instance_id="i-1", region="eu-west-1", client=client, sleep=lambda s: None)
    sent = []
    real_send = client.send_command
    client.send_command = lambda **kw: (sent.append(kw), real_send(**kw))[1]
    with stub:
        host.write_file_from_secret("/var/lib/postgresql/15/main.pgpass", "10.0.1.10:5432:*:tern_replicator:",
                                    "aws-secretsmanager:arn:aws:secretsmanager:us-east-1:1:secret:repl#password")
    script = sent[0]["Parameters"]["commands"][0]
    assert "arn:aws:secretsmanager:us-east-1:1:secret:repl" in script and "get-secret-value" in script
    assert '--region "$region"' in host.SECRET_SCRIPT and script.endswith("main.pgpass us-east-1 </dev/null")


def test_a_secret_with_no_region_anywhere_is_refused():
    host = SsmHost("ec2-b", instance_id="i-1", client=object(), sleep=lambda s: None)
    with pytest.raises(CommandError, match="no region for secret"):
        host.write_file_from_secret("/tmp/x", "", "aws-secretsmanager:my-secret#password")


def test_no_region_anywhere_is_a_config_error_not_a_botocore_one(monkeypatch, tmp_path):
    from runbook.errors import ConfigError

    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="cannot make an AWS ssm client: You must specify a region"):
        SsmHost("ec2-a", instance_id="i-1")
