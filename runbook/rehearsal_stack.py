"""``invoke rehearse --stack NAME``: the whole migration on a real rehearsal stack, from ``pulumi up`` to its destroy.

Before anything runs (a refusal here exits 2 and changes nothing):

* the stack is a committed rehearsal stack, by the rule ``invoke teardown`` uses
  (:func:`runbook.teardown.check_marked`: never prod; ``Pulumi.<stack>.yaml`` exists and says
  ``tern:rehearsal: true``), and ``HEROKU_API_KEY`` is set (the failovers move the rehearsal app's
  ``DATABASE_URL``; the stack's outputs name the key ``env:HEROKU_API_KEY``);
* ``pulumi stack output --json -s NAME``: the stack exists in the backend you are logged in to (every
  pulumi call names the stack with ``-s``: the operator's selected stack is never changed);
* the config check (``pulumi config --json``, secrets blinded): every key ``infra/config.py`` reads, checked
  by its own ``from_mapping``; ``tern:rehearsal`` true in the effective config too; the two passwords set as
  secrets and no longer the committed placeholders; ``tern:walg_sha256`` set (``pulumi up`` refuses without).

Then one journaled run (``<state_dir>/<stack>/runs/rehearse-stack-*``), one step each: ``pulumi-up``;
``outputs`` (the contract, which must say ``rehearsal: true`` for this stack); ``hosts-ready`` (every SSM
host's first-boot script finished, ``cloud-init status --wait`` as root: a script that failed - a pinned
download whose checksum did not match stops it - stops the rehearsal here, saying where to look);
``restore``, ``failover-ec2``, ``replicate-aurora``, ``failover-aurora`` through the adapters the outputs name
(SSM, Heroku, RDS); ``report`` (the hops' reports in one); ``app-back``: the rehearsal app back on its
source, through the adapters the failovers use - the fence (and hop 1's seal) lifted on the source, its
``DATABASE_URL`` set back to the source's URL (``TERN_SOURCE_DATABASE_URL``, kept by hop 1's switch), the
config vars tern wrote removed, maintenance off; what the app wrote since hop 1 went to the stack and is
discarded with it. When the app cannot be put back (the source unreachable), nothing is destroyed: the
error says what to do. ``teardown``: ``pulumi destroy`` under ``invoke teardown``'s whole rule
(:func:`~runbook.teardown.check_rehearsal`, live outputs included; a first ``pulumi up`` that failed
half-way saves no outputs, so then the check this run made before its ``up`` stands in), then the EBS and
Aurora snapshots this rehearsal's failovers took (by their run's label) are deleted (any left are named).
The emptied stack and ``Pulumi.<stack>.yaml`` stay, so the next rehearsal runs with the same secrets;
``invoke teardown --stack NAME`` removes the stack itself.

A failure once ``pulumi up`` has started puts the app back and tears the stack down (unless ``--keep``) and
ends the run. When the
teardown fails too, the error says what is still up and the run stays open: the same command again retries
the teardown and nothing else. A run killed half-way (the laptop died) resumes where it stopped: a step
done is not run again; ``pulumi up`` cut short is checked with ``pulumi preview --expect-no-changes`` before
it runs again; ``restore`` skips replicas already restored; each failover resumes its own journal, or
reports its run when it completed. Every wait is bounded: pulumi's commands (interrupted past their
timeout), the hosts' first boot, and each phase by its own settings.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .adapters import app_for as default_app_for
from .adapters import host_for as default_host_for
from .contract import Outputs, load_pulumi
from .errors import CommandError, ConfigError, PreflightError, RunbookError, StepError, TimeoutExpired
from .journal import Journal, RunLock
from .redact import redact, redact_data
from .settings import Settings
from .steps import Runner, Step
from .teardown import check_marked, check_rehearsal, destroy, run_pulumi

KIND = "rehearse-stack"
UP_TIMEOUT = 2 * 3600.0          # Aurora, DMS and the instances: typically 20-40 minutes
DESTROY_TIMEOUT = 2 * 3600.0
PREVIEW_TIMEOUT = 900.0
READ_TIMEOUT = 120.0             # stack output, config, export
READY_TIMEOUT = 45 * 60.0        # the hosts' first boot (apt, PostgreSQL, WAL-G) after `pulumi up`
READY_INTERVAL = 15.0
SECRET_KEYS = ("replication_password", "pooler_admin_password")
PLACEHOLDER = "PLACEHOLDER"      # the committed stack files' stand-in for a secret (never decryptable)
SOURCE_URL_VAR = "TERN_SOURCE_DATABASE_URL"   # the source's URL, kept by hop 1's switch (runbook/failover/ec2.py)
# the config vars tern writes on the app (hop 1's and hop 2's rollback URLs): removed once the app is back
TERN_APP_VARS = (SOURCE_URL_VAR, "TERN_EC2_DATABASE_URL")
FAILOVER_KINDS = ("failover-ec2", "failover-aurora")   # the runs whose snapshots (labelled by run id) go too


@dataclass
class Phases:
    """What runs on the stack once it is up: the runbook's own entry points (:func:`runbook_phases`).
    Each takes the outputs and returns what it did (a failover: its report)."""

    restore: Callable[[Outputs], dict[str, Any]]
    failover_ec2: Callable[[Outputs], dict[str, Any]]
    replicate_aurora: Callable[[Outputs], dict[str, Any]]
    failover_aurora: Callable[[Outputs], dict[str, Any]]


def runbook_phases(settings: Settings, *, progress: Callable[[str], None],
                   byte_progress: Callable[[str, int, int], None] | None = None) -> Phases:
    from .failover.run import failover_aurora, failover_ec2
    from .replication.setup import replicate_aurora
    from .restore import restore_all

    def yes(question: str) -> bool:      # the operator confirmed the whole rehearsal before `pulumi up`
        return True

    return Phases(
        restore=lambda o: restore_all(o, timeout=settings.restore_timeout, connect_timeout=settings.connect_timeout,
                                      progress=byte_progress, state_dir=Path(settings.state_dir)),
        failover_ec2=lambda o: failover_ec2(o, settings, confirm=yes, progress=progress),
        replicate_aurora=lambda o: replicate_aurora(o, settings, replica_identity_full=True, progress=progress),
        failover_aurora=lambda o: failover_aurora(o, settings, confirm=yes, progress=progress))


@dataclass
class _Ctx:
    data: dict[str, Any]
    runner: Any = None


@dataclass
class StackRehearsal:
    stack: str
    project_dir: Path
    settings: Settings                       # state_dir already narrowed to the stack (stack_settings)
    phases: Phases
    hops: int = 2
    keep: bool = False
    confirm: Callable[[str], bool] = lambda question: False
    progress: Callable[[str], None] = lambda message: None
    host_for: Callable[[Any], Any] = default_host_for
    app_for: Callable[[Any], Any] = default_app_for
    # lift the fence (and seal) failover-ec2 left on the source: (source URL, its connection limit before)
    unfence: Callable[[str, int], None] | None = None
    # delete the snapshots labelled by these run ids in this region; returns the ids deleted, by kind
    delete_snapshots: Callable[[list[str], str], dict[str, list[str]]] | None = None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    up_timeout: float = UP_TIMEOUT
    destroy_timeout: float = DESTROY_TIMEOUT
    ready_timeout: float = READY_TIMEOUT
    ready_interval: float = READY_INTERVAL
    journal: Journal | None = field(default=None, init=False)
    _outputs: Outputs | None = field(default=None, init=False)

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Rehearse; returns the combined report. Raises ConfigError/PreflightError (exit 2, nothing run)
        before ``pulumi up``, StepError (exit 1) after it, naming what was torn down or is still up."""
        check_marked(self.stack, self.project_dir, verb="rehearse on", done="rehearsed on")
        if not os.environ.get("HEROKU_API_KEY"):
            raise ConfigError("HEROKU_API_KEY is not set: the failovers move the rehearsal app's DATABASE_URL "
                              "through the Heroku Platform API (the stack's outputs name env:HEROKU_API_KEY)")
        state_dir = Path(self.settings.state_dir)
        with RunLock(state_dir, KIND):
            journal = Journal.current(state_dir, KIND)
            self._exists()
            heroku_app = self.check_config()
            if journal is None:
                question = (f"Create rehearsal stack {self.stack!r} (pulumi up: EC2, Aurora, DMS; it costs money "
                            f"while it runs), rehearse both hops on Heroku app {heroku_app!r} (its DATABASE_URL "
                            f"moves twice), then "
                            + ("leave the stack up (--keep)?" if self.keep else
                               f"put {heroku_app!r} back on its source (fence lifted, DATABASE_URL back, tern's "
                               "config vars removed) and destroy the stack? Everything the rehearsal app writes "
                               "from hop 1 on goes to the stack and is DISCARDED with it"))
                if not self.confirm(question):
                    raise PreflightError("rehearsal not confirmed; nothing was changed")
                journal = Journal.create(state_dir, KIND, stack=self.stack, hops=self.hops, keep=self.keep,
                                         heroku_app=heroku_app)
            else:
                first = journal.context()
                self.hops, self.keep = int(first.get("hops", self.hops)), bool(first.get("keep", self.keep))
                done = [s.name for s in journal.steps() if s.outcome in ("done", "skipped")]
                self.progress(f"resuming run {journal.run_id} (done: {', '.join(done) or 'nothing yet'})")
            self.journal = journal
            pending = [e for e in journal.events if e["step"] == "run" and e["event"] == "teardown_pending"]
            if pending:
                self._teardown_after_failure(pending[-1].get("reason") or "an earlier failure")
            runner = Runner(journal, self.steps(), confirm=lambda q: True, falls_back=False, progress=self.progress)
            try:
                runner.run(_Ctx(data=journal.context()))
            except StepError as exc:
                self._failed(exc)
        return json.loads(self.report_path.read_text())

    def steps(self) -> list[Step]:
        s = self.stack
        steps = [
            Step("pulumi-up", f"pulumi up -s {s} (at most {self.up_timeout / 60:.0f} min; its output: "
                              f"{self.run_dir / 'pulumi-up.log'})", act=self._up, check=self._up_already_done),
            Step("outputs", f"read stack {s}'s outputs", act=self._read_outputs),
            Step("hosts-ready", "wait for every host's first boot (cloud-init)", act=self._hosts_ready),
            Step("restore", "restore the EC2 replicas from the source's base backup",
                 act=lambda ctx: self._phase("restore", self.phases.restore)),
            Step("failover-ec2", "failover 1: Heroku -> EC2",
                 act=lambda ctx: self._phase("failover-ec2", self.phases.failover_ec2)),
        ]
        if self.hops == 2:
            steps += [
                Step("replicate-aurora", "replication from the EC2 leader into Aurora",
                     act=lambda ctx: self._phase("replicate-aurora", self.phases.replicate_aurora)),
                Step("failover-aurora", "failover 2: EC2 -> Aurora",
                     act=lambda ctx: self._phase("failover-aurora", self.phases.failover_aurora)),
            ]
        steps.append(Step("report", "the rehearsal's report", act=self._report))
        if not self.keep:
            steps.append(Step("app-back", "the rehearsal app back on its source (fence lifted, DATABASE_URL back; "
                                          "its writes since hop 1 are discarded with the stack)", act=self._app_back))
            steps.append(Step("teardown", f"tear stack {s} down (pulumi destroy, invoke teardown's rule)",
                              act=self._teardown, check=self._torn_down_already))
        return steps

    @property
    def run_dir(self) -> Path:
        assert self.journal is not None
        return self.journal.run_dir

    @property
    def report_path(self) -> Path:
        return self.run_dir / "report.json"

    # -- before anything ----------------------------------------------------------------------------------
    def _exists(self) -> None:
        """The stack exists, asked with ``-s`` (``pulumi stack select`` would change the operator's selected stack)."""
        try:
            self._pulumi(["stack", "output", "--json", "-s", self.stack], timeout=READ_TIMEOUT)
        except RunbookError as exc:
            raise ConfigError(f"stack {self.stack!r} cannot be read in the Pulumi backend you are logged in "
                              f"to (`pulumi whoami -v`; create it with `pulumi stack init {self.stack}`): {exc}") from None

    def check_config(self) -> str:
        """The effective config as the program will read it; returns the Heroku app's name. ConfigError."""
        from infra import binaries
        from infra.config import NAMESPACE, from_mapping

        try:
            printed = self._pulumi(["config", "--json", "-s", self.stack], timeout=READ_TIMEOUT).stdout
            entries = json.loads(printed)
        except RunbookError as exc:
            raise ConfigError(f"stack {self.stack}'s config cannot be read: {exc}") from None
        except json.JSONDecodeError:
            raise ConfigError(f"stack {self.stack}'s config: pulumi printed something that is not JSON") from None
        values: dict[str, Any] = {}
        secrets: set[str] = set()
        for key, entry in (entries or {}).items():
            if not key.startswith(f"{NAMESPACE}:") or not isinstance(entry, dict):
                continue
            name = key.split(":", 1)[1]
            if entry.get("secret"):
                secrets.add(name)
            else:
                values[key] = entry["objectValue"] if "objectValue" in entry else entry.get("value")
        where = f"(pulumi config set --secret {NAMESPACE}:{{key}} ... -s {self.stack})"
        for name in SECRET_KEYS:
            if f"{NAMESPACE}:{name}" in values:
                raise ConfigError(f"{NAMESPACE}:{name} is set in plain text: set it as a secret "
                                  + where.format(key=name))
        committed = ((yaml.safe_load((self.project_dir / f"Pulumi.{self.stack}.yaml").read_text()) or {})
                     .get("config") or {})
        for name in SECRET_KEYS:
            value = committed.get(f"{NAMESPACE}:{name}")
            if isinstance(value, dict) and PLACEHOLDER in str(value.get("secure", "")):
                raise ConfigError(f"{NAMESPACE}:{name} is still the committed placeholder: set it "
                                  + where.format(key=name))
        if str(values.get(f"{NAMESPACE}:rehearsal")).lower() != "true":
            raise PreflightError(f"refusing to rehearse on {self.stack!r}: its effective config does not say "
                                 f"{NAMESPACE}:rehearsal: true")
        try:
            cfg = from_mapping(values, replication_password="set" if "replication_password" in secrets else None,
                               pooler_admin_password="set" if "pooler_admin_password" in secrets else None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"stack {self.stack}'s config: {exc}") from None
        if "replication_password" not in secrets:
            raise ConfigError(f"stack config is missing {NAMESPACE}:replication_password "
                              + where.format(key="replication_password"))
        if not cfg.walg_sha256:
            raise ConfigError(f"stack config is missing {NAMESPACE}:walg_sha256, the SHA-256 of "
                              f"{binaries.WALG_ASSET}.tar.gz ({cfg.walg_version}) the replicas verify WAL-G "
                              f"against (pulumi config set {NAMESPACE}:walg_sha256 <64 hex digits> -s {self.stack})")
        return cfg.heroku_app

    # -- the steps ------------------------------------------------------------------------------------------
    def _up(self, ctx: _Ctx) -> dict[str, Any]:
        self._pulumi(["up", "--yes", "--non-interactive", "-s", self.stack], timeout=self.up_timeout,
                     log=self.run_dir / "pulumi-up.log")
        return {"detail": "stack up"}

    def _up_already_done(self, ctx: _Ctx) -> bool:
        """Only for an ``up`` a crash cut short: done if a preview finds nothing left to change."""
        assert self.journal is not None
        if not self.journal.started("pulumi-up"):
            return False
        self.progress(f"pulumi up was cut short: pulumi preview --expect-no-changes -s {self.stack}")
        try:
            self._pulumi(["preview", "--expect-no-changes", "--non-interactive", "-s", self.stack],
                         timeout=PREVIEW_TIMEOUT, log=self.run_dir / "pulumi-up.log")
        except RunbookError:
            return False
        return True

    @property
    def outputs(self) -> Outputs:
        if self._outputs is None:
            self._outputs = load_pulumi(self.stack, cwd=self.project_dir, timeout=READ_TIMEOUT)
        return self._outputs

    def _read_outputs(self, ctx: _Ctx) -> dict[str, Any]:
        o = self.outputs
        if o.stack != self.stack or o.rehearsal is not True:
            raise PreflightError(f"stack {self.stack}'s outputs say stack {o.stack!r}, rehearsal {o.rehearsal}: "
                                 "not this rehearsal stack")
        return {"detail": f"{len(o.replicas)} replicas, Aurora {o.aurora.writer_endpoint}",
                "resources": resources(o)}

    def _hosts_ready(self, ctx: _Ctx) -> dict[str, Any]:
        o = self.outputs
        channels = [(r.name, r) for r in o.replicas] + [(n.name, n) for n in (o.pooler.nodes if o.pooler else [])]
        hosts = {name: self.host_for(as_root(node)) for name, node in channels if node.commands.kind == "ssm"}
        ids = {name: node.commands.instance_id for name, node in channels}
        deadline = self.clock() + self.ready_timeout
        waiting: dict[str, str] = {name: "not asked yet" for name in hosts}
        while waiting:
            for name in list(waiting):
                left = max(30.0, deadline - self.clock())
                try:
                    res = hosts[name].run(["cloud-init", "status", "--wait"], timeout=min(left, 900.0), check=False)
                except CommandError as exc:      # not registered with SSM yet, agent starting, ...
                    waiting[name] = redact(exc)
                    continue
                m = re.search(r"^status:\s*(\S+)", res.stdout, re.M)
                status = m.group(1) if m else f"exit {res.returncode}, no status"
                if status == "done":
                    del waiting[name]
                    self.progress(f"{name}: first boot done")
                elif status in ("error", "degraded"):
                    raise RunbookError(
                        f"{name} ({ids[name]}): its first-boot script failed (cloud-init status: {status}); it "
                        "stops at the first failing line, such as a pinned download whose checksum does not "
                        "match (tern:walg_sha256, PGDG's key): see /var/log/cloud-init-output.log on the host "
                        f"(aws ssm start-session --target {ids[name]})")
                else:
                    waiting[name] = f"cloud-init status: {status}"
            if not waiting:
                break
            if self.clock() >= deadline:
                raise TimeoutExpired(f"hosts not ready within {self.ready_timeout:.0f}s: "
                                     + "; ".join(f"{n}: {why}" for n, why in waiting.items()))
            self.sleep(self.ready_interval)
        return {"detail": f"{len(hosts)} hosts booted"}

    def _phase(self, name: str, fn: Callable[[Outputs], dict[str, Any]]) -> dict[str, Any]:
        try:
            result = fn(self.outputs)
        except StepError as exc:         # a failover that fell back carries its report: keep it beside the run
            if exc.context.get("report"):
                self._save(f"{name}.json", exc.context["report"])
            raise
        self._save(f"{name}.json", result)
        run_id = result.get("run_id") if isinstance(result, dict) else None
        outcome = result.get("outcome") if isinstance(result, dict) else None
        return {"detail": f"run {run_id}: {outcome}" if run_id else "done", f"{name}_run": run_id}

    def _report(self, ctx: _Ctx) -> dict[str, Any]:
        last = "failover-aurora" if self.hops == 2 else "failover-ec2"
        report = dict(self._load(f"{last}.json"))
        if self.hops == 2:
            report["failover_ec2"] = self._load("failover-ec2.json")
        report.update(stack=self.stack, adapters="aws", rehearsal_run=self.run_dir.name,
                      restore=self._load("restore.json"))
        self._save("report.json", report)
        # beside the last failover's own report too, as the sandbox rehearsal does (`invoke report --run`)
        run_id = report.get("run_id")
        if run_id and (Path(self.settings.state_dir) / "runs" / str(run_id)).is_dir():
            self._save_to(Path(self.settings.state_dir) / "runs" / str(run_id) / "report.json", report)
        return {"detail": str(self.report_path)}

    def _torn_down_already(self, ctx: _Ctx) -> bool:
        """Only for a teardown a crash cut short: done if the stack holds nothing any more (its outputs went
        with it, so the rule's live check could no longer pass)."""
        assert self.journal is not None
        return self.journal.started("teardown") and self._resources_left() == {}

    def _app_back(self, ctx: _Ctx | None) -> dict[str, Any]:
        """The rehearsal app back on its source before the stack goes: the fence (and hop 1's seal) lifted on
        the source first - the app must not restart onto a database that refuses it - then ``DATABASE_URL`` set
        back to the source's URL, the config vars tern wrote removed, maintenance off. Idempotent: each part is
        done only when not already so (the lift's statements set what they set). RunbookError when the app
        cannot be put back: the caller then destroys nothing."""
        from .pg import url_endpoint

        assert self.journal is not None
        if not self.journal.started("failover-ec2"):
            return {"detail": "the app never moved (no failover ran)"}
        o = self.outputs
        app = self.app_for(o.app)
        var = o.source.database_url_var
        saved, current = app.config_var(SOURCE_URL_VAR), app.config_var(var)
        source = saved or current
        stack_hosts = {(r.host, r.port) for r in o.replicas} | {(o.aurora.writer_endpoint, o.aurora.port)}
        if o.pooler is not None:
            stack_hosts.add((o.pooler.host, o.pooler.port))
        if not source or (not saved and url_endpoint(source)[:2] in stack_hosts):
            where = "is not set" if not source else "names {}:{} on stack {}".format(*url_endpoint(source)[:2], self.stack)
            raise RunbookError(f"the app's {var} {where} and {SOURCE_URL_VAR} is not set: tern does not know the "
                               f"source's URL. Set it (heroku config:set {var}=<the source's URL> -a {o.app.name}), "
                               "then run the same command again")
        host, port, db = url_endpoint(source)
        fenced = self._fenced_source_limit()
        lifted = ""
        if fenced is not None:
            try:
                (self.unfence or self._lift_fence)(source, fenced)
            except (RunbookError, OSError) as exc:
                raise RunbookError(
                    f"cannot lift the fence on the source {host}:{port}/{db}, so the app cannot go back to it: "
                    f"{redact(exc)}. Make the source reachable and run the same command again; or, as the database's "
                    f"owner from another database: ALTER DATABASE {db} CONNECTION LIMIT {fenced}; ALTER DATABASE {db} "
                    f"RESET default_transaction_read_only; ALTER ROLE <the app's role> RESET "
                    f"default_transaction_read_only; then heroku config:set {var}=<the source's URL> -a {o.app.name}"
                    ) from None
            lifted = f"fence lifted on {host}:{port}/{db} (connection limit {fenced}); "
        changes: dict[str, str | None] = {} if current == source else {var: source}
        changes.update({name: None for name in TERN_APP_VARS if app.config_var(name) is not None})
        if app.maintenance():
            app.set_maintenance(False)
        app.set_config_vars(changes)      # one release: the app restarts on the source
        now = app.config_var(var)
        if not now or url_endpoint(now)[:2] != (host, port):
            raise RunbookError(f"the app's {var} does not name the source {host}:{port} after it was set back")
        removed = [k for k in changes if k != var]
        return {"detail": f"{lifted}{var} -> the source {host}:{port}/{db}"
                          + (f"; removed {', '.join(removed)}" if removed else "")
                          + "; the rehearsal app's writes since hop 1 are discarded with the stack"}

    def _lift_fence(self, url: str, previous_limit: int) -> None:
        import psycopg

        from .failover import fence as fence_mod

        try:
            fence_mod.lift(url, None, previous_limit=previous_limit, timeout=self.settings.connect_timeout)
        except psycopg.Error as exc:
            raise RunbookError(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__) from None

    def _rehearsal_runs(self, kinds: tuple[str, ...]) -> list[Journal]:
        """The failover runs this rehearsal started (created after it, in the stack's state directory), oldest first."""
        assert self.journal is not None
        since = self.journal.events[0]["ts"] if self.journal.events else 0.0
        runs_dir = Path(self.settings.state_dir) / "runs"
        found = []
        for d in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
            if d.is_dir() and d.name.startswith(tuple(k + "-" for k in kinds)):
                j = Journal.load(Path(self.settings.state_dir), d.name)
                if j.events and j.events[0]["ts"] >= since:
                    found.append(j)
        return sorted(found, key=lambda j: j.events[0]["ts"])

    def _fenced_source_limit(self) -> int | None:
        """The source's connection limit before the fence, when this rehearsal's failover-ec2 fenced it; else None."""
        fenced = [j for j in self._rehearsal_runs(("failover-ec2",)) if j.started("fence")]
        if not fenced:
            return None
        limit = fenced[-1].context().get("source_connection_limit")
        return -1 if limit is None else int(limit)

    def _teardown(self, ctx: _Ctx | None) -> dict[str, Any]:
        from . import client_tls

        assert self.journal is not None
        # a first `pulumi up` that failed half-way saved no outputs: this run checked the stack before its up
        check_rehearsal(self.stack, self.project_dir, checked_before_up=self.journal.started("pulumi-up"))
        labels = [j.run_id for j in self._rehearsal_runs(FAILOVER_KINDS)]
        region = self.outputs.region if labels else None      # read before the destroy takes the outputs
        destroy(self.stack, self.project_dir, progress=self.progress, timeout=self.destroy_timeout,
                log=self.run_dir / "pulumi-destroy.log")
        # the hosts that trusted tern's client certificate are gone: the next rehearsal makes a new one
        client_tls.forget(Path(self.settings.state_dir))
        detail = f"pulumi destroy done; the empty stack and Pulumi.{self.stack}.yaml stay"
        snapshots: dict[str, Any] = {"labels": labels}
        if labels:
            try:
                snapshots["deleted"] = (self.delete_snapshots or _delete_snapshots)(labels, region)
                gone = [i for ids in snapshots["deleted"].values() for i in ids]
                detail += f"; this rehearsal's snapshots deleted: {', '.join(gone) or 'none were taken'}"
            except (RunbookError, OSError) as exc:
                snapshots["left"] = redact(exc)
                detail += (f"; SNAPSHOTS LEFT (they cost money): the EBS snapshots tagged tern:label and the Aurora "
                           f"cluster snapshots tern-<label> for labels {', '.join(labels)} in {region} "
                           f"(could not delete them: {redact(exc)})")
        if self.report_path.exists():
            report = json.loads(self.report_path.read_text())
            report["teardown"] = {"detail": detail, "snapshots": snapshots}
            self._save("report.json", report)
        return {"detail": detail}

    # -- failures -------------------------------------------------------------------------------------------
    def _failed(self, exc: StepError) -> None:
        assert self.journal is not None
        step = exc.context.get("step")
        failed = [e for e in self.journal.events if e["step"] == step and e["event"] == "failed"]
        reason = (failed[-1].get("detail") if failed else None) or redact(exc)
        if step == "app-back":
            raise StepError(f"the rehearsal on {self.stack} completed (report: {self.report_path}), but the app "
                            f"could not be put back on its source, so the stack was NOT destroyed: {reason}; STILL "
                            f"UP: {self._left_up()}; run the same command again once that is fixed (it puts the app "
                            f"back, then tears the stack down; nothing else runs again)", step="app-back") from None
        if step == "teardown":
            raise StepError(f"the rehearsal on {self.stack} completed (report: {self.report_path}), but its "
                            f"teardown failed: {reason}; STILL UP: {self._left_up()}; run the same command again "
                            f"to retry the teardown (nothing else runs again), or `invoke teardown --stack "
                            f"{self.stack} --yes`", step="teardown") from None
        if self.keep:
            self.journal.finish("failed", reason)
            raise StepError(f"rehearsal on {self.stack} failed: {reason}; --keep: the stack is left up "
                            f"({self._left_up()}): `invoke teardown --stack {self.stack} --yes` when done",
                            step=step) from None
        self.journal.record("run", "teardown_pending", reason=reason)
        self._teardown_after_failure(reason)

    def _teardown_after_failure(self, reason: str) -> None:
        """Tear the stack down after ``reason``; always raises StepError (the rehearsal failed)."""
        assert self.journal is not None
        self.progress(f"the rehearsal failed ({reason}): putting the app back, then tearing stack {self.stack} down")
        if not self.journal.is_done("app-back"):
            self.journal.record("app-back", "start", detail="after a failure")
            try:
                back = self._app_back(None)["detail"]
            except (RunbookError, OSError) as a:
                self.journal.record("app-back", "failed", detail=redact(a))
                raise StepError(f"rehearsal on {self.stack} failed: {reason}; the app could not be put back on its "
                                f"source, so the stack was NOT destroyed (STILL UP: {self._left_up()}): {redact(a)}; "
                                f"then run the same command again (it puts the app back and tears the stack down; "
                                f"nothing else runs again)", step="app-back") from None
            self.journal.record("app-back", "done", detail=back)
        self.journal.record("teardown", "start", detail="after a failure")
        try:
            if self._resources_left() == {}:
                detail = "nothing to destroy: the stack holds no resources"
            else:
                detail = self._teardown(None)["detail"]
        except (RunbookError, OSError) as t:
            self.journal.record("teardown", "failed", detail=redact(t))
            raise StepError(f"rehearsal on {self.stack} failed: {reason}; AND its teardown failed: {redact(t)}; "
                            f"STILL UP: {self._left_up()}; run the same command again to retry the teardown "
                            f"(nothing else runs again), or `invoke teardown --stack {self.stack} --yes`",
                            step="teardown") from None
        self.journal.record("teardown", "done", detail=detail)
        self.journal.finish("failed", f"{reason}; torn down")
        raise StepError(f"rehearsal on {self.stack} failed: {reason}; the stack was torn down ({detail}); this "
                        f"run's journal and what the phases reported stay in {self.run_dir}", step="teardown")

    def _resources_left(self) -> dict[str, int] | None:
        """What the stack still holds, by type (``pulumi stack export``); None when it cannot be read."""
        try:
            data = json.loads(self._pulumi(["stack", "export", "-s", self.stack], timeout=READ_TIMEOUT).stdout)
        except (RunbookError, json.JSONDecodeError):
            return None
        counts: dict[str, int] = {}
        for r in ((data or {}).get("deployment") or {}).get("resources") or []:
            typ = str(r.get("type", ""))
            if typ and typ != "pulumi:pulumi:Stack" and not typ.startswith("pulumi:providers:"):
                counts[typ] = counts.get(typ, 0) + 1
        return counts

    def _left_up(self) -> str:
        left = self._resources_left()
        named = (self.journal.context().get("resources") if self.journal is not None else None) or {}
        if left == {}:
            return "nothing (the stack holds no resources)"
        parts = []
        if left:
            parts.append(f"{sum(left.values())} resources (" + ", ".join(f"{n} {t}" for t, n in sorted(left.items()))
                         + ")")
        else:
            parts.append("whatever `pulumi up` created (`pulumi stack -s " + self.stack + "` lists it)")
        if named:
            parts.append("including " + json.dumps(named, sort_keys=True))
        return "; ".join(parts)

    # -- helpers --------------------------------------------------------------------------------------------
    def _pulumi(self, args: list[str], *, timeout: float, log: Path | None = None):
        return run_pulumi(args, cwd=self.project_dir, timeout=timeout, log=log)

    def _save(self, name: str, data: Any) -> None:
        self._save_to(self.run_dir / name, data)

    @staticmethod
    def _save_to(path: Path, data: Any) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(redact_data(data), indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)

    def _load(self, name: str) -> Any:
        path = self.run_dir / name
        if not path.exists():
            raise RunbookError(f"{path} is missing: the step that writes it did not finish")
        return json.loads(path.read_text())


def _delete_snapshots(labels: list[str], region: str) -> dict[str, list[str]]:
    from .adapters.aws_snapshots import delete_labelled

    return delete_labelled(labels, region=region)


def as_root(node: Any) -> Any:
    """``node`` whose commands run as root: the first-boot check must work before (or without) the
    ``postgres`` user the runbook's commands run as - a script stopped early never creates it."""
    return node.model_copy(update={"commands": node.commands.model_copy(update={"os_user": "root"})})


def resources(o: Outputs) -> dict[str, Any]:
    """What the stack's outputs name that costs money while it is up (for "still up" messages)."""
    out: dict[str, Any] = {"replicas": {r.name: r.commands.instance_id for r in o.replicas}}
    if o.pooler is not None:
        out["poolers"] = {n.name: n.commands.instance_id for n in o.pooler.nodes}
    api = o.aurora.api
    out["aurora"] = getattr(api, "cluster_identifier", None) or o.aurora.writer_endpoint
    if o.dms is not None:
        out["dms_replication_instance"] = o.dms.replication_instance_arn
    return out
