"""Drills: Murphy's law, rehearsed (``invoke drill``).

Each scenario (:mod:`.scenarios`) injects one fault - a host crash, a partition, a surge, a full disk, a
killed runbook - at a seeded random moment of a real failover on a fresh sandbox (:mod:`.lab`), then checks
what an after-action review asks (:mod:`.run`): acknowledged writes lost, duplicates, writes the old
database accepted after the fence, and whether the run completed, fell back or stopped as it should.
Partitions go through a loopback TCP proxy the drill starts (:mod:`.proxy`).
"""

from .scenarios import BY_NAME, SCENARIOS, Scenario, names

__all__ = ["BY_NAME", "SCENARIOS", "Scenario", "names"]
