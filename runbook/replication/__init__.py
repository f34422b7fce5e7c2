"""Hop 2's replication from the EC2 leader into Aurora, behind one engine interface.

* :mod:`.leader` - which EC2 node leads (the app's database endpoint after failover 1);
* :mod:`.risks` - the preflight risk register (severity, what tern does about each finding);
* :mod:`.schema` - the schema copied to Aurora as its master role (no superuser there);
* :mod:`.engines` - the engine interface and its two engines: ``native`` and ``dms`` (the stack's DMS task,
  through :mod:`runbook.adapters.dms`); which one replicate-aurora used is recorded in its journal;
* :mod:`.native` - native logical replication (publication on EC2, subscription on Aurora);
* :mod:`.headroom` - does Aurora's apply keep up with the leader's writes (failover-aurora's preflight,
  ``invoke status``);
* :mod:`.setup` - ``invoke replicate-aurora``: the journaled steps that set it all up.

An engine reports the same things whatever it is: per-table sync state, lag in bytes from the
leader's *current* LSN, whether a sentinel row written on the leader has reached Aurora.
"""

from __future__ import annotations

ENGINES = ("native", "dms")
PUBLICATION = "tern_aurora"
SUBSCRIPTION = "tern_aurora"
REVERSE = "tern_rollback"           # Aurora -> EC2, set up at failover-aurora's point of no return
TERN_SCHEMA = "tern"                # tern's own objects: the sentinel table, the DDL guard
