"""Benchmark: replicate-aurora's initial sync against ``pgcopydb clone`` on the same data, same run.

One sandbox holds the inventory data at a scale giving about ``--size-gb`` (measured with
pg_database_size and printed); restore and failover-ec2 make an EC2 leader as hop 2 starts from,
then the app is stopped (neither tool copies under load). Both tools read the same leader, over TLS
as the app would, and write to the same Aurora stand-in server:

1. ``pgcopydb clone`` into a fresh empty database there (``pgcopydb_target``, owned by Aurora's
   master role, no superuser: the role tern uses too), with as many table jobs as tern's
   parallelism (the server's ``max_sync_workers_per_subscription``) and as many index jobs as
   tern's (``INDEX_JOBS`` in runbook/replication/setup.py); the database is then dropped and Aurora
   checkpointed;
2. ``replicate-aurora``: schema, subscription, initial copy of every table, then indexes,
   foreign keys and triggers, until every table streams.

Each copy's row counts are checked against the leader. Prints each tool's time (tern's per step and
per table), their ratio, and the goal "tern no slower than pgcopydb".

    ./dev setup-bench        # installs pgcopydb (Debian package); never needed by tern or its tests
    .venv/bin/python bench/initial_sync.py [--size-gb 1] [--table-jobs N] [--index-jobs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402
from psycopg.conninfo import conninfo_to_dict  # noqa: E402

from runbook.contract import load  # noqa: E402
from runbook.failover.run import failover_ec2  # noqa: E402
from runbook.journal import Journal  # noqa: E402
from runbook.replication import native  # noqa: E402
from runbook.replication.setup import INDEX_JOBS, INDEX_MAINTENANCE_WORK_MEM  # noqa: E402
from runbook.replication.leader import aurora_master_url  # noqa: E402
from runbook.replication.setup import replicate_aurora  # noqa: E402
from runbook.restore import restore_all  # noqa: E402
from runbook.sandbox import Sandbox  # noqa: E402
from runbook.settings import Settings  # noqa: E402

# pg_database_size('app') of a fresh sandbox ~ BASE + scale * PER_SCALE (measured: scale 1 is 15 MiB,
# scale 300 about 2 GiB, scale 760 about 5 GiB)
BASE_MIB = 8.0
PER_SCALE_MIB = 6.8
TARGET_DB = "pgcopydb_target"
INSTALL_HINT = "pgcopydb is not installed: run `./dev setup-bench` (Debian: apt-get install pgcopydb)"


def scale_for(size_gb: float) -> int:
    return max(1, round((size_gb * 1024 - BASE_MIB) / PER_SCALE_MIB))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="about this much data (GiB, default 1)")
    p.add_argument("--scale", type=int, default=None, help="sandbox scale instead of --size-gb")
    p.add_argument("--table-jobs", type=int, default=None,
                   help="pgcopydb --table-jobs (default: tern's, max_sync_workers_per_subscription on Aurora)")
    p.add_argument("--index-jobs", type=int, default=INDEX_JOBS,
                   help=f"pgcopydb --index-jobs (default {INDEX_JOBS}: as many as tern builds at once)")
    p.add_argument("--repeat", type=int, default=1, help="measure both tools this many times on the same data "
                   "(alternating; medians compared)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (the human lines "
                                                       "go to stderr)")
    a = p.parse_args(argv)
    if a.size_gb <= 0 or (a.scale is not None and a.scale < 1) or (a.table_jobs is not None and a.table_jobs < 1) \
            or a.index_jobs < 1:
        p.error("--size-gb must be positive; --scale, --table-jobs and --index-jobs at least 1")
    return a


def counts(conn: psycopg.Connection, tables: list[str]) -> dict[str, int]:
    return {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*t.split(".", 1))))
            .fetchone()[0] for t in tables}


def user_tables(conn: psycopg.Connection) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tern') ORDER BY 1").fetchall()]


def table_sizes(conn: psycopg.Connection) -> dict[str, int]:
    return {r[0]: int(r[1]) for r in conn.execute(
        "SELECT n.nspname || '.' || c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 2 DESC").fetchall()}


class CopyWatch(threading.Thread):
    """Polls the subscription's per-table states on Aurora during replicate-aurora: when each table's
    copy started (state d) and ended (s or r), and how many copied at once."""

    def __init__(self, url: str, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.first: dict[str, dict[str, float]] = {}
        self.max_parallel = 0
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                conn = conn or psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                states = native.table_states(conn)
            except psycopg.Error:
                conn, states = None, {}
            now = time.monotonic() - self.t0
            for t, s in states.items():
                self.first.setdefault(t, {}).setdefault(s, now)
            self.max_parallel = max(self.max_parallel, sum(s == "d" for s in states.values()))
            self.stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def per_table(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for t, seen in self.first.items():
            start = seen.get("d")
            end = min((seen[s] for s in ("f", "s", "r") if s in seen), default=None)
            out[t] = None if start is None or end is None else round(end - start, 2)
        return out


def pgcopydb_clone(source_url: str, target: dict[str, Any], work: Path, table_jobs: int,
                   index_jobs: int) -> tuple[float, int, str]:
    """Run ``pgcopydb clone``; passwords go through a pgpass file, never the command line."""
    src = conninfo_to_dict(source_url)
    work.mkdir(parents=True, exist_ok=True)
    pgpass = work / "pgpass"
    pgpass.write_text(f"{src['host']}:{src['port']}:{src['dbname']}:{src['user']}:{src['password']}\n"
                      f"{target['host']}:{target['port']}:{target['dbname']}:{target['user']}:{target['password']}\n")
    pgpass.chmod(0o600)
    src_uri = (f"postgresql://{src['user']}@{src['host']}:{src['port']}/{src['dbname']}"
               f"?sslmode={src.get('sslmode', 'require')}")
    tgt_uri = f"postgresql://{target['user']}@{target['host']}:{target['port']}/{target['dbname']}?sslmode=disable"
    argv = ["pgcopydb", "clone", "--source", src_uri, "--target", tgt_uri, "--dir", str(work / "pgcopydb"),
            "--table-jobs", str(table_jobs), "--index-jobs", str(index_jobs),
            "--no-owner", "--no-acl", "--no-comments", "--skip-extensions"]
    env = dict(os.environ, PGPASSFILE=str(pgpass), PGAPPNAME="bench:pgcopydb")
    t0 = time.monotonic()
    # its own session: pgcopydb signals its whole process group when a step fails (it took this bench down)
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=7200, check=False,
                         start_new_session=True)
    seconds = time.monotonic() - t0
    log = res.stdout + res.stderr
    (work / "pgcopydb.log").write_text(log)
    return seconds, res.returncode, log


def pgcopydb_summary(log: str) -> list[str]:
    """pgcopydb's closing summary table (its step timings), as printed."""
    lines = log.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.search(r"\bStep\b.*\bConnection\b.*\bDuration\b", ln)), None)
    if start is None:
        return []
    return [ln for ln in lines[start:] if ln.strip() and not re.match(r"^\d\d:\d\d:\d\d ", ln)]


def measure_once(a, say, root: Path, aurora, source_url: str, master_url: str, outputs, settings, tables, expected,
                 jobs: int, rep: int) -> dict[str, Any] | None:
    """pgcopydb clone into a fresh database, then tern's replicate-aurora into Aurora's app database."""
    fig: dict[str, Any] = {}
    # 1. pgcopydb clone into a fresh database on the same Aurora stand-in
    a_info = conninfo_to_dict(master_url)
    target = {"host": a_info["host"], "port": a_info["port"], "dbname": TARGET_DB, "user": a_info["user"],
              "password": a_info["password"]}
    say(f"pgcopydb clone --table-jobs {jobs} --index-jobs {a.index_jobs} ...")
    seconds, rc, log = pgcopydb_clone(source_url, target, root / f"work-{rep}", jobs, a.index_jobs)
    fig["pgcopydb_seconds"] = round(seconds, 1)
    fig["pgcopydb_summary"] = pgcopydb_summary(log)
    if rc != 0:
        say(f"pgcopydb clone failed (exit {rc}) after {seconds:.1f} s; its last lines:")
        for ln in log.splitlines()[-25:]:
            say("  " + ln)
        return None
    with psycopg.connect(psycopg.conninfo.make_conninfo(master_url, dbname=TARGET_DB), autocommit=True) as tgt:
        got = counts(tgt, tables)
    fig["pgcopydb_rows_ok"] = got == expected
    say(f"pgcopydb clone: {seconds:.1f} s, rows {'equal' if got == expected else 'DIFFER'} to the leader's")
    for ln in fig["pgcopydb_summary"]:
        say("  " + ln)
    with psycopg.connect(master_url, autocommit=True) as master:
        master.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(TARGET_DB)))
    aurora.psql("CHECKPOINT")

    # 2. tern's replicate-aurora, the whole of it (schema, copy, indexes, guard)
    say("replicate-aurora ...")
    watch = CopyWatch(master_url)
    watch.start()
    t0 = time.monotonic()
    report = replicate_aurora(outputs, settings, replica_identity_full=True)
    tern_seconds = time.monotonic() - t0
    watch.stop.set()
    watch.join(5)
    records = [s for s in Journal.load(Path(settings.state_dir), report["run_id"]).steps()
               if s.started_at is not None and s.ended_at is not None]
    steps = {s.name: round(s.ended_at - s.started_at, 1) for s in records}
    details = {s.name: s.detail for s in records if s.name in ("initial_sync", "schema_after")}
    with psycopg.connect(master_url, autocommit=True) as master:
        got = counts(master, tables)
    fig.update(tern_seconds=round(tern_seconds, 1), tern_steps=steps, tern_rows_ok=got == expected,
               tern_table_copy_seconds=watch.per_table(), tern_max_tables_copying_at_once=watch.max_parallel)
    say(f"replicate-aurora: {tern_seconds:.1f} s, rows {'equal' if got == expected else 'DIFFER'} to the leader's")
    say("  steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in steps.items()))
    for name, detail in details.items():
        say(f"  {name}: {detail}")
    fig["tern_step_details"] = details
    say(f"  per-table copy (state d to s/r, at most {watch.max_parallel} at once): "
        + ", ".join(f"{t} {v if v is not None else '<0.3'} s" for t, v in
                    sorted(watch.per_table().items(), key=lambda kv: -(kv[1] or 0))))

    fig.update(pgcopydb_seconds=round(seconds, 1), tern_seconds=round(tern_seconds, 1))
    return fig


def reset_tern(outputs, leader, master_url: str, leader_db: str) -> None:
    """Aurora as before tern's first run: no subscription (its slot on the leader dropped with it), no tables;
    the leader without tern's DDL guard."""
    from runbook.adapters.aurora import aurora_api_for
    from runbook.replication import SUBSCRIPTION

    api = aurora_api_for(outputs.aurora)
    with psycopg.connect(master_url, autocommit=True) as master:
        if native.subscription_exists(master):
            api.subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} DISABLE", outputs.aurora.database)
            api.subscription_statement(f"ALTER SUBSCRIPTION {SUBSCRIPTION} SET (slot_name = NONE)",
                                       outputs.aurora.database)
            api.subscription_statement(f"DROP SUBSCRIPTION {SUBSCRIPTION}", outputs.aurora.database)
        for (nsp,) in master.execute("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' "
                                     "AND nspname NOT IN ('information_schema', 'public') AND nspowner <> 10").fetchall():
            master.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(nsp)))
        for (t,) in master.execute("SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
                                   "WHERE schemaname = 'public'").fetchall():
            master.execute(f"DROP TABLE {t} CASCADE")
        for (q,) in master.execute("SELECT format('%I.%I', sequence_schema, sequence_name) "
                                   "FROM information_schema.sequences WHERE sequence_schema = 'public'").fetchall():
            master.execute(f"DROP SEQUENCE IF EXISTS {q} CASCADE")
    native.remove_guard(leader, leader_db)
    # the leader without tern's publication and schema (pgcopydb would copy them, and refuses the publication)
    leader.psql(f"DROP PUBLICATION IF EXISTS {native.PUBLICATION};\nDROP SCHEMA IF EXISTS {native.TERN_SCHEMA} CASCADE;",
                database=leader_db)
    leader.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = "
                f"'{SUBSCRIPTION}' AND NOT active")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = sys.stderr if a.json else sys.stdout

    def say(msg: str = "") -> None:
        print(msg, file=out, flush=True)

    if shutil.which("pgcopydb") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    scale = a.scale or scale_for(a.size_gb)
    root = Path(tempfile.mkdtemp(prefix="tern-bench-sync-", dir="/tmp"))
    root.chmod(0o755)
    sb = Sandbox(root / "sandbox")
    fig: dict[str, Any] = {"scale": scale}
    try:
        t = time.monotonic()
        say(f"building: sandbox at scale {scale}, restore, failover-ec2 ...")
        sb.up(replicas=2, scale=scale, rate=20)
        outputs = load("local", sb.root)
        restore_all(outputs, timeout=7200, connect_timeout=5)
        settings = Settings(sandbox_dir=sb.root, state_dir=root / "state", catchup_timeout=600,
                            full_verification="skip", restore_timeout=7200)
        hop1 = failover_ec2(outputs, settings, confirm=lambda q: True)
        leader = sb.node(hop1["new_leader"])
        sb.app().stop_all(timeout=15)             # neither tool copies under load
        fig["build_seconds"] = round(time.monotonic() - t, 1)
        source_url = sb.app().config_var("DATABASE_URL")          # the EC2 leader, the app's role, TLS
        master_url = aurora_master_url(outputs)
        with psycopg.connect(source_url, autocommit=True) as src:
            tables = user_tables(src)
            expected = counts(src, tables)
            fig["size_bytes"] = src.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            sizes = table_sizes(src)
        with psycopg.connect(master_url, autocommit=True) as master:
            tern_jobs = int(master.execute("SHOW max_sync_workers_per_subscription").fetchone()[0])
            mwm = master.execute("SHOW maintenance_work_mem").fetchone()[0]
            master.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TARGET_DB)))
        jobs = a.table_jobs or tern_jobs
        fig.update(tern_table_jobs=tern_jobs, pgcopydb_table_jobs=jobs, pgcopydb_index_jobs=a.index_jobs,
                   aurora_maintenance_work_mem=mwm)
        say(f"data: {fig['size_bytes'] / 2**30:.2f} GiB (scale {scale}, asked {a.size_gb:g} GiB), "
            f"{sum(expected.values()):,} rows in {len(tables)} tables; largest: "
            + ", ".join(f"{t} {s / 2**20:.0f} MiB" for t, s in list(sizes.items())[:3])
            + f"; built in {fig['build_seconds']:.0f} s")
        for node in (leader, sb.node("aurora")):
            node.psql("CHECKPOINT")

        runs: list[dict[str, Any]] = []
        for rep in range(a.repeat):
            if rep:
                reset_tern(outputs, leader, master_url, conninfo_to_dict(source_url)["dbname"])
                with psycopg.connect(master_url, autocommit=True) as master:
                    master.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TARGET_DB)))
                for node in (leader, sb.node("aurora")):
                    node.psql("CHECKPOINT")
            say(f"-- run {rep + 1} of {a.repeat}")
            settings = settings.replace(state_dir=root / f"state-{rep}")
            one = measure_once(a, say, root, sb.node("aurora"), source_url, master_url, outputs, settings, tables,
                               expected, jobs, rep)
            if one is None:
                return 2
            runs.append(one)
        seconds = statistics.median(r["pgcopydb_seconds"] for r in runs)
        tern_seconds = statistics.median(r["tern_seconds"] for r in runs)
        steps = runs[-1]["tern_steps"]
        fig["runs"] = runs
        fig.update(pgcopydb_seconds=seconds, tern_seconds=tern_seconds,
                   tern_rows_ok=all(r["tern_rows_ok"] for r in runs),
                   pgcopydb_rows_ok=all(r["pgcopydb_rows_ok"] for r in runs))
        ratio = tern_seconds / seconds
        fig["ratio_tern_over_pgcopydb"] = round(ratio, 2)
        fig["goal_met"] = bool(ratio <= 1.0 and fig["tern_rows_ok"] and fig["pgcopydb_rows_ok"])
        say()
        say(f"{'tool':34s} {'seconds':>8s}")
        say(f"{'pgcopydb clone':34s} {seconds:8.1f}")
        say(f"{'tern replicate-aurora':34s} {tern_seconds:8.1f}")
        say(f"  of which the initial copy (tables)  {steps.get('initial_sync', 0):6.1f}")
        say(f"  of which indexes, FKs, triggers     {steps.get('schema_after', 0):6.1f}")
        say(f"tern / pgcopydb: {ratio:.2f}x; goal: tern no slower than pgcopydb: "
            f"{'met' if fig['goal_met'] else 'not met'}")
        say(f"same source (the EC2 leader over TLS), same target server, {jobs} table jobs each; differences: "
            f"both build a table's indexes as its copy ends, tern {INDEX_JOBS} at a time at "
            f"{INDEX_MAINTENANCE_WORK_MEM}, pgcopydb {a.index_jobs} at a time at 1 GB (Aurora's "
            f"default maintenance_work_mem is {mwm}); "
            f"pgcopydb also runs VACUUM ANALYZE on every table, tern does not; tern's apply workers run in "
            f"the server, pgcopydb's COPY crosses a TCP connection")
        if a.json:
            print(json.dumps(fig, indent=1, default=str))
        return 0
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
