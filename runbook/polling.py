"""Waiting with a deadline: the one polling loop every bounded wait uses (after Patroni's ``polling_loop``).

>>> t = [0.0]
>>> clock, sleep = (lambda: t[0]), (lambda s: t.__setitem__(0, t[0] + s))
>>> wait_until(lambda: t[0] >= 3 and "ready", timeout=10, interval=1, what="x", clock=clock, sleep=sleep)
'ready'
>>> wait_until(lambda: None, timeout=2, interval=1, what="the replica to catch up", clock=clock, sleep=sleep)
Traceback (most recent call last):
...
runbook.errors.TimeoutExpired: timed out after 2s waiting for the replica to catch up
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, TypeVar

from .errors import TimeoutExpired

T = TypeVar("T")


def polling_loop(timeout: float, interval: float, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[float]:
    """Yield the seconds elapsed, then sleep ``interval``, until ``timeout`` has passed (at least once)."""
    start = clock()
    while True:
        elapsed = clock() - start
        yield elapsed
        if clock() - start >= timeout:
            return
        sleep(min(interval, max(0.0, timeout - (clock() - start))) or interval)


def wait_until(probe: Callable[[], T], *, timeout: float, interval: float, what: str,
               last: Callable[[], str] | None = None, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``probe`` until it returns something truthy (returned); raise TimeoutExpired after ``timeout``.

    ``last`` may describe the last state seen, for the error message.
    """
    for _ in polling_loop(timeout, interval, clock=clock, sleep=sleep):
        result = probe()
        if result:
            return result
    detail = f" ({last()})" if last else ""
    raise TimeoutExpired(f"timed out after {timeout:g}s waiting for {what}{detail}")
