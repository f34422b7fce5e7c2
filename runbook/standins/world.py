"""The AWS + Heroku world of a rehearsal, stood in around a running sandbox (``invoke rehearse --adapters aws``).

The runbook then talks to the sandbox's real PostgreSQL servers and dynos through its REAL adapters:

* every host command through :class:`~runbook.adapters.ssm_host.SsmHost` -> the SSM stand-in
  (:mod:`runbook.standins.ssm`: as root, the agent's bare environment, ``latency`` seconds per command,
  throttled polling, full output in its S3 bucket), one managed instance per EC2 replica;
* the app through :class:`~runbook.adapters.heroku_app.HerokuApp` -> the Heroku stand-in
  (:mod:`runbook.standins.heroku`) over the sandbox's real dyno processes (:class:`LocalAppBackend`);
* snapshots through :class:`~runbook.adapters.aws_snapshots.EbsSnapshots` -> EC2 as moto emulates it
  in-process (``moto.mock_aws``): one instance per replica with a data volume. moto patches botocore for
  every client but answers only the AWS hostnames it knows; a request to an ``endpoint_url`` on
  127.0.0.1 (the SSM and S3 stand-ins) goes through to the stand-in untouched (checked). moto also
  swaps the credentials in the environment for its own while it runs: this module starts it first and
  sets the stand-ins' credentials afterwards.

:meth:`AwsWorld.__enter__` writes ``<sandbox>/outputs.aws.json`` in the real contract's shape
(``replicas[].commands`` kind ``ssm`` with ``instance_id``, ``region``, ``output_bucket``; ``app`` kind
``heroku`` with its API key as a reference ``env:TERN_STANDIN_HEROKU_API_KEY``, and ``state_dir`` so the
report can still read the sandbox app's ledger), and sets the environment boto3 and the adapters read
(``AWS_ENDPOINT_URL_SSM`` / ``_S3``, credentials, ``TERN_HEROKU_API_URL``, the smoke-test contract).
:meth:`AwsWorld.__exit__` stops the stand-ins and puts the environment back as it was.

The restore runs through this world too (``archive="s3"``, the default): the source's archive is put into
an S3 bucket in WAL-G's layout and kept flowing while the source archives (:mod:`runbook.standins.archive`,
Heroku's side), the outputs' ``source.archive`` is that bucket (kind ``s3``, with the env directory), and
what the instances' user data installs is stood in: ``wal-g`` (:mod:`runbook.standins.walg`) on the agent's
PATH, its env directory, each replica's certificate and key in ``replicas[].tls_dir`` (on AWS:
``/etc/tern/postgresql``). ``restore_all`` then fetches the base backup with ``wal-g backup-fetch`` over SSM,
and every standby replays with ``wal-g wal-fetch``. ``archive="directory"`` keeps the sandbox's own archive
in the outputs, for replicas restored beforehand with the local outputs (whose servers do not have the
world's ``wal-g`` on their PATH): ``bench/failover_ec2.py`` restores once and copies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..contract import Outputs, parse
from .archive import HerokuArchive, install_host_tools, make_tls_files
from .heroku import LOCAL_SMOKE_SQL, HerokuStandIn, LocalAppBackend
from .ssm import SsmStandIn

REGION = "us-east-1"
OUTPUT_BUCKET = "tern-rehearsal-ssm-output"
API_KEY_VAR = "TERN_STANDIN_HEROKU_API_KEY"
OUTPUTS_NAME = "outputs.aws.json"
HOSTS_DIR = "aws-hosts"     # under the sandbox: the instances' wal-g, envdir and WAL-G env directory
# what the adapters and boto3 read from the environment while the world is up (put back afterwards)
ENV_KEYS = ("AWS_ENDPOINT_URL_SSM", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
            "AWS_REGION", API_KEY_VAR, "TERN_HEROKU_API_URL", "TERN_SMOKE_URL", "TERN_SMOKE_SQL")


class AwsWorld:
    """Use as a context manager around a sandbox that is up (servers and app running)."""

    def __init__(self, sandbox, *, latency: float = 1.0, boot_seconds: float = 1.0,
                 grace_seconds: float = 30.0, region: str = REGION, archive: str = "s3") -> None:
        if archive not in ("s3", "directory"):
            raise ValueError(f"archive is s3 or directory, not {archive!r}")
        self.sandbox = sandbox
        self.archive_kind = archive
        self.archive = None       # runbook.standins.archive.HerokuArchive (archive="s3")
        self.latency = latency
        self.boot_seconds = boot_seconds
        self.grace_seconds = grace_seconds
        self.region = region
        self.ssm: SsmStandIn | None = None
        self.heroku: HerokuStandIn | None = None
        self.instances: dict[str, str] = {}        # replica name -> instance id (EC2 and SSM alike)
        self.outputs_file = Path(sandbox.root) / OUTPUTS_NAME
        self._moto = None
        self._saved_env: dict[str, str | None] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "AwsWorld":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        import boto3
        from moto import mock_aws

        local = self.sandbox.outputs()
        self._saved_env = {k: os.environ.get(k) for k in ENV_KEYS}
        for k in ENV_KEYS:
            os.environ.pop(k, None)
        # EC2 first: mock_aws replaces the environment's credentials while it runs (ours come after)
        self._moto = mock_aws()
        self._moto.start()
        ec2 = boto3.Session(region_name=self.region).client("ec2")
        for r in local["replicas"]:
            zone = r["availability_zone"] if r["availability_zone"].startswith(self.region) else None
            run = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="r6i.large",
                                    **({"Placement": {"AvailabilityZone": zone}} if zone else {}),
                                    BlockDeviceMappings=[{"DeviceName": "/dev/sdf",
                                                          "Ebs": {"VolumeSize": 10, "VolumeType": "gp3"}}],
                                    TagSpecifications=[{"ResourceType": "instance",
                                                        "Tags": [{"Key": "Name", "Value": r["name"]}]}])
            self.instances[r["name"]] = run["Instances"][0]["InstanceId"]
        hosts = Path(self.sandbox.root) / HOSTS_DIR      # what the instances' user data installs
        tools = (install_host_tools(hosts, self.sandbox.os_user),) if self.archive_kind == "s3" else ()
        self.ssm = SsmStandIn(region=self.region, latency=self.latency, agent_path=tools).start()
        self.ssm.add_bucket(OUTPUT_BUCKET)
        for instance_id in self.instances.values():
            self.ssm.add_instance(instance_id)
        if self.archive_kind == "s3":
            self.archive = HerokuArchive(self.sandbox, self.ssm, hosts, os_user=self.sandbox.os_user,
                                         prefix=local["source"]["heroku_app"]).start()
            for r in local["replicas"]:
                make_tls_files(_tls_dir(r), r["host"], r["commands"].get("os_user", "postgres"))
        self.heroku = HerokuStandIn(LocalAppBackend(self.sandbox.app_dir), app=local["app"]["name"],
                                    boot_seconds=self.boot_seconds, grace_seconds=self.grace_seconds)
        self.heroku.__enter__()
        os.environ.update({
            "AWS_ENDPOINT_URL_SSM": self.ssm.endpoint_url, "AWS_ENDPOINT_URL_S3": self.ssm.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.ssm.access_key, "AWS_SECRET_ACCESS_KEY": self.ssm.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            API_KEY_VAR: self.heroku.key, "TERN_HEROKU_API_URL": self.heroku.url,
            "TERN_SMOKE_URL": f"{self.heroku.url}/smoke", "TERN_SMOKE_SQL": LOCAL_SMOKE_SQL})
        boto3.setup_default_session()   # botocore caches the credentials it found first: start afresh
        self.outputs_file.write_text(json.dumps(self.contract(local), indent=1))
        os.chmod(self.outputs_file, 0o600)

    def close(self) -> None:
        if self.archive is not None:
            self.archive.stop()
            self.archive = None
        if self.heroku is not None:
            self.heroku.__exit__(None, None, None)
        if self.ssm is not None:
            self.ssm.stop()
        if self._moto is not None:     # first: it puts back (or deletes) the credentials it replaced
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.setdefault(k, "-")
            self._moto.stop()
            self._moto = None
        for k, v in self._saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        self._saved_env = {}
        import boto3

        boto3.DEFAULT_SESSION = None    # no client made later reuses the stand-ins' credentials
        self.outputs_file.unlink(missing_ok=True)

    # -- the outputs contract ----------------------------------------------------------------------
    def contract(self, local: dict[str, Any]) -> dict[str, Any]:
        """The sandbox's outputs with the AWS / Heroku channels a real stack exports."""
        out = json.loads(json.dumps(local))
        out["region"] = self.region
        for r in out["replicas"]:
            r["commands"] = {"kind": "ssm", "instance_id": self.instances[r["name"]], "region": self.region,
                             "output_bucket": OUTPUT_BUCKET, "os_user": r["commands"].get("os_user", "postgres")}
            # one machine, many "instances": each keeps its TLS files beside its data directory
            # (on AWS: /etc/tern/postgresql, from the instance's user data)
            r["tls_dir"] = _tls_dir(r)
        if self.archive is not None:
            out["source"]["archive"] = self.archive.contract()
        out["app"] = {"kind": "heroku", "name": local["app"]["name"], "api_key": f"env:{API_KEY_VAR}",
                      "state_dir": local["app"]["state_dir"]}
        parse(out, origin="stand-in outputs")
        return out

    @property
    def outputs(self) -> Outputs:
        from ..contract import load_file

        return load_file(self.outputs_file)

    # -- what went through the stand-ins -----------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Counts a report (and a test) can show: what really went through SSM, S3, EC2 and Heroku."""
        assert self.ssm is not None and self.heroku is not None
        calls = list(self.ssm.calls)
        by_op: dict[str, int] = {}
        for op, outcome in calls:
            key = op if outcome == "ok" else f"{op}:{outcome}"
            by_op[key] = by_op.get(key, 0) + 1
        with self.ssm._lock:
            invocations = list(self.ssm.invocations.values())
        seconds = sorted((inv.ended or 0) - (inv.started or 0) for inv in invocations if inv.started and inv.ended)
        requests = [(m, p.split("?")[0]) for m, p, _, _ in list(self.heroku.requests)]
        snapshots = []
        try:
            import boto3

            ec2 = boto3.Session(region_name=self.region).client("ec2")
            # the instances' own volumes only (moto also lists the snapshots behind its built-in images)
            volumes = [v["VolumeId"] for v in ec2.describe_volumes(Filters=[
                {"Name": "attachment.instance-id", "Values": list(self.instances.values())}])["Volumes"]]
            snapshots = [{"id": s["SnapshotId"], "volume": s["VolumeId"], "state": s["State"],
                          "tags": {t["Key"]: t["Value"] for t in s.get("Tags", [])}}
                         for s in ec2.describe_snapshots(OwnerIds=["self"], Filters=[
                             {"Name": "volume-id", "Values": volumes}])["Snapshots"]] if volumes else []
        except Exception as exc:  # noqa: BLE001 - a summary never fails the run
            snapshots = [{"error": type(exc).__name__}]
        return {
            "ssm": {"latency_seconds": self.latency, "commands": len(invocations),
                    "failed": sum(inv.status != "Success" for inv in invocations),
                    "calls": by_op, "instances": dict(self.instances)},
            "heroku": {"api_requests": sum(1 for _, p in requests if p != "/smoke"),
                       "config_var_patches": sum(1 for m, p in requests if m == "PATCH" and p.endswith("/config-vars")),
                       "restarts": self.heroku.restarts, "refused_patches": len(self.heroku.refused),
                       "database_url_endpoint": _endpoint(self.heroku.config.get("DATABASE_URL")),
                       "attachments": sorted(a["name"] for a in self.heroku.attachments)},
            "ec2": {"snapshots": snapshots},
            **({"archive": self.archive.summary()} if self.archive is not None else {}),
        }


def _tls_dir(replica: dict[str, Any]) -> str:
    return replica["data_dir"].rstrip("/") + ".tls"


def _endpoint(url: str | None) -> str | None:
    if not url:
        return None
    from ..pg import url_endpoint

    host, port, _ = url_endpoint(url)
    return f"{host}:{port}"
