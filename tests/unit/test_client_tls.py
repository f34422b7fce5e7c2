"""tern's client certificate (runbook.client_tls): made once per stack, private, named for the superuser."""

from __future__ import annotations

import subprocess

from runbook import client_tls
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


def test_the_url_names_the_files_never_their_contents(tmp_path):
    c = client_tls.ensure(tmp_path, "post gres")
    url = c.conninfo("10.0.1.5", 5432, "app db")
    assert url.startswith("postgresql://post%20gres@10.0.1.5:5432/app%20db?sslmode=require&sslcert=")
    assert "PRIVATE" not in url and str(c.key).replace("/", "%2F") in url


def test_the_hba_admits_the_superuser_over_tcp_by_certificate_only():
    lines = [ln.split() for ln in hba_conf("postgres", client_cert=True).splitlines() if ln and not ln.startswith("#")]
    tcp = [ln for ln in lines if ln[0] == "hostssl"]
    # the certificate lines come first (first match wins), for the superuser only, method cert
    assert tcp[0] == ["hostssl", "all", "postgres", "0.0.0.0/0", "cert"]
    assert tcp[1] == ["hostssl", "all", "postgres", "::/0", "cert"]
    assert all(ln[-1] == "scram-sha-256" for ln in tcp[2:]) and not any(ln[0] == "host" for ln in lines)
    assert "cert" not in hba_conf("postgres")


def test_without_a_certificate_sql_goes_through_the_host():
    class Host:
        local_socket = False
        name = "r1"

    pg = PgHost(Host(), bin_dir="/x", data_dir="/d", socket_dir="/s", port=5432)
    assert not pg.over_tls and pg.sql_url() is None
    pg.client, pg.tcp_host = object(), "10.0.0.1"
    pg.host.local_socket = True     # a local socket: always that way
    assert not pg.over_tls
