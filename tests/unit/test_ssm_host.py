"""The SSM command channel against moto, and botocore's Stubber for exit codes moto cannot produce."""

from __future__ import annotations

import base64

import boto3
import pytest
from botocore.stub import ANY, Stubber
from moto import mock_aws

from runbook.adapters.ssm_host import SsmHost
from runbook.errors import CommandError

CMD = "0b5f5a5e-1111-4222-8333-444455556666"


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


def test_input_is_piped_not_on_the_command_line(instance_id):
    host = SsmHost("ec2-a", instance_id=instance_id, client=boto3.client("ssm", region_name="us-east-1"),
                   sleep=lambda s: None)
    script = host.script(["psql", "-f", "-"], "SELECT 1;")
    assert "SELECT 1" not in script and base64.b64encode(b"SELECT 1;").decode() in script


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
    client, stub = stubbed(["missing", {"Status": "InProgress"},
                            {"Status": "Success", "ResponseCode": 0, "StandardOutputContent": "ok\n",
                             "StandardErrorContent": ""}])
    sleeps = []
    with stub:
        res = SsmHost("ec2-a", instance_id="i-1", client=client, sleep=sleeps.append).run(["true"], timeout=30)
    assert res.stdout == "ok\n" and len(sleeps) == 2


def test_failure_exit_status_is_raised_with_redacted_output():
    client, stub = stubbed([{"Status": "Failed", "ResponseCode": 3, "StandardOutputContent": "",
                             "StandardErrorContent": "FATAL: password=hunter2 rejected"}])
    with stub, pytest.raises(CommandError) as exc:
        SsmHost("ec2-a", instance_id="i-1", client=client, sleep=lambda s: None).run(["psql"], timeout=30)
    assert "exited 3 (Failed)" in str(exc.value) and "hunter2" not in str(exc.value)
    client, stub = stubbed([{"Status": "Failed", "ResponseCode": 3, "StandardOutputContent": "",
                             "StandardErrorContent": "no"}])
    with stub:
        res = SsmHost("ec2-a", instance_id="i-1", client=client, sleep=lambda s: None).run(
            ["false"], timeout=30, check=False)
    assert res.returncode == 3


def test_bounded_wait_times_out_and_cancels():
    client, stub = stubbed([{"Status": "InProgress"}] * 3)
    stub.add_response("cancel_command", {}, {"CommandId": CMD, "InstanceIds": ["i-1"]})
    import runbook.adapters.ssm_host as mod

    clock = iter([0.0, 0.0, 10.0, 1000.0, 1000.0, 1000.0])
    real = mod.time.monotonic
    mod.time.monotonic = lambda: next(clock)
    try:
        with stub, pytest.raises(CommandError, match="timed out after 5s"):
            SsmHost("ec2-a", instance_id="i-1", client=client, sleep=lambda s: None).run(["sleep", "99"], timeout=5)
    finally:
        mod.time.monotonic = real


def test_repoint_passfile_over_ssm_never_carries_the_password(monkeypatch):
    """Over SSM the replica's host reads the password from Secrets Manager itself (a host method:
    the repoint plan no longer checks which adapter it has)."""
    import runbook.secrets

    monkeypatch.setattr(runbook.secrets, "resolve", lambda ref: pytest.fail("resolved on the runbook's side"))
    client, stub = stubbed([{"Status": "Success", "ResponseCode": 0, "StandardOutputContent": "",
                             "StandardErrorContent": ""}])
    host = SsmHost("ec2-b", instance_id="i-1", client=client, sleep=lambda s: None)
    sent = []
    real_send = client.send_command
    client.send_command = lambda **kw: (sent.append(kw), real_send(**kw))[1]
    with stub:
        host.write_file_from_secret("/var/lib/postgresql/15/main.pgpass", "10.0.1.10:5432:*:tern_replicator:",
                                    "aws-secretsmanager:arn:aws:secretsmanager:us-east-1:1:secret:repl#password")
    script = sent[0]["Parameters"]["commands"][0]
    assert "arn:aws:secretsmanager:us-east-1:1:secret:repl" in script and "get-secret-value" in script
