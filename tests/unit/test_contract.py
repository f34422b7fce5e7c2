import copy
import json

import pytest

from runbook.contract import load, load_file, parse
from runbook.errors import ContractError

GOOD = {
    "schema_version": 1, "stack": "dev", "rehearsal": True, "region": "us-east-1",
    "source": {"heroku_app": "shop", "archive": {"kind": "s3", "location": "s3://bucket/wal"}, "pg_major": 15},
    "app": {"kind": "heroku", "name": "shop", "api_key": "env:HEROKU_API_KEY"},
    "replicas": [
        {"name": "ec2-a", "availability_zone": "us-east-1a", "host": "10.0.1.10", "database": "d",
         "data_dir": "/var/lib/postgresql/15/main", "bin_dir": "/usr/lib/postgresql/15/bin",
         "socket_dir": "/var/run/postgresql", "commands": {"kind": "ssm", "instance_id": "i-123"}},
    ],
    "aurora": {"writer_endpoint": "w", "reader_endpoint": "r", "database": "d", "master_user": "m",
               "master_password": "aws-secretsmanager:arn:aws:secretsmanager:us-east-1:1:secret:x"},
    "credentials": {"replication_password": "aws-secretsmanager:arn:x#replication"},
}


def test_good_contract_parses():
    o = parse(GOOD)
    assert o.replica("ec2-a").port == 5432
    with pytest.raises(ContractError, match="unknown replica 'ec2-z'"):
        o.replica("ec2-z")


def test_missing_field_is_named():
    bad = copy.deepcopy(GOOD)
    del bad["replicas"][0]["host"]
    with pytest.raises(ContractError, match=r"replicas\.0\.host: Field required"):
        parse(bad)


def test_plaintext_secret_is_refused_without_echo():
    bad = copy.deepcopy(GOOD)
    bad["aurora"]["master_password"] = "Sup3rS3cretPassw0rd"
    with pytest.raises(ContractError) as exc:
        parse(bad)
    assert "aurora.master_password" in str(exc.value)
    assert "Sup3rS3cret" not in str(exc.value)


def test_unknown_field_and_duplicate_replicas():
    bad = copy.deepcopy(GOOD)
    bad["aurora"]["passwrod"] = "x"
    with pytest.raises(ContractError, match="aurora.passwrod: Extra inputs are not permitted"):
        parse(bad)
    dup = copy.deepcopy(GOOD)
    dup["replicas"].append(copy.deepcopy(dup["replicas"][0]))
    with pytest.raises(ContractError, match="repeated: ec2-a"):
        parse(dup)


def test_ssm_channel_needs_instance():
    bad = copy.deepcopy(GOOD)
    del bad["replicas"][0]["commands"]["instance_id"]
    with pytest.raises(ContractError, match="replicas.0.commands: Value error, instance_id is required"):
        parse(bad)


def test_files(tmp_path):
    with pytest.raises(ContractError, match="does not exist"):
        load_file(tmp_path / "nope.json")
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ContractError, match="not valid JSON"):
        load_file(p)
    p.write_text("[1, 2]")
    with pytest.raises(ContractError, match="JSON object"):
        load_file(p)
    p.write_text(json.dumps(GOOD))
    assert load(str(p), tmp_path).stack == "dev"
    with pytest.raises(ContractError, match="sandbox is not up"):
        load("local", tmp_path / "no-sandbox")


def test_the_committed_example_parses_and_loads_as_a_stack_file():
    """examples/outputs.example.json: what the README offers to try the runbook offline (`--stack FILE.json`)."""
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "outputs.example.json"
    o = load(str(example), Path("/nonexistent-sandbox"))
    assert o.stack == "dev" and o.rehearsal is True
    assert [r.commands.kind for r in o.replicas] == ["ssm", "ssm"] and o.app.kind == "heroku"
    assert o.aurora.api is not None and o.aurora.api.kind == "rds" and o.pooler is not None and o.dms is not None
    # references only, as a real stack exports them: nothing in it is a credential
    for ref in (o.app.api_key, o.aurora.master_password, o.pooler.admin_password, o.credentials.replication_password):
        assert ref.split(":", 1)[0] in ("env", "aws-secretsmanager")
