"""schema_after never builds on Aurora beside a finisher of the initial copy still running
(runbook/replication/setup.py: Finisher, stop_finishers)."""

from __future__ import annotations

import threading

import pytest

from runbook.errors import StepError
from runbook.replication import setup


class Session:
    """A connection whose statement runs until it is cancelled (as psycopg's cancel_safe does to a
    CREATE INDEX on Aurora), or forever when ``deaf``."""

    def __init__(self, deaf: bool = False) -> None:
        self.deaf = deaf
        self.cancels = 0
        self._cancelled = threading.Event()

    def run_statement(self) -> None:
        while not self._cancelled.wait(0.05):
            pass

    def cancel_safe(self, timeout: float) -> None:
        self.cancels += 1
        if not self.deaf:
            self._cancelled.set()

    def close(self) -> None:
        self._cancelled.set()


class Building(setup.Finisher):
    """A finisher whose one statement outlives the copy (an index build after restore_timeout)."""

    def __init__(self, session: Session) -> None:
        super().__init__("tern-index-builder")
        self.session = session
        self.running = threading.Event()

    def _run(self) -> None:
        from contextlib import nullcontext

        with self.tracked(nullcontext(self.session)) as conn:
            self.running.set()
            conn.run_statement()


@pytest.fixture
def building():
    made: list[Building] = []

    def make(deaf: bool = False) -> Building:
        f = Building(Session(deaf))
        f.start()
        assert f.running.wait(5) and f.alive
        made.append(f)
        return f

    yield make
    for f in made:
        f.session.close()
        f.join(5)


class WentOn(Exception):
    """schema_after reached its first look at the leader (what it does before building anything)."""


def test_schema_after_cancels_a_finisher_still_building_and_waits_for_it(building, monkeypatch):
    f = building()
    alive_then = []

    def first_look(*a, **kw):
        alive_then.append(f.alive)
        raise WentOn

    monkeypatch.setattr(setup, "_leader", first_look)
    with pytest.raises(WentOn):
        setup.schema_after(object())
    # it went on only once the finisher's statement was cancelled and its thread gone
    assert alive_then == [False] and f.session.cancels == 1 and not f.alive


def test_schema_after_refuses_beside_a_finisher_that_does_not_stop(building, monkeypatch):
    f = building(deaf=True)
    monkeypatch.setattr(setup, "FINISHER_CANCEL_SECONDS", 0.5)
    monkeypatch.setattr(setup, "_leader", lambda *a, **kw: pytest.fail("schema_after went on beside a finisher"))
    with pytest.raises(StepError, match="tern-index-builder still building on Aurora"):
        setup.schema_after(object())
    assert f.alive and f.session.cancels == 1


def test_finish_after_the_copy_waits_then_cancels_and_never_returns_with_the_thread_alive(building):
    f = building()
    f.finish(wait=0.2)               # the copy ended; the build outlived the wait: cancelled, joined
    assert not f.alive and f.session.cancels == 1
    deaf = building(deaf=True)
    with pytest.raises(StepError, match="still building"):
        setup.stop_finishers([deaf], timeout=0.3)
