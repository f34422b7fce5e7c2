"""Restore makes every replica TLS only: its settings, its hba, the URLs clients use."""

from __future__ import annotations

import re

import pytest

from runbook.adapters import CommandResult, HostCommands
from runbook.contract import Replica
from runbook.errors import PreflightError
from runbook.pg import url_endpoint
from runbook.restore import (AWS_TLS_DIR, HBA, check_tls_files, hba_conf, replica_url, standby_settings, tls_paths,
                             tls_url)


def replica(kind: str = "ssm") -> Replica:
    commands = {"kind": "ssm", "instance_id": "i-123"} if kind == "ssm" else {"kind": "local"}
    return Replica(name="ec2-a", availability_zone="us-east-1a", host="10.0.1.5", port=5432, database="app",
                   data_dir="/var/lib/postgresql/15/main", bin_dir="/usr/lib/postgresql/15/bin",
                   socket_dir="/var/run/postgresql", commands=commands)


def test_aws_settings_use_the_files_infra_user_data_makes():
    from infra import replicas as infra

    assert AWS_TLS_DIR == infra.CONF_DIR
    infra_conf = dict(re.findall(r"^(\w+) = '?([^'\n]*)'?$", infra.TLS_CONF, re.M))
    conf = standby_settings(replica("ssm"), "wal-g wal-fetch %f %p")
    for key in ("ssl", "ssl_cert_file", "ssl_key_file", "ssl_min_protocol_version", "hba_file",
                "unix_socket_permissions", "password_encryption"):
        assert str(conf[key]) == infra_conf[key], key


def test_local_replicas_keep_their_certificate_beside_the_data_directory():
    paths = tls_paths(replica("local"))
    assert paths.dir == "/var/lib/postgresql/15/main.tls"
    assert standby_settings(replica("local"), "")["ssl_key_file"] == paths.key == paths.dir + "/server.key"


@pytest.mark.parametrize("text", [hba_conf("postgres"), hba_conf("u0abc"), HBA])
def test_hba_is_tls_only_and_trusts_the_socket_for_the_superuser_only(text):
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert {ln[0] for ln in lines} == {"local", "hostssl"}
    assert all(ln[-1] == "scram-sha-256" for ln in lines if ln[0] == "hostssl")
    assert {ln[1] for ln in lines if ln[0] == "hostssl"} == {"all", "replication"}
    assert len({ln[2] for ln in lines if ln[0] == "local"}) == 1 and "all" not in {ln[2] for ln in lines if ln[0] == "local"}


def test_hba_quotes_an_odd_superuser_name():
    assert 'local    all          "we""ird-name"    trust' in hba_conf('we"ird-name')


def test_replica_urls_require_tls():
    src = "postgresql://app:p%40ss@source.example:5432/app?sslmode=verify-full&sslrootcert=/x.pem&connect_timeout=3"
    url = replica_url(src, replica("ssm"))
    assert url_endpoint(url) == ("10.0.1.5", 5432, "app")
    assert url.endswith("?connect_timeout=3&sslmode=require") and "app:p%40ss@" in url
    assert tls_url("postgresql://a@h:1/d") == "postgresql://a@h:1/d?sslmode=require"
    assert tls_url("postgresql://a@h:1/d?sslmode=disable") == "postgresql://a@h:1/d?sslmode=require"


class Host(HostCommands):
    name = "ec2-a"

    def __init__(self, rc: int) -> None:
        self.rc, self.calls = rc, []

    def run(self, argv, *, timeout, input=None, check=True):
        self.calls.append(list(argv))
        return CommandResult(self.rc, "", "")

    def write_file_from_secret(self, path, prefix, reference, *, timeout=60.0):
        raise NotImplementedError


def test_an_aws_replica_without_its_certificate_is_refused_before_restore():
    with pytest.raises(PreflightError, match="no TLS certificate"):
        check_tls_files(replica("ssm"), Host(1))
    check_tls_files(replica("ssm"), Host(0))
    local = Host(1)
    check_tls_files(replica("local"), local)
    assert local.calls == []
