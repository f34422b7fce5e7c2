"""Verification between two databases (``invoke verify`` and the failovers' gates).

:func:`verify` is the engine (:mod:`runbook.verify.engine`): ``schema``, ``counts``,
``sample`` or ``full``; :func:`gate` is what a failover runs before its point of no
return. Both fail on any difference and on anything they could not check.
"""

from __future__ import annotations

from .engine import MODES, VerifyReport, verify

__all__ = ["MODES", "VerifyReport", "gate", "verify"]


def gate(source_url: str, target_url: str, *, sample_percent: float, sequences: str = "at_least",
         timeout: float = 10.0, jobs: int = 2) -> VerifyReport:
    """Schema, row counts of every table, every sequence, and ``sample_percent`` of rows compared in full."""
    return verify(source_url, target_url, mode="sample", sample_percent=sample_percent, sequences=sequences,
                  timeout=timeout, jobs=jobs)
