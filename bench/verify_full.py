"""Benchmark: tern's full verification against reladiff on the same tables, same run.

Two sandbox clusters (the "source" and the "Aurora" stand-in) hold the inventory data at
``--scale`` (52: about 2 million rows); a handful of differences are injected on the
target. tern's ``verify --mode full`` and ``reladiff`` (hashdiff, per table) run on the
same tables; the script prints both times, their ratio, whether each found exactly the
injected rows, and tern's per-backend hashing throughput as a fraction of count(*).

    .venv/bin/pip install 'reladiff[postgresql]'   # bench-only dependency
    .venv/bin/python bench/verify_full.py [--scale 52] [--jobs 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg  # noqa: E402

from runbook.sandbox import Sandbox  # noqa: E402
from runbook.verify import verify  # noqa: E402

# table -> key columns (reladiff needs them); the same tables for both tools
TABLES = {"products": ["id"], "stock_levels": ["warehouse_id", "product_id"], "orders": ["id"],
          "order_lines": ["id"], "stock_movements": ["id"]}

INJECT = [
    ("DELETE FROM order_lines WHERE id = 123457", ("order_lines", (123457,))),
    ("DELETE FROM stock_movements WHERE id = 400001", ("stock_movements", (400001,))),
    ("UPDATE orders SET status = 'lost' WHERE id = 77777", ("orders", (77777,))),
    ("UPDATE stock_levels SET quantity = quantity + 1 WHERE warehouse_id = 3 AND product_id = 4242",
     ("stock_levels", (3, 4242))),
    ("UPDATE products SET name = name || '!' WHERE id = 31337", ("products", (31337,))),
    ("INSERT INTO order_lines (order_id, product_id, quantity, unit_price_cents) OVERRIDING SYSTEM VALUE "
     "SELECT 1, 1, 1, 1", None),   # extra row; its id is read back below
]


def url(pg, db="app") -> str:
    return f"postgresql://postgres@/{db}?host={pg.socket_dir}&port={pg.port}"


def reladiff_url(pg, db="app") -> str:
    return f"postgresql://postgres@localhost:{pg.port}/{db}"


def _reladiff_key(line: str, nkeys: int) -> tuple | None:
    """The key of one reladiff --json line: ["-"|"+", ["key", ..., columns...]]. Values holding
    newlines break a line in two; only the line that starts the record carries the key."""
    import re

    if not re.match(r'^\["[-+]", \[', line):
        return None
    rest = line[line.index("[", 1) + 1:]
    values = re.findall(r'"((?:[^"\\]|\\.)*)"|(null|-?[0-9.]+)', rest)
    return tuple(a or b for a, b in values[:nkeys])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=int, default=52)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=None, help="tern's chunk size (default: its own)")
    a = p.parse_args()
    reladiff = Path(sys.executable).with_name("reladiff")
    if not reladiff.exists():
        print("reladiff is not installed: .venv/bin/pip install 'reladiff[postgresql]'", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="tern-bench-verify-", dir="/tmp"))
    root.chmod(0o755)
    sb = Sandbox(root / "sandbox")
    try:
        t = time.monotonic()
        sb.up(replicas=2, scale=a.scale, start_app=False)
        src, dst = sb.node("source"), sb.node("aurora")
        # reladiff connects over TCP: let the benchmark's superuser in on loopback (sandbox only)
        for pg in (src, dst):
            pg.host.run(["sh", "-c", 'sed -i "1i host all postgres 127.0.0.1/32 trust" "$1/pg_hba.conf"', "sh",
                         pg.data_dir], timeout=10)
            pg.psql("SELECT pg_reload_conf()")
        dump = (f"{src.bin_dir}/pg_dump -h {src.socket_dir} -p {src.port} -U postgres --no-owner --no-privileges app"
                f" | {dst.bin_dir}/psql -q -X -h {dst.socket_dir} -p {dst.port} -U postgres -d app -v ON_ERROR_STOP=1")
        src.host.run(["sh", "-c", dump], timeout=3600)
        dst.psql("VACUUM ANALYZE", database="app", timeout=3600)
        src.psql("VACUUM ANALYZE", database="app", timeout=3600)
        with psycopg.connect(url(src), autocommit=True) as conn:
            rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)
        print(f"setup: {rows:,} rows in {len(TABLES)} tables, copied to the second cluster "
              f"({time.monotonic() - t:.0f} s)")
        expected = set()
        with psycopg.connect(url(dst), autocommit=True) as conn:
            for statement, key in INJECT:
                conn.execute(statement)
                if key:
                    expected.add((key[0], tuple(str(k) for k in key[1])))
            extra = conn.execute("SELECT max(id) FROM order_lines").fetchone()[0]
            expected.add(("order_lines", (str(extra),)))
        print(f"injected {len(expected)} differences")

        # warm both clusters' caches (heap and TOAST) the same way for both tools
        for pg in (src, dst):
            with psycopg.connect(url(pg), autocommit=True) as conn:
                for t in TABLES:
                    conn.execute(f"SELECT count(*), sum(length(t::text)) FROM {t} t").fetchone()

        t0 = time.monotonic()
        extra = {"chunk_rows": a.chunk_rows} if a.chunk_rows else {}
        report = verify(url(src), url(dst), mode="full", tables=list(TABLES), jobs=a.jobs, **extra)
        tern_s = time.monotonic() - t0
        tern_found = set()
        for tr in report.tables:
            for r in tr.rows:
                tern_found.add((tr.table.split(".")[1], tuple(str(v) for v in r.key.values())))
        print(f"tern verify --mode full --jobs {a.jobs}: {tern_s:.2f} s, {len(tern_found)} rows found, "
              f"exact: {tern_found == expected}, exit {'0' if report.ok else 'non-zero'}")

        t0 = time.monotonic()
        rd_found = set()
        for table, keys in TABLES.items():
            argv = [str(reladiff), reladiff_url(src), table, reladiff_url(dst), table, "-c", "%", "--json"]
            for k in keys:
                argv += ["-k", k]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                print(f"reladiff failed on {table}: {proc.stderr.strip()[-400:]}")
                continue
            for line in proc.stdout.splitlines():
                key = _reladiff_key(line, len(keys))
                if key is not None:
                    rd_found.add((table, key))
        rd_cli_s = time.monotonic() - t0
        print(f"reladiff CLI (hashdiff, one command per table): {rd_cli_s:.2f} s, {len(rd_found)} rows found, "
              f"exact: {rd_found == expected}")

        # the same through reladiff's Python API, in this process (no interpreter start-up per table)
        import reladiff

        with psycopg.connect(url(src), autocommit=True) as conn:
            columns = {t: [r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
                (t,)).fetchall()] for t in TABLES}
        t0 = time.monotonic()
        api_found = set()
        for table, keys in TABLES.items():
            extra_cols = tuple(c for c in columns[table] if c not in keys)
            a_t = reladiff.connect_to_table(reladiff_url(src), table, tuple(keys))
            b_t = reladiff.connect_to_table(reladiff_url(dst), table, tuple(keys))
            for sign, row in reladiff.diff_tables(a_t, b_t, extra_columns=extra_cols):
                api_found.add((table, tuple(str(v) for v in row[:len(keys)])))
        rd_api_s = time.monotonic() - t0
        print(f"reladiff Python API (hashdiff, in-process): {rd_api_s:.2f} s, {len(api_found)} rows found, "
              f"exact: {api_found == expected}")
        best = min(rd_cli_s, rd_api_s)
        print(f"ratio: tern is {rd_cli_s / tern_s:.1f}x faster than the reladiff CLI and {rd_api_s / tern_s:.1f}x "
              f"faster than its in-process API (goal >= 5x; strictest: {best / tern_s:.1f}x)")

        # per-backend hashing throughput against count(*) on the largest table
        from runbook.verify.engine import _tables

        with psycopg.connect(url(src), autocommit=True) as conn:
            tern_hash = _tables(conn)["public.order_lines"].hash_expr   # the expression tern really uses
            timings = {}
            for name, q in (("count", "SELECT count(*) FROM order_lines"),
                            ("hash", f"SELECT count(*), sum({tern_hash}) FROM order_lines t")):
                best = None
                for _ in range(3):
                    t0 = time.monotonic()
                    conn.execute("SET max_parallel_workers_per_gather = 0")
                    conn.execute(q).fetchone()
                    dt = time.monotonic() - t0
                    best = dt if best is None else min(best, dt)
                timings[name] = best
            n = conn.execute("SELECT count(*) FROM order_lines").fetchone()[0]
        print(f"one backend on order_lines ({n:,} rows), tern's {tern_hash}:")
        print(f"  count(*) {timings['count']:.3f} s, "
              f"hash {timings['hash']:.3f} s -> hashing at {100 * timings['count'] / timings['hash']:.0f} % "
              f"of count(*) throughput (goal >= 15 %)")
        return 0 if tern_found == expected else 1
    finally:
        sb.down(check_ledger=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
