"""tern's client certificate (runbook.client_tls): made once per stack, private, named for the superuser."""

from __future__ import annotations

import subprocess

import pytest

from runbook import client_tls
from runbook.errors import ConfigError, ContractError
from runbook.postgres import PgHost
from runbook.restore import hba_conf


def test_made_once_private_and_remade_only_for_another_superuser(tmp_path):
    a = client_tls.ensure(tmp_path, "postgres")
    assert (a.key.stat().st_mode & 0o777) == 0o600 and (a.key.parent.stat().st_mode & 0o777) == 0o700
    first = a.cert.read_bytes()
    assert client_tls.ensure(tmp_path, "postgres").cert.read_bytes() == first         # kept
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext", "basicConstraints", "-in", str(a.cert)],
                             capture_output=True, text=True, check=True).stdout
    assert "CN = postgres" in subject and "CA:TRUE" in subject                         # its own trust anchor
    b = client_tls.ensure(tmp_path, "rdsadmin")
    assert b.user == "rdsadmin" and b.cert.read_bytes() != first
    assert client_tls.existing(tmp_path) == b and client_tls.existing(tmp_path / "none") is None
    assert client_tls.existing(None) is None


def _public_key(args: list[str]) -> str:
    argv = ["openssl", *args, "-pubout"] if args[0] == "pkey" else ["openssl", *args, "-noout", "-pubkey"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _pair_matches(c: client_tls.ClientCert) -> bool:
    """The key is the certificate's, and the certificate names the superuser the pair says it stands for."""
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-in", str(c.cert)], capture_output=True,
                             text=True, check=True).stdout
    return (_public_key(["x509", "-in", str(c.cert)]) == _public_key(["pkey", "-in", str(c.key)])
            and f"CN = {c.user}" in subject)


def test_a_crash_while_the_certificate_is_replaced_never_pairs_a_new_key_with_an_old_certificate(tmp_path,
                                                                                                 monkeypatch):
    """The process dies at each rename in turn while a new pair replaces the old one: whatever is in use
    afterwards is a whole pair, the old one or the new one."""
    import os

    client_tls.ensure(tmp_path, "postgres")
    real_replace = os.replace
    crashes = 0
    for n in range(1, 6):
        calls = []

        def replace(src, dst, *a, **kw):
            calls.append(dst)
            if len(calls) == n:
                raise KeyboardInterrupt("killed")      # the process dies here
            return real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)
        try:
            # another superuser than the pair in use: a new pair replaces it
            client_tls.ensure(tmp_path, "rdsadmin" if client_tls.existing(tmp_path).user == "postgres" else "postgres")
        except KeyboardInterrupt:
            crashes += 1
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        have = client_tls.existing(tmp_path)
        assert have is not None and _pair_matches(have), (n, calls)
        if len(calls) < n:
            break          # this ensure renamed fewer than n times: every crash point was tried
    assert crashes >= 1
    # and a run after the crash makes (or keeps) a whole pair
    assert _pair_matches(client_tls.ensure(tmp_path, "rdsadmin"))


def test_the_url_verifies_the_replica_and_names_the_files_never_their_contents(tmp_path):
    c = client_tls.ensure(tmp_path, "post gres")
    with pytest.raises(ConfigError, match="ec2-a: tern has not read its server certificate"):
        c.conninfo("10.0.1.5", 5432, "app db", server="ec2-a")      # never an unverified connection
    other = client_tls.ensure(tmp_path / "other", "x")
    pinned = client_tls.pin_server(tmp_path, "ec2-a", other.pem)
    url = c.conninfo("10.0.1.5", 5432, "app db", server="ec2-a")
    assert url.startswith("postgresql://post%20gres@10.0.1.5:5432/app%20db?sslmode=verify-ca&sslrootcert=")
    assert str(pinned).replace("/", "%2F") in url and c.server_ca("ec2-b") is None
    assert "PRIVATE" not in url and str(c.key).replace("/", "%2F") in url
    # the app's URL for tern's own sessions: verified the same way, whatever it said
    assert client_tls.verified_url("postgresql://a:p@h:1/d?sslmode=require&sslrootcert=x&connect_timeout=3",
                                   pinned) == ("postgresql://a:p@h:1/d?connect_timeout=3&sslmode=verify-ca&"
                                               f"sslrootcert={str(pinned).replace('/', '%2F')}")


def test_only_a_lone_certificate_is_kept_as_a_replicas_root(tmp_path):
    c = client_tls.ensure(tmp_path, "x")
    key = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n"
    for text in ("", "not a certificate", key, c.pem + key, c.pem + c.pem):
        with pytest.raises(ConfigError, match="ec2-a: its server certificate is missing or is not one PEM"):
            client_tls.pin_server(tmp_path, "ec2-a", text)
    assert client_tls.server_ca(tmp_path, "ec2-a") is None
    assert client_tls.pin_server(tmp_path, "ec2-a", c.pem) == client_tls.server_ca(tmp_path, "ec2-a")


def test_the_hba_admits_the_superuser_over_tcp_by_certificate_only_from_where_tern_runs():
    lines = [ln.split() for ln in hba_conf("postgres", client_cert=True, admin_cidrs=["10.20.250.0/24", "::1/128"])
             .splitlines() if ln and not ln.startswith("#")]
    tcp = [ln for ln in lines if ln[0] == "hostssl"]
    # the certificate lines come first (first match wins), for the superuser only, method cert, from tern's networks
    assert tcp[0] == ["hostssl", "all", "postgres", "10.20.250.0/24", "cert"]
    assert tcp[1] == ["hostssl", "all", "postgres", "::1/128", "cert"]
    assert all(ln[-1] == "scram-sha-256" for ln in tcp[2:]) and not any(ln[0] == "host" for ln in lines)
    assert "cert" not in hba_conf("postgres")
    assert "cert" not in hba_conf("postgres", client_cert=True)          # nowhere named: no line at all
    for world in ("0.0.0.0/0", "::/0"):
        with pytest.raises(ValueError, match="from anywhere"):
            hba_conf("postgres", client_cert=True, admin_cidrs=[world])


def test_the_contract_carries_where_tern_runs():
    import copy

    from runbook.contract import parse
    from tests.unit.test_contract import GOOD

    assert parse(GOOD).admin_cidrs == []
    assert parse({**copy.deepcopy(GOOD), "admin_cidrs": ["10.20.250.0/24"]}).admin_cidrs == ["10.20.250.0/24"]
    for bad in ("0.0.0.0/0", "10.20.250.1/24", "tern-host"):
        with pytest.raises(ContractError, match="admin_cidrs.0"):
            parse({**copy.deepcopy(GOOD), "admin_cidrs": [bad]})


def test_teardown_forgets_the_stacks_certificate(tmp_path):
    c = client_tls.ensure(tmp_path / "dev", "postgres")
    client_tls.pin_server(tmp_path / "dev", "ec2-a", c.pem)
    assert client_tls.forget(tmp_path / "dev") and not (tmp_path / "dev" / "tls").exists()
    assert client_tls.existing(tmp_path / "dev") is None and not client_tls.forget(tmp_path / "dev")


def test_without_a_certificate_sql_goes_through_the_host():
    class Host:
        local_socket = False
        name = "r1"

    pg = PgHost(Host(), bin_dir="/x", data_dir="/d", socket_dir="/s", port=5432)
    assert not pg.over_tls and pg.sql_url() is None
    pg.client, pg.tcp_host = object(), "10.0.0.1"
    pg.host.local_socket = True     # a local socket: always that way
    assert not pg.over_tls
