"""Snapshots of a node before a point of no return.

Sandbox (``commands.kind == local``): a base backup of the node (``pg_basebackup``, works
on a standby) beside its data directory. AWS: an EBS snapshot of the replica's volume
(:mod:`runbook.adapters.aws_snapshots`, with the AWS adapters).
"""

from __future__ import annotations

from ..postgres import PgHost


class LocalSnapshots:
    def __init__(self, pg: PgHost) -> None:
        self.pg = pg
        self.root = pg.data_dir.rstrip("/") + ".snapshots"

    def path(self, label: str) -> str:
        return f"{self.root}/{label}"

    def exists(self, label: str) -> bool:
        return self.pg.host.exists(f"{self.path(label)}/backup_manifest")

    def create(self, label: str, *, timeout: float) -> str:
        target = self.path(label)
        self.pg.host.run(["rm", "-rf", target], timeout=60)
        self.pg.host.run(["mkdir", "-p", "-m", "700", self.root], timeout=30)
        # a slot for the backup's own WAL stream: a standby fed by the archive removes restored segments
        # at its restartpoints, and a long backup (gigabytes) would lose the WAL it still needs
        slot = "tern_snapshot_" + "".join(ch if ch.isalnum() else "_" for ch in label.lower())[-40:]
        self._drop_slot(slot)
        try:
            self.pg.host.run([f"{self.pg.bin_dir}/pg_basebackup", "-h", self.pg.socket_dir, "-p", str(self.pg.port),
                              "-U", self.pg._user(), "-D", target, "-Ft", "-X", "stream", "-c", "fast",
                              "--no-password", "-C", "-S", slot], timeout=timeout)
        finally:
            self._drop_slot(slot)
        return target

    def completed(self, label: str, *, timeout: float) -> str:
        """A base backup is complete when :meth:`create` returns (the EBS snapshot's later check, here at once)."""
        if not self.exists(label):
            from ..errors import RunbookError

            raise RunbookError(f"no snapshot labelled {label} under {self.root}")
        return self.path(label)

    def _drop_slot(self, slot: str) -> None:
        from ..postgres import literal

        self.pg.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     f"WHERE slot_name = {literal(slot)} AND NOT active")


def snapshots_for(replica, pg: PgHost):
    if replica.commands.kind == "local":
        return LocalSnapshots(pg)
    from .aws_snapshots import EbsSnapshots  # arrives with the AWS adapters

    return EbsSnapshots(replica)
