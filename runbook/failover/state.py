"""The state of a failover run, typed: what its acts returned and checkpointed, read back from the journal.

The journal stays the record (every ``context`` update, in order: :meth:`Journal.context`);
:class:`RunState` is that record with a name and a type for each value the plans and the report use.
A key it does not know (a journal of an older or newer tern, a value only one plan keeps) lands
in :attr:`RunState.extra`, so every journal still loads and resumes.

It is also a mapping (``state["final_lsn"]``, ``state.get(...)``, ``state.update(...)``): the runner
applies what an act returns with ``update``. In that view a field that is None is absent, as the key
was in the journal's dict. The plans read ``state.final_lsn`` (typed, None until known) where they
test whether a value is known yet, and ``state["candidate"]`` where the step needs it by now: before
the preflight that raises KeyError, which a dry run shows as "to do".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..journal import Journal


@dataclass(eq=False)   # equality and the rest of the mapping protocol: Mapping's, over the view below
class RunState(MutableMapping[str, Any]):
    # -- recorded when the run is created ----------------------------------------------------
    requested_candidate: str | None = None        # failover-ec2 --candidate
    stack: str | None = None
    outputs_hash: str | None = None
    source_database: str | None = None            # host:port/db of the source when the run began

    # -- preflight ---------------------------------------------------------------------------
    candidate: str | None = None                  # the node that becomes the leader ("aurora" in hop 2)
    others: list[str] | None = None               # the other EC2 replicas (hop 1)
    leader: str | None = None                     # hop 2 and its rollback: the EC2 leader's replica name
    switch_mode: str | None = None                # pooler or url (chosen when the run is created)
    app_endpoint: str | None = None               # pooler mode: host:port the app writes to throughout
    source_endpoint: str | None = None            # host:port the app wrote to before the switch
    target_endpoint: str | None = None            # host:port it writes to after (hop 2 and rollback)
    source_timeline: int | None = None
    source_connection_limit: int | None = None
    source_system_identifier: str | None = None
    unlogged_tables: list[str] | None = None
    formation: dict[str, int] | None = None       # the app's process counts, restored at the end
    collation: str | None = None
    engine: str | None = None                     # hop 2: the replication engine replicate-aurora set up
    standby: str | None = None                    # hop 2: the EC2 standby held for the full verification
    apply_headroom: dict[str, Any] | None = None  # hop 2: Aurora's apply rate against the leader's WAL rate
    app_role: str | None = None                   # rollback: the app's role, fenced on Aurora
    failover_run: str | None = None               # rollback: the failover-aurora it undoes
    leader_connection_limit: int | None = None    # rollback: the leader's limit before failover-aurora
    aurora_role_connection_limit: int | None = None

    # -- before the window -------------------------------------------------------------------
    snapshot: dict[str, str] | None = None        # node -> where its snapshot is
    consistent_point_hold: dict[str, Any] | None = None   # hop 2: what the full verification may still hold

    # -- the window ----------------------------------------------------------------------------
    pooler_in_at: float | None = None             # pooler mode, hop 1: the app moved onto the pooler
    pooler_auth_written: list[str] | None = None  # pooler mode, hop 1: nodes whose auth_file tern may have changed
    pooler_out_at: float | None = None            # pooler mode, hop 1, a fallback: the app's URL back to the source
    pooler_auth_kept: str | None = None           # pooler mode, hop 1, a fallback: why the app role's line stayed
    maintenance_at: float | None = None           # epoch seconds, as every *_at (pooler mode: PAUSE began)
    paused_seconds: float | None = None           # pooler mode: how long PAUSE waited for transactions
    fenced_at: float | None = None
    fence: dict[str, Any] | None = None
    detached: list[str] | None = None             # hop 1: replicas detached from the archive
    sentinel_id: str | None = None                # rollback: the sentinel row that marks the final point
    final_lsn: str | None = None                  # the source's last LSN (checkpointed as soon as taken)
    final_next_xid: str | None = None             # the next transaction id then: none may start after it
    candidate_failed: dict[str, str] | None = None   # hop 1: a candidate lost during catch-up, and why
    catchup_seconds: float | None = None
    sequences_synced: int | None = None
    verification: dict[str, Any] | None = None    # the in-window gate's summary
    sealed: bool | None = None                    # the old source admits no session (checkpointed)
    seal_next_xid: str | None = None              # the seal's own transaction id, accepted by the proof
    reverse_stopped: bool | None = None           # rollback: the reverse replication stopped
    forward_from: str | None = None               # rollback: replication into Aurora resumes from here
    final_proof: str | None = None                # why nothing was written after the final LSN

    # -- the point of no return and after ------------------------------------------------------
    new_leader: str | None = None
    leader_timeline: int | None = None
    promoted_at: float | None = None
    switched_over_at: float | None = None
    reverse: str | None = None                    # hop 2: the reverse replication started
    forward: str | None = None                    # rollback: replication into Aurora resumed (or why not)
    switched_at: float | None = None
    started_at: float | None = None               # the app back in service
    smoke_test: str | None = None
    verification_full: dict[str, Any] | None = None   # every row (hop 1 after the switch, hop 2 before the freeze)
    repoint: dict[str, str] | None = None         # hop 1: replica -> how it follows the new leader
    repoint_failures: dict[str, str] | None = None

    extra: dict[str, Any] = field(default_factory=dict)   # keys this version does not know: kept as they are

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> "RunState":
        """The state from a journal's accumulated context (unknown keys kept in ``extra``)."""
        state = cls()
        state.update(context)
        return state

    @classmethod
    def from_journal(cls, journal: Journal) -> "RunState":
        return cls.from_context(journal.context())

    def to_context(self) -> dict[str, Any]:
        """The state as a journal context: the fields that are set, then ``extra``."""
        return dict(self)

    # -- the mapping view: a field that is None is absent ---------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in _FIELD_SET:
            value = getattr(self, key)
            if value is None:
                raise KeyError(key)
            return value
        return self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in _FIELD_SET:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __delitem__(self, key: str) -> None:
        if key in _FIELD_SET:
            if getattr(self, key) is None:
                raise KeyError(key)
            setattr(self, key, None)
        else:
            del self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from (name for name in FIELDS if getattr(self, name) is not None)
        yield from self.extra

    def __len__(self) -> int:
        return sum(1 for _ in self)


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RunState) if f.name != "extra")
_FIELD_SET = frozenset(FIELDS)
