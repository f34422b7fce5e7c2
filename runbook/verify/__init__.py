"""Verification between two databases (``invoke verify`` and the failovers' gates).

:func:`verify` is the engine (:mod:`runbook.verify.engine`): ``schema``, ``counts``,
``sample`` or ``full``; :func:`gate` is what a failover runs before its point of no
return. Both fail on any difference and on anything they could not check.
"""

from __future__ import annotations

from .engine import MODES, SamplePlan, VerifyReport, choose_sample, verify

__all__ = ["MODES", "SamplePlan", "VerifyReport", "choose_sample", "gate", "verify"]


def gate(source_url: str, target_url: str, *, sample_percent: float, sample_rows: int, sample_timeout: float,
         sequences: str = "at_least", timeout: float = 10.0, source_connections=None,
         ignore_extensions: bool = False, target_connections=None,
         sample_plan: SamplePlan | None = None) -> VerifyReport:
    """What a failover checks inside its window, in O(catalog + sample), never O(rows): the schema,
    every sequence, and a sample of rows (``sample_percent``, at most ``sample_rows`` per table,
    each statement within ``sample_timeout``) compared in full. Unlogged tables are listed, not
    compared (a physical copy has them empty). The full verification runs outside the window.
    ``ignore_extensions``: an extension missing on the target is not a difference (hop 2: Aurora
    offers an allow-list; the risk register named the ones left out). ``source_connections`` /
    ``target_connections``: tern's open sessions on a side that admits no new one (a fenced source, a
    sealed target). ``sample_plan``: the sample chosen and read before the window
    (:func:`choose_sample`), so that the window reads pages in memory, not on disk."""
    return verify(source_url, target_url, mode="sample", sample_percent=sample_percent, sequences=sequences,
                  timeout=timeout, jobs=1, counts=False, sample_rows=sample_rows, sample_timeout=sample_timeout,
                  source_connections=source_connections, skip_unlogged=True, ignore_extensions=ignore_extensions,
                  target_connections=target_connections, sample_plan=sample_plan)
