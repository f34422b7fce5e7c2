"""``invoke estimate``: how long the real migration takes, extrapolated from what the rehearsals measured.

Measured (the latest completed record of each kind under the state directory, every stack unless one is
named; each figure says which run or restore it came from):

* restore: base backup bytes fetched per second, and WAL bytes replayed per second from the backup's start
  to the standby taking connections (``<stack>/throughput.jsonl``, written by ``invoke restore``);
* initial sync: the database's size (``pg_database_size``) over the initial copy's seconds
  (replicate-aurora's journal);
* full verifications: rows per second of hop 1's (every row after the switch) and hop 2's (before the
  freeze), as bytes per second through the database's bytes per row (restore's or the initial sync's);
* each window: the steps from the freeze (maintenance / PAUSE) to the app started, the app's and the
  database's unavailability (each failover's report);
* WAL bytes per commit: the leader's WAL rate in hop 2's preflight sample over the app's commits per
  second then (its ledger).

Assumed (each printed beside the figure it shapes; a flag overrides each): the replicas' network
(``--network``, default r6i.4xlarge's baseline, Pulumi.prod.yaml's instance type) and data volume
(``--disk``, gp3 at 500 MB/s as infra/replicas.py makes it), the base backup's age (``--backup-age``:
the WAL since it is replayed after the fetch), the archive's latency at the cutover (``--archive-latency``:
the sandbox's archive is a local directory, Heroku's is S3), how much faster the real hosts run the
CPU-bound phases (``--cpu-factor``), and any throughput itself (``--restore-rate``, ``--replay-rate``,
``--sync-rate``, ``--verify-rate``).

With no rehearsal recorded the estimate still answers, from the documented defaults below, and says so
on every figure and in ``basis`` ("defaults"): a planning figure before the first rehearsal is worth
having, and nothing in it pretends to be measured. A figure measured on too small a sample (under
:data:`MIN_SAMPLE_BYTES`, where fixed costs - a server's start, workers starting - dominate) is shown but not
extrapolated from: the default is used and the line says why (the sandbox's default scale is such a case;
``./dev rehearse --scale 20`` or a rehearsal stack measures enough). The JSON's ``throughputs`` lists every
measured figure, where it came from and whether it was used.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MB = 1_000_000
SEGMENT = 16 * 1024 * 1024            # one WAL segment: what the cutover's flush completes and ships
# a throughput measured on less than this is mostly fixed costs (a server's start, workers starting, connections):
# shown, not extrapolated from (the sandbox's default scale holds ~15 MB; --scale 20 about 300 MB)
MIN_SAMPLE_BYTES = 256 * MB
ESTIMATE_FILE = "estimate.json"       # the last `invoke estimate`'s arguments (the review shows it beside a run)

# -- parsing sizes and rates ----------------------------------------------------------------------------------
_SIZE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12,
               "tb": 1e12, "p": 1e15, "pb": 1e15, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40,
               "pib": 2 ** 50}
_BIT_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
              "bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8}
_NUMBER = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.I)
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(name: str, raw: Any, what: str) -> tuple[float, str]:
    m = _NUMBER.match(str(raw)) if raw is not None and not isinstance(raw, bool) else None
    if m is None:
        raise ConfigError(f"{_flag(name)} must be {what}, got {raw!r}")
    value = float(m.group(1))
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{_flag(name)} must be greater than 0, got {raw!r}")
    return value, m.group(2)


def _bits_spelling(unit: str) -> bool:
    """``Gb``, ``Mb``: a lower-case b after an upper-case prefix means bits, as network speeds are written
    (``gb`` in lower case stays bytes, as people write sizes)."""
    return len(unit) == 2 and unit[1] == "b" and unit[0] in "KMGTP"


def parse_size(name: str, raw: Any) -> int:
    """``1.4TB``, ``500GB``, ``1.4TiB``, ``123456`` (bytes) -> bytes; decimal units (TB = 10^12) as Heroku
    and AWS print them, binary ones (TiB) as PostgreSQL's pg_size_pretty does. Else ConfigError naming ``name``."""
    value, unit = _number(name, raw, "a size such as 1.4TB, 500GB or 1.4TiB")
    unit = unit.lower()      # a database's size is never given in bits: 1.4Tb means bytes here
    if unit not in _SIZE_UNITS:
        raise ConfigError(f"{_flag(name)}: unknown unit {unit!r} in {raw!r} (B, KB, MB, GB, TB, PB, or KiB ... PiB)")
    return int(value * _SIZE_UNITS[unit])


def parse_rate(name: str, raw: Any) -> float:
    """Bytes per second: ``10Gbit`` / ``10Gbps`` (bits), ``1.25GB`` (bytes; ``/s`` optional), a plain number
    in MB/s. Else ConfigError naming ``name``."""
    text = str(raw).strip() if raw is not None and not isinstance(raw, bool) else raw
    if isinstance(text, str) and text.lower().endswith("/s"):
        text = text[:-2]
    value, unit = _number(name, text, "a rate such as 10Gbit, 1.25GB/s or 200 (MB/s)")
    if _bits_spelling(unit):
        unit = unit[0] + "bit"                   # 1Gb/s is a gigabit, as network speeds are written
    unit = unit.lower()
    if unit == "":
        return value * MB
    if unit in _BIT_UNITS:
        return value * _BIT_UNITS[unit]
    if unit in _SIZE_UNITS:
        return value * _SIZE_UNITS[unit]
    raise ConfigError(f"{_flag(name)}: unknown unit {unit!r} in {raw!r} (Gbit, Mbit, GB, MB, ... per second)")


def parse_duration(name: str, raw: Any, *, plain: str = "h") -> float:
    """Seconds: ``24h``, ``90min``, ``3s``, ``2d``; a plain number is in ``plain`` units."""
    value, unit = _number(name, raw, "a duration such as 24h, 90min or 3s")
    unit = unit.lower()
    if unit and unit not in _DURATION_UNITS:
        raise ConfigError(f"{_flag(name)}: unknown unit {unit!r} in {raw!r} (s, min, h, d)")
    return value * _DURATION_UNITS[unit or plain]


def parse_positive(name: str, raw: Any) -> float:
    value, unit = _number(name, raw, "a number greater than 0")
    if unit:
        raise ConfigError(f"{_flag(name)} must be a plain number, got {raw!r}")
    return value


# -- presenting -----------------------------------------------------------------------------------------------
def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def human_rate(bps: float | None) -> str:
    return "n/a" if bps is None else f"{bps / MB:.3g} MB/s"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s == math.inf:
        return "never"
    if s < 60:
        return f"{s:.2g} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min" if s >= 600 else f"{s / 60:.1f} min"
    if s < 2 * 86400:
        h, m = divmod(round(s / 60), 60)
        return f"{h} h {m:02d} min"
    return f"{s / 86400:.1f} days"


# -- what the rehearsals measured -----------------------------------------------------------------------------
@dataclass
class Throughput:
    bytes_per_second: float
    source: str              # where it was measured: "<stack>/<run id>" or "restore of ec2-a on <stack>, <time>"
    detail: str              # what was measured: "1.2 GB in 3.4 s"
    sample_bytes: float | None = None


@dataclass
class Window:
    """One failover's windows as measured, and the steps inside them."""

    source: str
    switch_mode: str
    app_seconds: float | None
    database_seconds: float | None
    catchup_step: str
    catchup_seconds: float | None
    components: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Measured:
    throughputs: dict[str, Throughput] = field(default_factory=dict)
    windows: dict[str, Window] = field(default_factory=dict)          # "hop1", "hop2"
    wal_per_commit: tuple[float, str] | None = None                  # bytes, where from
    bytes_per_row: tuple[float, str] | None = None
    verify_hold_seconds: tuple[float, str] | None = None              # hop 2: holding the standby, not comparing
    rehearsal_write_rate: tuple[float, str] | None = None             # commits/s the rehearsal's app made
    runs: list[str] = field(default_factory=list)                     # every run a figure came from

    @property
    def empty(self) -> bool:
        return not (self.throughputs or self.windows)


def _stack_dirs(state_root: Path, stack_dir: Path | None) -> list[Path]:
    if stack_dir is not None:
        return [Path(stack_dir)]
    root = Path(state_root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and ((p / "runs").is_dir() or (p / "throughput.jsonl").exists()))


def _completed_runs(dirs: list[Path], kind: str, until: float | None) -> list[tuple[float, Path, Any]]:
    """(created ts, stack dir, journal) of every completed run of ``kind``, newest first."""
    from .journal import Journal

    found = []
    for d in dirs:
        runs = d / "runs"
        if not runs.is_dir():
            continue
        for p in runs.iterdir():
            if not p.is_dir() or not p.name.startswith(kind + "-") or not (p / "journal.jsonl").exists():
                continue
            j = Journal.load(d, p.name)
            if not j.events or j.kind != kind:
                continue
            outcome = j.outcome()
            created = float(j.events[0]["ts"])
            if outcome and outcome[0] == "completed" and (until is None or created <= until):
                found.append((created, d, j))
    found.sort(key=lambda t: t[0], reverse=True)
    return found


def _saved_report(journal: Any) -> dict[str, Any]:
    try:
        return json.loads((journal.run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return {}


def _label(stack_dir: Path, run_id: str) -> str:
    return f"{stack_dir.name}/{run_id}"


def commits_per_second(run_dir: Path, start: float, end: float) -> float | None:
    """The app's mean acknowledged commits per second over [start, end], from the run's writes.json."""
    from .measure import read_writes

    w = read_writes(run_dir)
    if not w or end < start:
        return None
    width, t0 = float(w["bin_seconds"]), float(w["start"])
    first = int((start - t0) // width)
    last = max(int((end - t0) // width), first + 1)   # a span shorter than a bin: the bin it falls in
    bins = w["acks"][max(0, first):max(0, last)]
    return sum(bins) / (len(bins) * width) if bins else None


def window_of(journal: Any, report: dict[str, Any], source: str) -> Window:
    """The steps from the freeze (maintenance on, or PAUSE) to the app started, and the report's windows."""
    steps = journal.steps()
    names = [s.name for s in steps]
    first = next((i for i, n in enumerate(names) if n in ("maintenance_on", "pause")), 0)
    last = names.index("start_app") if "start_app" in names else len(steps) - 1
    components = [(s.name, round(s.ended_at - s.started_at, 3)) for s in steps[first:last + 1]
                  if s.started_at is not None and s.ended_at is not None]
    catchup = "flush" if journal.kind == "failover-ec2" else "catch_up"
    return Window(source=source, switch_mode=report.get("switch_mode") or "url",
                  app_seconds=(report.get("write_unavailability") or {}).get("seconds"),
                  database_seconds=(report.get("database_unavailability") or {}).get("seconds"),
                  catchup_step=catchup, catchup_seconds=dict(components).get(catchup), components=components)


def gather(state_root: Path, *, stack_dir: Path | None = None, until: float | None = None) -> Measured:
    """What the rehearsals recorded under ``state_root`` (every stack's directory, or only ``stack_dir``):
    the latest completed record of each kind, created no later than ``until`` when given."""
    from .measure import read_throughput

    m = Measured()
    dirs = _stack_dirs(state_root, stack_dir)
    # restore: fetch and replay
    restores = [(r, d) for d in dirs for r in read_throughput(d)
                if r.get("what") == "restore" and (until is None or r["ts"] <= until)]
    restores.sort(key=lambda t: t[0]["ts"], reverse=True)
    from .report import iso

    for r, d in restores:
        where = f"restore of {r.get('replica')} on {d.name} at {iso(r['ts'])}"
        if "restore" not in m.throughputs and r.get("fetch_seconds") and r.get("fetch_bytes"):
            m.throughputs["restore"] = Throughput(
                r["fetch_bytes"] / r["fetch_seconds"], where,
                f"{human_bytes(r['fetch_bytes'])} fetched in {r['fetch_seconds']:.3g} s", r["fetch_bytes"])
        if "replay" not in m.throughputs and r.get("replay_seconds") and r.get("replay_bytes"):
            m.throughputs["replay"] = Throughput(r["replay_bytes"] / r["replay_seconds"], where,
                                                 f"{human_bytes(r['replay_bytes'])} of WAL replayed in "
                                                 f"{r['replay_seconds']:.3g} s (the server's start included)",
                                                 r["replay_bytes"])
        if m.bytes_per_row is None and r.get("database_rows") and r.get("database_bytes"):
            m.bytes_per_row = (r["database_bytes"] / r["database_rows"],
                               f"{where}: {human_bytes(r['database_bytes'])}, {r['database_rows']:,} rows")
    # initial sync
    for created, d, j in _completed_runs(dirs, "replicate-aurora", until)[:1]:
        ctx = j.context()
        secs, size, rows = ctx.get("initial_sync_seconds"), ctx.get("initial_sync_bytes"), ctx.get("initial_sync_rows")
        if secs and size:
            m.throughputs["initial_sync"] = Throughput(
                size / secs, _label(d, j.run_id), f"{human_bytes(size)} ({rows or 0:,} rows) in {secs:.3g} s", size)
            m.runs.append(_label(d, j.run_id))
        if rows and size:
            m.bytes_per_row = (size / rows, f"{_label(d, j.run_id)}: {human_bytes(size)}, {rows:,} rows")
    # the failovers: full verifications, windows, WAL per commit
    for kind, hop in (("failover-ec2", "hop1"), ("failover-aurora", "hop2")):
        for created, d, j in _completed_runs(dirs, kind, until)[:1]:
            label = _label(d, j.run_id)
            report = _saved_report(j)
            if not report:
                continue
            m.runs.append(label)
            m.windows[hop] = window_of(j, report, label)
            full = report.get("verification_full") or {}
            compare = full.get("verify_seconds") or full.get("seconds")
            if full.get("ok") and full.get("rows") and compare and m.bytes_per_row is not None:
                bps = full["rows"] / compare * m.bytes_per_row[0]
                m.throughputs[f"verify_{hop}"] = Throughput(
                    bps, label, f"{full['rows']:,} rows in {compare:.3g} s at {m.bytes_per_row[0]:.0f} bytes a row",
                    full["rows"] * m.bytes_per_row[0])
                if full.get("verify_seconds") and full.get("seconds"):
                    m.verify_hold_seconds = (max(0.0, full["seconds"] - full["verify_seconds"]), label)
            acked, span = report.get("acknowledged_writes"), None
            if j.events:
                span = float(j.events[-1]["ts"]) - float(j.events[0]["ts"])
            rate = commits_per_second(j.run_dir, float(j.events[0]["ts"]), float(j.events[-1]["ts"])) \
                if j.events else None
            if rate and m.rehearsal_write_rate is None:
                m.rehearsal_write_rate = (rate, label)
            elif acked and span and m.rehearsal_write_rate is None:
                m.rehearsal_write_rate = (acked / span, label)
            if hop == "hop2":
                headroom = j.context().get("apply_headroom") or {}
                pre = next((s for s in j.steps() if s.name == "preflight"), None)
                cps = commits_per_second(j.run_dir, pre.started_at, pre.ended_at) if pre and pre.ended_at else None
                if headroom.get("write_bytes_per_second") and cps:
                    m.wal_per_commit = (headroom["write_bytes_per_second"] / cps,
                                        f"{label}: the leader wrote {human_rate(headroom['write_bytes_per_second'])} "
                                        f"of WAL at {cps:.0f} commits/s")
    return m


# -- the estimate -----------------------------------------------------------------------------------------------
DEFAULTS: dict[str, tuple[float, str]] = {
    # throughputs in bytes/s, used when nothing measured them (or measured too little)
    "restore": (200 * MB, "wal-g backup-fetch from S3, decompressing onto gp3: a typical figure"),
    "replay": (100 * MB, "PostgreSQL's single startup process replaying on gp3: a typical figure"),
    "initial_sync": (40 * MB, "one logical subscription's COPY into Aurora plus index builds: a typical figure"),
    "verify_hop1": (80 * MB, "tern's chunk checksums, 2 jobs: a typical figure"),
    "verify_hop2": (80 * MB, "tern's chunk checksums, 2 jobs: a typical figure"),
}
DEFAULT_WAL_PER_COMMIT = (2048.0, "2 KiB of WAL a commit: a few small rows and their index entries, a typical figure")
# no rehearsal: the windows are guesses from the sandbox's usual components (pooler switch)
DEFAULT_WINDOWS = {"hop1": (2.0, 1.2), "hop2": (1.5, 0.8)}     # (app seconds, database seconds)


@dataclass
class Assumptions:
    network: float = 5e9 / 8          # bytes/s: r6i.4xlarge's baseline (Pulumi.prod.yaml's instance_type)
    disk: float = 500 * MB            # the gp3 data volume's throughput (infra/replicas.py)
    backup_age: float = 24 * 3600     # Heroku's base backups are daily: WAL since the latest one is replayed
    archive_latency: float = 3.0      # the cutover's last segment: Heroku's push to S3, the replica's fetch
    cpu_factor: float = 1.0           # real hosts vs the rehearsal's, for the CPU-bound phases
    wal_per_commit: float | None = None
    overrides: dict[str, float] = field(default_factory=dict)   # restore / replay / initial_sync / verify (bytes/s)
    given: set[str] = field(default_factory=set)                 # which of these the operator set

    def text(self, key: str) -> str:
        mark = " (--{})".format(key.replace("_", "-")) if key in self.given else " (default; --{})".format(
            key.replace("_", "-"))
        return mark


def _rate(name: str, measured: Measured, a: Assumptions, small: list[str]) -> tuple[float, str, str]:
    """(bytes/s, how it was chosen, where it came from) for one throughput."""
    flag = {"initial_sync": "sync-rate", "verify_hop1": "verify-rate", "verify_hop2": "verify-rate"}.get(name,
                                                                                                       name + "-rate")
    key = {"verify_hop1": "verify", "verify_hop2": "verify"}.get(name, name)
    if key in a.overrides:
        return a.overrides[key], f"{human_rate(a.overrides[key])} as given (--{flag})", "given"
    t = measured.throughputs.get(name)
    default, why = DEFAULTS[name]
    if t is None:
        return default, f"{human_rate(default)}: default, nothing measured it ({why}; --{flag})", "default"
    if (t.sample_bytes or 0) < MIN_SAMPLE_BYTES:
        small.append(f"{name.replace('_', ' ')} on {human_bytes(t.sample_bytes)}")
        return default, (f"{human_rate(default)}: default; measured {human_rate(t.bytes_per_second)} on only "
                         f"{human_bytes(t.sample_bytes)}, too little to extrapolate ({why}; --{flag})"), "default"
    return t.bytes_per_second, f"{human_rate(t.bytes_per_second)} measured ({t.detail}; --{flag})", t.source


def estimate(size: int, write_rate: float, measured: Measured, a: Assumptions) -> dict[str, Any]:
    """Every phase of the real migration for a database of ``size`` bytes taking ``write_rate`` commits/s."""
    warnings: list[str] = []
    small: list[str] = []        # throughputs measured on too little to extrapolate from
    phases: list[dict[str, Any]] = []

    def phase(name: str, seconds: float | None, assumption: str, source: str, measured_here: str = "") -> None:
        phases.append({"phase": name, "seconds": None if seconds is None else (
            seconds if seconds == math.inf else round(seconds, 1)), "assumption": assumption, "source": source,
            "measured": measured_here})

    if a.wal_per_commit is not None:
        wpc, wpc_why = a.wal_per_commit, f"{a.wal_per_commit:.0f} bytes of WAL a commit as given (--wal-per-commit)"
    elif measured.wal_per_commit is not None:
        wpc = measured.wal_per_commit[0]
        wpc_why = (f"{wpc:.0f} bytes of WAL a commit as the sandbox's app ({measured.wal_per_commit[1]}; "
                   "--wal-per-commit)")
    else:
        wpc = DEFAULT_WAL_PER_COMMIT[0]
        wpc_why = f"{DEFAULT_WAL_PER_COMMIT[1]} (--wal-per-commit)"
    wal_rate = write_rate * wpc
    net = f"network {human_rate(a.network)}{a.text('network')}"
    disk = f"disk {human_rate(a.disk)}{a.text('disk')}"

    # 1. restore: fetch the base backup
    restore, restore_why, restore_src = _rate("restore", measured, a, small)
    fetch_rate = min(restore, a.network, a.disk)
    bound = "the restore rate" if fetch_rate == restore else ("the network" if fetch_rate == a.network else "the disk")
    fetch = size / fetch_rate
    phase("restore: fetch the base backup", fetch,
          f"{human_bytes(size)} at {human_rate(fetch_rate)}, bound by {bound} (restore {restore_why}; {net}; {disk})",
          restore_src, _measured_text(measured.throughputs.get("restore")))
    # 2. replay what was written since the base backup, and during the fetch, while the app keeps writing
    replay, replay_why, replay_src = _rate("replay", measured, a, small)
    backlog = wal_rate * (a.backup_age + fetch)
    if replay <= wal_rate:
        catchup = math.inf
        warnings.append(f"replay ({human_rate(replay)}) is not faster than the WAL the app writes "
                        f"({human_rate(wal_rate)}): a replica never catches up")
    else:
        catchup = backlog / (replay - wal_rate)
    phase("restore: replay and catch up to the source", catchup,
          f"{human_bytes(backlog)} of WAL ({human_seconds(a.backup_age)} since the base backup{a.text('backup_age')} "
          f"plus the fetch, at {human_rate(wal_rate)}: {write_rate:g} commits/s x {wpc_why}) replayed at {replay_why}, "
          f"less the WAL still arriving", replay_src, _measured_text(measured.throughputs.get("replay")))
    # 3. the initial copy into Aurora
    sync, sync_why, sync_src = _rate("initial_sync", measured, a, small)
    sync_rate = min(sync * a.cpu_factor, a.network)
    sync_seconds = size / sync_rate
    phase("initial sync into Aurora", sync_seconds,
          f"{human_bytes(size)} at {human_rate(sync_rate)} (initial sync {sync_why}; x{a.cpu_factor:g} CPU"
          f"{a.text('cpu_factor')}; {net}); the leader keeps {human_bytes(wal_rate * sync_seconds)} of WAL for the "
          "slot meanwhile", sync_src, _measured_text(measured.throughputs.get("initial_sync")))
    # 4. the full verifications
    for hop, title in (("hop1", "full verification, hop 1 (after the switch, app running)"),
                       ("hop2", "full verification, hop 2 (before the freeze, Aurora's apply paused)")):
        v, v_why, v_src = _rate(f"verify_{hop}", measured, a, small)
        seconds = size / (v * a.cpu_factor)
        extra = ""
        if hop == "hop2":
            hold = measured.verify_hold_seconds[0] if measured.verify_hold_seconds else 0.0
            seconds += hold
            extra = (f"; plus {hold:.2g} s holding the standby as measured; Aurora falls "
                     f"{human_bytes(wal_rate * seconds)} behind meanwhile and catches up after")
        phase(title, seconds, f"{human_bytes(size)} at {human_rate(v * a.cpu_factor)} ({v_why}; x{a.cpu_factor:g} CPU)"
                              + extra, v_src, _measured_text(measured.throughputs.get(f"verify_{hop}")))
    # 5. the windows
    for hop, title in (("hop1", "hop 1 (Heroku -> EC2)"), ("hop2", "hop 2 (EC2 -> Aurora)")):
        w = measured.windows.get(hop)
        if w is None:
            app, db = DEFAULT_WINDOWS[hop]
            why = "default: no rehearsal of this hop recorded (a guess from the sandbox's pooler switch; rehearse)"
            phase(f"{title}: app unavailable", app, why, "default")
            phase(f"{title}: database unavailable", db, why, "default")
            continue
        delta, why = 0.0, "the steps inside it take as long as measured (O(catalog + a bounded sample))"
        if hop == "hop1" and w.catchup_seconds is not None:
            more = a.archive_latency + SEGMENT / replay
            delta = more
            why = (f"the catch-up ({w.catchup_step}, {w.catchup_seconds:.2g} s measured on a local archive) takes "
                   f"{a.archive_latency:g} s more for S3{a.text('archive_latency')} and {SEGMENT / replay:.2g} s to "
                   f"replay the last segment; the other steps as measured: "
                   + ", ".join(f"{n} {s:.2g} s" for n, s in w.components if n != w.catchup_step))
        elif hop == "hop2":
            why = ("Aurora applies as in the rehearsal (the preflight refuses unless its apply keeps up); steps as "
                   "measured: " + ", ".join(f"{n} {s:.2g} s" for n, s in w.components))
        mode = f" ({w.switch_mode} switch)"
        phase(f"{title}: app unavailable{mode}", None if w.app_seconds is None else w.app_seconds + delta, why,
              w.source, "" if w.app_seconds is None else f"{w.app_seconds:.2f} s")
        phase(f"{title}: database unavailable", None if w.database_seconds is None else w.database_seconds + delta,
              "the fence to the new database taking writes; " + why, w.source,
              "" if w.database_seconds is None else f"{w.database_seconds:.2f} s")
    sources = {p["source"] for p in phases}
    basis = "defaults" if sources <= {"default", "given"} else (
        "measured" if not sources & {"default"} else "partly defaults")
    if small:
        warnings.append(f"measured on too little data to extrapolate from ({', '.join(small)}; under "
                        f"{human_bytes(MIN_SAMPLE_BYTES)} fixed costs dominate): the defaults are used for those; "
                        "rehearse a larger copy (`./dev rehearse --scale 20`, about 300 MB) or on a rehearsal stack")
    if measured.empty:
        warnings.insert(0, "no rehearsal recorded: every figure comes from tern's documented defaults, not a "
                           "measurement; run `./dev rehearse` (or `invoke rehearse --stack <rehearsal stack>`) first")
    return {"size_bytes": size, "size": human_bytes(size), "write_rate": write_rate,
            "wal_bytes_per_second": round(wal_rate, 1), "wal_per_commit_bytes": round(wpc, 1), "basis": basis,
            "assumptions": {"network_bytes_per_second": a.network, "disk_bytes_per_second": a.disk,
                            "backup_age_seconds": a.backup_age, "archive_latency_seconds": a.archive_latency,
                            "cpu_factor": a.cpu_factor, "given": sorted(a.given | set(a.overrides))},
            "phases": phases, "measured_runs": measured.runs, "warnings": warnings,
            "throughputs": {name: {"bytes_per_second": round(t.bytes_per_second, 1), "source": t.source,
                                   "detail": t.detail, "sample_bytes": t.sample_bytes,
                                   "used": (t.sample_bytes or 0) >= MIN_SAMPLE_BYTES and (
                                       {"verify_hop1": "verify", "verify_hop2": "verify"}.get(name, name)
                                       not in a.overrides)}
                            for name, t in measured.throughputs.items()}}


def _measured_text(t: Throughput | None) -> str:
    return "" if t is None else f"{t.detail} = {human_rate(t.bytes_per_second)}"


# -- the flags, as the task and the review read them -----------------------------------------------------------
RATE_FLAGS = {"restore_rate": "restore", "replay_rate": "replay", "sync_rate": "initial_sync",
              "verify_rate": "verify"}


def arguments(size: Any, write_rate: Any, **flags: Any) -> tuple[int, float, Assumptions]:
    """The flags of ``invoke estimate``, checked (ConfigError names the flag)."""
    if size is None:
        raise ConfigError("--size is required (the real database's size, e.g. 1.4TB)")
    if write_rate is None:
        raise ConfigError("--write-rate is required (the real app's commits per second at the migration's hour)")
    n = parse_size("size", size)
    rate = parse_positive("write_rate", write_rate)
    a = Assumptions()
    for key in ("network", "disk"):
        if flags.get(key) is not None:
            setattr(a, key, parse_rate(key, flags[key]))
            a.given.add(key)
    if flags.get("backup_age") is not None:
        a.backup_age = parse_duration("backup_age", flags["backup_age"])
        a.given.add("backup_age")
    if flags.get("archive_latency") is not None:
        a.archive_latency = parse_duration("archive_latency", flags["archive_latency"], plain="s")
        a.given.add("archive_latency")
    if flags.get("cpu_factor") is not None:
        a.cpu_factor = parse_positive("cpu_factor", flags["cpu_factor"])
        a.given.add("cpu_factor")
    if flags.get("wal_per_commit") is not None:
        a.wal_per_commit = float(parse_size("wal_per_commit", flags["wal_per_commit"]))
    for flag, key in RATE_FLAGS.items():
        if flags.get(flag) is not None:
            a.overrides[key] = parse_rate(flag, flags[flag])
    return n, rate, a


def save_arguments(state_root: Path, args: dict[str, Any]) -> None:
    """The last estimate's flags (as given), for the after-action review to show the same estimate."""
    try:
        Path(state_root).mkdir(parents=True, exist_ok=True)
        (Path(state_root) / ESTIMATE_FILE).write_text(json.dumps({k: v for k, v in args.items() if v is not None},
                                                                 sort_keys=True))
    except OSError:
        pass


def saved_arguments(state_root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(state_root) / ESTIMATE_FILE).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def for_review(state_root: Path, until: float | None, stack_dir: Path | None = None) -> dict[str, Any] | None:
    """The last `invoke estimate` again, from what was measured up to ``until`` (a rehearsal's end): the
    review shows it beside that rehearsal's figures. None when no estimate was ever asked for."""
    args = saved_arguments(state_root)
    if not args:
        return None
    try:
        size, rate, a = arguments(**args)
    except (ConfigError, TypeError):
        return None
    result = estimate(size, rate, gather(state_root, stack_dir=stack_dir, until=until), a)
    result["arguments"] = args
    return result
