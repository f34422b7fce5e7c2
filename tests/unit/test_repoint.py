"""Repoint's decisions (follow, wait, rebuild, drop a slot) and its orchestration against fakes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from runbook.adapters.local_host import LocalHost
from runbook.adapters.ssm_host import SsmHost
from runbook.errors import DatabaseError, StepError
from runbook.failover import repoint as rp
from runbook.failover.repoint import Judgement, Observation, Verdict, judge, slots_to_drop
from runbook.pg import lsn_to_int
from runbook.settings import Settings

FORK = lsn_to_int("0/5000A28")
HISTORY = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000A28\tno recovery target specified\n"


# -- deciding -------------------------------------------------------------------------------------
def test_history_file_and_fork_point():
    assert rp.parse_history(HISTORY) == [(1, lsn_to_int("0/3000000")), (2, FORK)]
    assert rp.history_file(3) == "00000003.history" and rp.history_file(26) == "0000001A.history"
    assert rp.lsn_text(FORK) == "0/5000A28" and rp.lsn_text(lsn_to_int("16/B374D848")) == "16/B374D848"


def test_a_replica_past_the_fork_point_provably_cannot_follow():
    j = judge(Observation(replay_lsn=FORK + 0x100, timeline=2), leader_tli=3, fork=FORK)
    assert j == Judgement(Verdict.CANNOT_FOLLOW, "was at 0/5000B28 past the fork point 0/5000A28 of timeline 3")
    # WAL received (not yet replayed) on the old timeline past the fork is as much proof
    assert judge(Observation(replay_lsn=FORK - 8, receive_lsn=FORK + 8, timeline=2, receiver_status="streaming",
                             received_tli=2), 3, FORK).verdict is Verdict.CANNOT_FOLLOW
    # ... but with no receiver running, receive_lsn is where a (failed) attempt starts: a segment
    # boundary past the fork, not WAL it has (seen here: a replica at the fork point judged past it)
    assert judge(Observation(replay_lsn=FORK, receive_lsn=(FORK | 0xFFFFFF) + 1, timeline=2), 3, FORK).verdict \
        is Verdict.WAIT


def test_a_replica_at_or_before_the_fork_point_is_waited_for():
    for lsn in (FORK, FORK - 0x1000, None):
        assert judge(Observation(replay_lsn=lsn, timeline=2), 3, FORK).verdict is Verdict.WAIT, lsn


def test_nothing_but_proof_makes_a_rebuild():
    # it fetched the leader's history: it may be on the leader's timeline already, past the fork legitimately
    assert judge(Observation(replay_lsn=FORK + 0x100, timeline=2, has_leader_history=True), 3, FORK).verdict \
        is Verdict.WAIT
    # on the leader's timeline (its last restartpoint says so)
    assert judge(Observation(replay_lsn=FORK + 0x100, timeline=3), 3, FORK).verdict is Verdict.WAIT
    # not streaming, but nothing proves it cannot
    assert judge(Observation(replay_lsn=FORK, timeline=2, receiver_status="starting"), 3, FORK).verdict is Verdict.WAIT
    # PostgreSQL's own verdict in its log is proof, whatever the LSNs say
    log = ("2026-11-27 11:20:31.123 UTC [4242] LOG:  new timeline 3 forked off current database system timeline 2 "
           "before current recovery point 0/5000B28\n")
    proof = rp.log_proof(log)
    assert proof and proof.startswith("new timeline 3 forked off")
    assert judge(Observation(replay_lsn=FORK, timeline=2, log_proof=proof), 3, FORK).verdict is Verdict.CANNOT_FOLLOW
    assert rp.log_proof("FATAL:  could not start WAL streaming: ERROR:  requested starting point 0/6000000 on "
                        "timeline 2 is not in this server's history")
    assert rp.log_proof("ERROR:  requested starting point 0/7000000 is ahead of the WAL flush position of this "
                        "server 0/6000060")
    assert rp.log_proof('FATAL:  pg_hba.conf rejects replication connection for host "127.0.0.1"') is None
    assert rp.log_proof("FATAL:  could not connect to the primary server: connection refused") is None


def test_following_and_not_a_standby():
    assert judge(Observation(receiver_status="streaming", received_tli=3, timeline=2), 3, FORK).verdict \
        is Verdict.FOLLOWING
    # streaming, but still the old timeline: not yet
    assert judge(Observation(receiver_status="streaming", received_tli=2, timeline=2, replay_lsn=FORK), 3,
                 FORK).verdict is Verdict.WAIT
    assert judge(Observation(in_recovery=False, replay_lsn=FORK + 1), 3, FORK).verdict is Verdict.NOT_A_STANDBY


def test_slot_clean_up_drops_only_terns_unused_slots():
    slots = [
        {"slot_name": "tern_ec2_b", "slot_type": "physical", "active": False},    # follows: kept
        {"slot_name": "tern_ec2_c", "slot_type": "physical", "active": False},    # not following: dropped
        {"slot_name": "tern_ec2_d", "slot_type": "physical", "active": True},     # in use right now: kept
        {"slot_name": "tern_ec2_old", "slot_type": "physical", "active": False},  # a replica gone: dropped
        {"slot_name": "tern_aurora", "slot_type": "logical", "active": False},    # the next hop's: not ours here
        {"slot_name": "patroni_x", "slot_type": "physical", "active": False},     # someone else's
    ]
    assert slots_to_drop(slots, following=["ec2-b"]) == ["tern_ec2_c", "tern_ec2_old"]
    assert slots_to_drop(slots, following=["ec2-b", "ec2-c", "ec2-old"]) == []


# -- the host adapters: the secret reaches the passfile without the plan knowing which adapter ---------
def test_ssm_passfile_script_reads_the_secret_on_the_host(tmp_path):
    """The SSM script, run here with a fake `aws`: the value comes from Secrets Manager on the host."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
                                 'echo \'{"password": "s3cr3t-from-sm"}\'\n')
    (bin_dir / "aws").chmod(0o755)
    target = tmp_path / "main.pgpass"
    arn = "arn:aws:secretsmanager:eu-west-3:123:secret:repl"
    subprocess.run(["sh", "-c", SsmHost.SECRET_SCRIPT, "sh", arn, "password", "10.0.1.10:5432:*:tern_replicator:",
                    str(target)], check=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert target.read_text() == "10.0.1.10:5432:*:tern_replicator:s3cr3t-from-sm\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "--region eu-west-3" in (bin_dir / "args").read_text()


def test_local_passfile_resolves_the_reference(tmp_path, monkeypatch):
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"replication_password": "pw-local"}))
    host = LocalHost("ec2-b")
    monkeypatch.setattr(host, "_prefix", [])
    target = tmp_path / "x.pgpass"
    host.write_file_from_secret(str(target), "127.0.0.1:5433:*:tern_replicator:", f"file:{secrets}#replication_password")
    assert target.read_text() == "127.0.0.1:5433:*:tern_replicator:pw-local\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_read_file_from_returns_only_what_was_appended(tmp_path, monkeypatch):
    host = LocalHost("ec2-b")
    monkeypatch.setattr(host, "_prefix", [])
    log = tmp_path / "pg.log"
    assert host.read_file_from(str(log), 0) == ("", 0)
    log.write_text("old line\n")
    _, size = host.read_file_from(str(log), 0, limit=0)
    assert size == 9
    with log.open("a") as f:
        f.write("new line\n")
    assert host.read_file_from(str(log), size) == ("new line\n", 18)
    log.write_text("rotated\n")   # shorter than the offset: read from the start
    assert host.read_file_from(str(log), 18) == ("rotated\n", 8)


# -- orchestration against fakes ----------------------------------------------------------------------
class FakeHost:
    def __init__(self, name, node):
        self.name, self.node = name, node

    def run(self, argv, *, timeout, input=None, check=True):
        self.node.commands.append(list(argv))
        if argv[0] == "rm":
            self.node.data = False
        if "pg_basebackup" in " ".join(argv):
            self.node.data = True
            self.node.rebuilt = True

    def write_file(self, path, content, *, timeout=30.0):
        self.node.files[path] = content

    def write_file_from_secret(self, path, prefix, reference, *, timeout=60.0):
        self.node.files[path] = prefix + "<secret>\n"

    def read_file_from(self, path, offset, *, limit=16384, timeout=30.0):
        return (self.node.log, len(self.node.log)) if limit else ("", len(self.node.log))

    def exists(self, path, *, timeout=30.0):
        return path in self.node.files


class FakeNode:
    """A PgHost double: answers the SQL repoint sends, from a script of what the replica does."""

    def __init__(self, name, *, leader=False, behaviour=None, clock=None):
        self.name, self.leader, self.behaviour, self.clock = name, leader, behaviour, clock
        self.host = FakeHost(name, self)
        self.data, self.rebuilt, self.pointed_at = True, False, None
        self.commands, self.files, self.sql = [], {}, []
        self.slots: dict[str, dict] = {}
        self.log = ""
        self.log_file, self.data_dir = None, f"/data/{name}"

    def has_data(self):
        return self.data

    def is_running(self):
        return True

    def start(self, *, timeout=60):
        pass

    def stop(self, *, mode="fast", timeout=60):
        pass

    def wait_ready(self, *, timeout):
        pass

    def read_marker(self):
        return {}

    def write_marker(self, data):
        pass

    def psql(self, statement, **kw):
        self.sql.append(statement)
        if "primary_conninfo" in statement:
            self.pointed_at = self.clock.now()
        for name in list(self.slots) + [s.split("'")[1] for s in statement.split("(")[1:] if "'" in s]:
            if f"pg_create_physical_replication_slot('{name}'" in statement:
                self.slots[name] = {"slot_name": name, "slot_type": "physical", "active": False,
                                    "wal_status": "reserved"}
            if f"pg_drop_replication_slot('{name}'" in statement:
                self.slots.pop(name, None)
        return ""

    def query(self, select, **kw):
        if "pg_roles" in select:
            return []
        if "wal_status" in select:
            name = select.split("'")[1]
            return [self.slots[name]] if name in self.slots else []
        if "slot_type, active" in select:
            return list(self.slots.values())
        if "AND active" in select:
            return []
        if "pg_stat_wal_receiver" in select:
            return [self.behaviour(self)]
        raise AssertionError(select)

    def query_one(self, select, **kw):
        if select == "SELECT 1 AS ok":
            return {"ok": 1}
        if "pg_walfile_name" in select:
            return {"tl": 3}
        if "pg_read_file" in select:
            return {"h": HISTORY}
        return self.query(select, **kw)[0]


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.slept = 0.0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s
        self.slept += s


class FakeJournal:
    def __init__(self):
        self.events = []

    def record(self, step, event, **data):
        self.events.append((step, event, data))


class FakeCtx:
    def __init__(self, nodes, settings):
        from types import SimpleNamespace

        self.nodes = nodes
        self.settings = settings
        self.data = {"candidate": "ec2-a", "others": [n for n in nodes if n != "ec2-a"]}
        self.journal = FakeJournal()
        self.outputs = SimpleNamespace(credentials=SimpleNamespace(replication_password="file:/x#replication_password"))
        self.said = []

    def replica(self, name):
        from types import SimpleNamespace

        return SimpleNamespace(name=name, host="127.0.0.1", port=5433, data_dir=f"/data/{name}", bin_dir="/pg/bin",
                               socket_dir=f"/run/{name}", database="app", availability_zone="a",
                               commands=SimpleNamespace(kind="local", os_user="postgres"))

    def pg(self, name):
        return self.nodes[name]

    def say(self, message):
        self.said.append(message)

    def checkpoint(self, **fields):   # what the runner does for a real context
        self.journal.record("repoint", "progress", context=fields)
        self.data.update(fields)


def before_fork(node):
    return {"in_recovery": True, "replay_lsn": "0/5000A28", "receive_lsn": None, "timeline": 2,
            "receiver_status": None, "received_tli": None, "has_leader_history": False}


def streaming_after(seconds):
    def behaviour(node):
        if node.rebuilt or (node.pointed_at is not None and node.clock.now() - node.pointed_at >= seconds):
            return {**before_fork(node), "receiver_status": "streaming", "received_tli": 3, "timeline": 3,
                    "has_leader_history": True}
        return before_fork(node)
    return behaviour


def past_fork(node):
    if node.rebuilt:
        return {**before_fork(node), "receiver_status": "streaming", "received_tli": 3, "timeline": 3}
    return {**before_fork(node), "replay_lsn": "0/5000B28"}


def make(settings, **behaviours):
    clock = FakeClock()
    nodes = {"ec2-a": FakeNode("ec2-a", leader=True, clock=clock)}
    nodes.update({n: FakeNode(n, behaviour=b, clock=clock) for n, b in behaviours.items()})
    ctx = FakeCtx(nodes, settings)
    monkey = pytest.MonkeyPatch()
    monkey.setattr("runbook.secrets.resolve", lambda ref: "pw")
    return ctx, nodes, clock, monkey


def was_rebuilt(node):
    return any(c[0] == "rm" for c in node.commands)


def test_a_slow_replica_gets_the_whole_deadline_and_is_never_rebuilt_on_a_timer():
    """It streams after 30 s - ten times the 3 s after which it used to be wiped and rebuilt."""
    ctx, nodes, clock, monkey = make(Settings(repoint_timeout=120), **{"ec2-b": streaming_after(30)})
    with monkey.context():
        result = rp.repoint(ctx, clock=rp.Clock(clock.now, clock.sleep))
    assert not was_rebuilt(nodes["ec2-b"])
    assert result["repoint_failures"] == {}
    assert result["repoint"]["ec2-b"] == "streaming on timeline 3 from ec2-a (slot tern_ec2_b)"
    assert 30 <= clock.t < 35
    assert "tern_ec2_b" in nodes["ec2-a"].slots
    assert any("max_slot_wal_keep_size = '8GB'" in s for s in nodes["ec2-a"].sql)


def test_a_replica_not_following_by_the_deadline_fails_the_step_keeps_its_data_and_loses_its_slot():
    ctx, nodes, clock, monkey = make(Settings(repoint_timeout=120),
                                     **{"ec2-b": streaming_after(10_000), "ec2-c": streaming_after(5)})
    with monkey.context(), pytest.raises(StepError) as exc:
        rp.repoint(ctx, clock=rp.Clock(clock.now, clock.sleep))
    message = str(exc.value)
    assert "ec2-b: NOT following yet after 120s" in message and "run the same command again" in message
    assert "ec2-c" not in message.split("(unused slots")[0]
    assert exc.value.exit_code == 1
    assert not was_rebuilt(nodes["ec2-b"]) and nodes["ec2-b"].data
    assert 120 <= clock.t < 125
    # the slot of the one that does not follow is dropped; the follower's is kept
    assert "tern_ec2_b" not in nodes["ec2-a"].slots and "tern_ec2_c" in nodes["ec2-a"].slots
    progress = [d for s, e, d in ctx.journal.events if e == "progress"]
    assert set(progress[-1]["context"]["repoint_failures"]) == {"ec2-b"}


def test_a_replica_proven_past_the_fork_point_is_rebuilt_at_once_and_reported():
    ctx, nodes, clock, monkey = make(Settings(repoint_timeout=120), **{"ec2-b": past_fork})
    with monkey.context():
        result = rp.repoint(ctx, clock=rp.Clock(clock.now, clock.sleep))
    node = nodes["ec2-b"]
    assert was_rebuilt(node) and node.pointed_at is None   # judged before it was pointed anywhere
    basebackup = next(c for c in node.commands if "pg_basebackup" in " ".join(c))
    assert basebackup[basebackup.index("-S") + 1] == "tern_ec2_b"
    assert result["repoint"]["ec2-b"].startswith(
        "rebuilt: was at 0/5000B28 past the fork point 0/5000A28 of timeline 3; streaming on timeline 3")
    assert clock.t < 2


def test_the_replicas_own_log_proves_it_cannot_follow():
    def refused(node):
        if node.pointed_at is not None and not node.rebuilt:
            node.log = ("FATAL:  could not start WAL streaming: ERROR:  requested starting point 0/5000000 on "
                        "timeline 2 is not in this server's history\n")
        return streaming_after(0)(node) if node.rebuilt else before_fork(node)

    ctx, nodes, clock, monkey = make(Settings(repoint_timeout=120), **{"ec2-b": refused})
    with monkey.context():
        result = rp.repoint(ctx, clock=rp.Clock(clock.now, clock.sleep))
    assert was_rebuilt(nodes["ec2-b"])
    assert "rebuilt: its log says: requested starting point 0/5000000 on timeline 2" in result["repoint"]["ec2-b"]


def test_a_replica_that_died_of_the_timeline_switch_before_it_was_observed_is_rebuilt():
    """Over SSM the first look comes seconds after the pointing: the replica already PANICked at the
    switch and does not answer, but its log says why - a proof, not a wait for the deadline."""
    def died(node):
        if node.pointed_at is not None and not node.rebuilt:
            node.log = ("FATAL:  could not start WAL streaming: ERROR:  requested starting point 0/5000000 on "
                        "timeline 2 is not in this server's history\n"
                        "PANIC:  could not open file \"pg_wal/000000030000000000000005\": No such file\n")
            raise DatabaseError("ec2-b: SQL failed: psql: error: connection to server on socket failed")
        return streaming_after(0)(node) if node.rebuilt else before_fork(node)

    ctx, nodes, clock, monkey = make(Settings(repoint_timeout=120), **{"ec2-b": died})
    with monkey.context():
        result = rp.repoint(ctx, clock=rp.Clock(clock.now, clock.sleep))
    assert was_rebuilt(nodes["ec2-b"]) and result["repoint_failures"] == {}
    assert "rebuilt: its log says: requested starting point 0/5000000" in result["repoint"]["ec2-b"]
    assert clock.t < 10


def test_a_failed_rebuild_leaves_an_empty_replica_and_fails_the_step():
    ctx, nodes, clock, monkey = make(Settings(repoint_timeout=120), **{"ec2-b": past_fork})
    real_run = nodes["ec2-b"].host.run

    def run(argv, **kw):
        real_run(argv, **kw)
        if "pg_basebackup" in " ".join(argv):
            nodes["ec2-b"].data = False
            from runbook.errors import CommandError

            raise CommandError("ec2-b: pg_basebackup exited 1: could not connect")

    nodes["ec2-b"].host.run = run
    with monkey.context(), pytest.raises(StepError, match=r"ec2-b: EMPTY: was at 0/5000B28 past the fork point .*its copy of ec2-a failed: ec2-b: pg_basebackup exited 1"):
        rp.repoint(ctx, clock=rp.Clock(clock.now, clock.sleep))
    assert "tern_ec2_b" not in nodes["ec2-a"].slots
