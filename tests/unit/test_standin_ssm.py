"""The SSM stand-in itself, through boto3: it must be as strict as the service's documentation."""

from __future__ import annotations

import doctest
import uuid

import boto3
import pytest
from botocore.exceptions import ClientError

from runbook.standins import ssm as standin_mod
from runbook.standins.ssm import SsmStandIn


@pytest.fixture
def ssm():
    with SsmStandIn(latency=0.05, visible_after=0.0) as service:
        service.add_bucket("ssm-out")
        yield service


@pytest.fixture
def s3(ssm):
    return ssm.client("s3")


def send(client, instance, *commands, **extra):
    params = {"commands": list(commands), **extra.pop("parameters", {})}
    return client.send_command(InstanceIds=[instance], DocumentName="AWS-RunShellScript", Parameters=params,
                               **extra)["Command"]["CommandId"]


def code(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


def test_doctest():
    failures, tried = doctest.testmod(standin_mod)
    assert tried and not failures


def test_invocation_unknown_at_first_then_pending_then_done():
    with SsmStandIn(latency=0.5, visible_after=0.3) as service:
        host = service.add_instance()
        client = service.client()
        cid = send(client, host, "echo hi")
        with pytest.raises(ClientError) as exc:
            client.get_command_invocation(CommandId=cid, InstanceId=host)
        assert code(exc) == "InvocationDoesNotExist"
        import time

        time.sleep(0.35)
        inv = client.get_command_invocation(CommandId=cid, InstanceId=host)
        assert (inv["Status"], inv["ResponseCode"], inv["StandardOutputContent"]) == ("Pending", -1, "")
        done = service.wait(cid, host)
        assert (done["Status"], done["StatusDetails"], done["ResponseCode"]) == ("Success", "Success", 0)
        assert done["StandardOutputContent"] == "hi\n"


def test_agent_environment_and_failure(ssm):
    host = ssm.add_instance()
    client = ssm.client()
    cid = send(client, host, 'echo "home=${HOME:-unset} path=$PATH"', "echo oops >&2", "exit 4")
    inv = ssm.wait(cid, host)
    assert (inv["Status"], inv["ResponseCode"]) == ("Failed", 4)
    assert inv["StandardOutputContent"].startswith("home=unset path=")      # the agent's bare environment
    assert inv["StandardErrorContent"] == "oops\n"


def test_inline_output_limits_and_full_output_in_s3(ssm, s3):
    host = ssm.add_instance()
    client = ssm.client()
    cid = send(client, host, "seq 1 10000", "head -c 9000 /dev/zero | tr '\\0' e >&2",
               OutputS3BucketName="ssm-out", OutputS3KeyPrefix="runs/")
    inv = ssm.wait(cid, host)
    full = "".join(f"{i}\n" for i in range(1, 10001))
    assert inv["StandardOutputContent"] == full[:24_000]          # "the first 24,000 characters"
    assert len(inv["StandardErrorContent"]) == 8_000
    key = f"runs/{cid}/{host}/awsrunShellScript/0.awsrunShellScript/stdout"
    assert inv["StandardOutputUrl"].endswith(f"/ssm-out/{key}")
    assert s3.get_object(Bucket="ssm-out", Key=key)["Body"].read().decode() == full
    listed = client.list_command_invocations(CommandId=cid, Details=True)["CommandInvocations"]
    assert len(listed[0]["CommandPlugins"][0]["Output"]) == 2_500
    assert listed[0]["CommandPlugins"][0]["Output"].endswith("---Output truncated---")


def test_empty_stream_not_uploaded_and_no_bucket_fails_nothing(ssm, s3):
    host = ssm.add_instance()
    cid = send(ssm.client(), host, "echo only-stdout", OutputS3BucketName="ssm-out")
    ssm.wait(cid, host)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="ssm-out", Prefix=cid).get("Contents", [])]
    assert keys == [f"{cid}/{host}/awsrunShellScript/0.awsrunShellScript/stdout"]
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket="ssm-out", Key=keys[0].replace("stdout", "stderr"))
    assert code(exc) == "NoSuchKey"
    cid = send(ssm.client(), host, "echo lost", OutputS3BucketName="no-such-bucket")
    assert ssm.wait(cid, host)["Status"] == "Success"          # the agent only logs a failed upload


def test_execution_timeout_kills_the_process_group(ssm):
    host = ssm.add_instance()
    cid = send(ssm.client(), host, "sleep 30.321 & sleep 30.321", parameters={"executionTimeout": ["1"]})
    inv = ssm.wait(cid, host, timeout=10)
    assert (inv["Status"], inv["StatusDetails"], inv["ResponseCode"]) == ("TimedOut", "ExecutionTimedOut", 137)
    assert not sleeping("30.321")


def sleeping(marker: str) -> bool:
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes() == b"sleep\0" + marker.encode() + b"\0":
                return True
        except OSError:
            continue
    return False


def test_exit_137_reads_as_timed_out_and_cancel_stops_a_command(ssm):
    host = ssm.add_instance()
    client = ssm.client()
    assert ssm.wait(send(client, host, "exit 137"), host)["Status"] == "TimedOut"   # the agent's mapping
    cid = send(client, host, "sleep 30.654")
    import time

    time.sleep(0.3)
    client.cancel_command(CommandId=cid, InstanceIds=[host])
    assert ssm.wait(cid, host, timeout=10)["Status"] == "Cancelled"
    assert not sleeping("30.654")


def test_polling_too_fast_is_throttled():
    with SsmStandIn(latency=0.05, visible_after=0.0, poll_rate=1.0, poll_burst=2) as service:
        host = service.add_instance()
        client = service.client(retries={"mode": "standard", "total_max_attempts": 1})
        cid = send(client, host, "true")
        client.get_command_invocation(CommandId=cid, InstanceId=host)
        client.get_command_invocation(CommandId=cid, InstanceId=host)
        with pytest.raises(ClientError) as exc:
            client.get_command_invocation(CommandId=cid, InstanceId=host)
        assert code(exc) == "ThrottlingException"


def test_requests_are_checked_as_the_service_checks_them(ssm):
    host = ssm.add_instance()
    client = ssm.client()
    cases = [
        ({"InstanceIds": ["i-0123456789abcdef0"]}, "InvalidInstanceId"),
        ({"Parameters": {"commands": ["true"], "executionTimeout": ["172801"]}}, "InvalidParameters"),
        ({"Parameters": {"commands": ["true"], "executionTimeout": ["1h"]}}, "InvalidParameters"),
        ({"Parameters": {"commands": ["true"], "timeout": ["5"]}}, "InvalidParameters"),
        ({"DocumentName": "AWS-RunPowerShellScript"}, "InvalidDocument"),
    ]
    for override, expected in cases:
        request = {"InstanceIds": [host], "DocumentName": "AWS-RunShellScript",
                   "Parameters": {"commands": ["true"]}, **override}
        with pytest.raises(ClientError) as exc:
            client.send_command(**request)
        assert code(exc) == expected, override
    unchecked = ssm.client(parameter_validation=False)
    with pytest.raises(ClientError) as exc:
        send(unchecked, host, "true", TimeoutSeconds=10)
    assert code(exc) == "ValidationException"


def test_signature_must_name_the_region_and_key(ssm):
    host = ssm.add_instance()
    settings = ssm.client_settings()
    wrong_region = boto3.client("ssm", **{**settings, "region_name": "eu-west-1"})
    with pytest.raises(ClientError) as exc:
        send(wrong_region, host, "true")
    assert code(exc) == "InvalidSignatureException"
    stranger = boto3.client("ssm", **{**settings, "aws_access_key_id": "AKIA" + uuid.uuid4().hex[:16].upper()})
    with pytest.raises(ClientError) as exc:
        send(stranger, host, "true")
    assert code(exc) == "UnrecognizedClientException"
    assert not ssm.invocations          # nothing ran
