"""Each drill scenario once, with a fixed seed, on real PostgreSQL: the fault fires at the seed's moment of a
real failover and the run must end as the scenario expects, with nothing lost, duplicated or written to the
old database after the fence (``invoke drill``; the same checks as ``bench/drills.py``).

By default every hop-1 scenario once; ``TERN_TESTS=all`` runs all 22.
One lab for the module: its pristine sandboxes (hop 1 restored; hop 2 with hop 1 done and replicate-aurora
streaming) are built once and copied for each run. The full verification (the witness and its rebuild, ~10 s
a run) is skipped except where the scenario is about the replica it holds."""

from __future__ import annotations

import json

import pytest

from runbook.drills import BY_NAME
from runbook.settings import Settings
from tests.conftest import subset

pytestmark = pytest.mark.functional

# the waits a fault that stops a run pays; long enough for what the scenarios do (restarts of at most 5 s,
# partitions of at most 8 s)
SETTINGS = Settings(catchup_timeout=15, repoint_timeout=30, smoke_timeout=10, promote_timeout=15,
                    stop_app_timeout=10, full_verification="skip")

# (scenario, hop, seed, the first run's outcome for that seed's moment). The seeds were chosen for
# moments that matter: inside the window, at the point of no return, a whole instance down.
RUNS = [
    ("candidate-crash-catchup", 1, 2, "completed"),          # the candidate's PostgreSQL killed mid catch-up
    ("candidate-crash-after-promotion", 1, 1, "stopped"),    # the new leader's instance down: stop, then resume
    ("other-replica-crash", 1, 1, "stopped"),                # the other replica's instance down: repoint stops
    ("runbook-killed", 1, 2, "killed"),                      # SIGKILL after the point of no return, resumed
    ("partition-replica-source", 1, 2, "completed"),         # the archive out of reach during the catch-up
    ("partition-tern-source", 1, 5, "fell_back"),            # tern's route to the source reset in the window
    ("traffic-surge", 1, 1, "completed"),
    ("slow-archive", 1, 1, "completed"),
    ("source-unreachable-fence", 1, 1, "fell_back"),
    ("rogue-client", 1, 2, "completed"),
    ("journal-disk-full", 1, 4, "fell_back"),                # the next record after the gate fails: fall back
    ("candidate-crash-catchup", 2, 2, "fell_back"),          # Aurora down for good: the catch-up times out
    ("candidate-crash-after-promotion", 2, 1, "stopped"),
    ("other-replica-crash", 2, 5, "fell_back"),              # the standby the full verification holds
    ("runbook-killed", 2, 7, "killed"),                      # SIGKILL in the window, then resumed
    ("partition-replica-source", 2, 1, "completed"),         # Aurora's subscription reset during the catch-up
    ("traffic-surge", 2, 1, "completed"),
    ("source-unreachable-fence", 2, 1, "fell_back"),
    ("aurora-restart-catchup", 2, 1, "completed"),
    ("slot-lost", 2, 3, "fell_back"),
    ("rogue-client", 2, 2, "completed"),
    ("journal-disk-full", 2, 3, "fell_back"),
]
WITH_WITNESS = {("other-replica-crash", 2)}
# By default every hop-1 scenario once (one lab build); the two only hop 2 has (Aurora restarted during the
# catch-up, the slot lost) are injected by tests/functional/test_hop2_faults.py. Every scenario on both hops
# with TERN_TESTS=all (about 4.5 minutes on 2 cores).
DEFAULT = {(n, 1) for n, h, _, _ in RUNS if h == 1}
SELECTED = subset(RUNS, {r for r in RUNS if (r[0], r[1]) in DEFAULT})


@pytest.fixture(scope="module")
def lab():
    from runbook.drills.lab import Lab, default_root

    lab = Lab(default_root(), SETTINGS)
    yield lab
    lab.close()


def test_every_scenario_is_run_on_every_hop_it_has():
    assert {(n, h) for n, h, _, _ in RUNS} == {(s.name, h) for s in BY_NAME.values() for h in s.hops}


@pytest.mark.parametrize("name, hop, seed, first", SELECTED, ids=[f"{n}-hop{h}" for n, h, _, _ in SELECTED])
def test_drill(lab, name, hop, seed, first):
    from runbook.drills.run import run_one

    lines: list[str] = []
    overrides = {"full_verification": "witness"} if (name, hop) in WITH_WITNESS else None
    r = run_one(lab, BY_NAME[name], hop, seed, say=lines.append, settings=overrides)
    shown = json.dumps({k: v for k, v in r.items() if k != "steps"}, indent=1, default=str)
    assert r["ok"], "\n".join(lines[-40:]) + "\n" + shown
    assert r["first_outcome"] == first, shown
    assert r["outcome"] in ("completed", "fell_back") and r["acknowledged"] > 0
    assert (r["lost"], r["duplicates"], r["post_fence"], r["unexplained"], r["torn"]) == (0, 0, 0, 0, 0)
    if r["first_outcome"] in ("stopped", "killed"):
        assert r["resumed"] and r["outcome"] == "completed", shown
    if name == "rogue-client":
        assert r["rogue_acknowledged"] > 0, shown
