"""The WAL-G restore path, against real PostgreSQL: a replica restored through SsmHost (the SSM stand-in) with
``wal-g backup-fetch`` from the S3 stand-in, replaying with ``wal-g wal-fetch`` what the source archives after
its base backup - before the restore and while it runs as a standby (runbook/standins/world.py, walg.py).
"""

from __future__ import annotations

import shutil
import time

import pytest

from runbook.restore import restore_replica, source_identity
from runbook.sandbox import Sandbox
from runbook.standins.world import AwsWorld
from runbook.status import replica_host
from tests.conftest import make_root

pytestmark = [pytest.mark.functional, pytest.mark.timeout(600)]

TABLE = "tern_walg_probe"


def test_a_replica_restored_through_ssm_and_walg_replays_wal_archived_after_the_base_backup():
    root = make_root()
    sb = Sandbox(root / "sandbox")
    try:
        sb.up(replicas=2, scale=1, rate=20, start_app=False)     # the base backup is taken here
        source = sb.node("source")
        # written after the base backup, archived before the restore
        source.psql(f"CREATE TABLE {TABLE} (n int PRIMARY KEY, phase text);\n"
                    f"INSERT INTO {TABLE} SELECT g, 'before restore' FROM generate_series(1, 500) g;\n"
                    "SELECT pg_switch_wal();", database="app")
        with AwsWorld(sb, latency=0.05, boot_seconds=0) as world:
            outputs = world.outputs
            assert outputs.source.archive.kind == "s3" and outputs.replicas[0].commands.kind == "ssm"
            replica = outputs.replicas[0]
            what = restore_replica(outputs, replica, timeout=300,
                                   identity=source_identity(outputs, timeout=10))
            # the base backup came from the bucket, by WAL-G's name for it (base_<first WAL segment>)
            assert what.startswith("restored from base_0000000"), what
            pg = replica_host(replica)
            assert pg.read_marker()["restored_from"] == what.removeprefix("restored from ")
            settings = pg.query_one("SELECT pg_is_in_recovery() AS standby, current_setting('restore_command') AS rc")
            assert settings == {"standby": True,
                                "rc": f"envdir {outputs.source.archive.env_dir} wal-g wal-fetch %f %p"}

            # written while the replica runs: the sync pushes the segment, the standby's wal-fetch finds it
            source.psql(f"INSERT INTO {TABLE} SELECT g, 'after restore' FROM generate_series(501, 800) g;\n"
                        "SELECT pg_switch_wal();", database="app")
            deadline, counts = time.monotonic() + 90, {}
            while time.monotonic() < deadline:
                rows = pg.query(f"SELECT phase, count(*) AS n FROM {TABLE} GROUP BY phase", database="app") \
                    if pg.query_one(f"SELECT to_regclass('{TABLE}') IS NOT NULL AS present", database="app")["present"] else []
                counts = {r["phase"]: r["n"] for r in rows}
                if counts.get("after restore") == 300:
                    break
                time.sleep(0.5)
            assert counts == {"before restore": 500, "after restore": 300}, counts

            summary = world.summary()
            assert summary["archive"]["wal_files_pushed"] >= 2 and summary["archive"]["push_errors"] == 0, summary
            # the base backup was fetched on the "instance", by wal-g, through SSM Run Command
            with world.ssm._lock:
                scripts = {inv.script: inv.status for inv in world.ssm.invocations.values()}
            fetches = [status for script, status in scripts.items() if " wal-g backup-fetch " in script]
            assert fetches == ["Success"], scripts
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)
