"""The verification engine against two real clusters: every kind of difference is found, named, and fails."""

from __future__ import annotations

import json
import shutil

import psycopg
import pytest

from runbook.sandbox import Sandbox
from runbook.verify import choose_sample, gate, verify
from runbook.verify.engine import NEWEST_ROWS
from tests.conftest import make_root, run_invoke

pytestmark = pytest.mark.functional

SCRIPT = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE items (id bigint PRIMARY KEY, name text, price numeric(12,2), doc jsonb, big text, blob bytea, m mood);
INSERT INTO items
SELECT g, CASE WHEN g % 10 = 0 THEN NULL ELSE 'item ' || g END, g * 1.25,
       CASE WHEN g = 42 THEN (SELECT jsonb_build_object('deep', jsonb_agg(jsonb_build_object('i', i, 's', md5(i::text))))
                             FROM generate_series(1, 2500) i)
            ELSE jsonb_build_object('g', g) END,
       CASE WHEN g = 7 THEN repeat('abcdefgh', 8192) ELSE 'short' END,
       decode(md5(g::text), 'hex'), (ARRAY['sad','ok','happy']::mood[])[1 + g % 3]
FROM generate_series(1, 24000) g;
CREATE INDEX items_name_idx ON items (name);
CREATE TABLE pairs (a int, b int, v text, PRIMARY KEY (a, b));
INSERT INTO pairs SELECT g / 50, g % 50, 'v' || g FROM generate_series(1, 3000) g;
CREATE TABLE uu (id uuid PRIMARY KEY, v int);
INSERT INTO uu SELECT md5(g::text)::uuid, g FROM generate_series(1, 1000) g;
CREATE TABLE nopk (x int, y text);
INSERT INTO nopk SELECT g, 'y' || g FROM generate_series(1, 500) g;
CREATE TABLE empty_t (id int PRIMARY KEY);
CREATE TABLE events (id int, at date, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO events SELECT g, date '2025-06-01' + (g % 400), 'e' || g FROM generate_series(1, 1000) g;
CREATE TABLE odd (id int PRIMARY KEY, j json, p point);
INSERT INTO odd SELECT g, json_build_object('g', g), point(g, g) FROM generate_series(1, 300) g;
CREATE SEQUENCE free_seq;
SELECT setval('free_seq', 500);
CREATE VIEW v_items AS SELECT id, name FROM items;
CREATE TABLE flags (id int PRIMARY KEY, on_off bool, label text);
INSERT INTO flags SELECT g, g % 2 = 0, 'l' || g FROM generate_series(1, 1500) g;
CREATE TABLE exact (id int PRIMARY KEY, n numeric, i interval, f float8, na numeric[], r numrange);
INSERT INTO exact SELECT g, 1.0, interval '1 day', 0.0, '{1.0}', numrange(1.0, 2.0) FROM generate_series(1, 100) g;
"""


class Pair:
    def __init__(self, root):
        self.sb = Sandbox(root / "sandbox")
        self.sb.up(replicas=2, scale=1, start_app=False)
        self.nodes = {n: self.sb.node(n) for n in ("source", "aurora")}

    def url(self, node: str) -> str:
        pg = self.nodes[node]
        return f"postgresql://postgres@/verifydb?host={pg.socket_dir}&port={pg.port}"

    def reset(self) -> None:
        for pg in self.nodes.values():
            pg.psql("DROP DATABASE IF EXISTS verifydb")
            pg.psql("CREATE DATABASE verifydb")
            pg.psql(SCRIPT, database="verifydb", timeout=120)

    def on_target(self, statement: str) -> None:
        with psycopg.connect(self.url("aurora"), autocommit=True) as conn:
            conn.execute(statement)

    def run(self, **kw):
        kw.setdefault("mode", "full")
        kw.setdefault("chunk_rows", 10000)
        return verify(self.url("source"), self.url("aurora"), **kw)


@pytest.fixture(scope="module")
def pair():
    root = make_root()
    p = Pair(root)
    yield p
    p.sb.down(check_ledger=False)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fresh(pair):
    pair.reset()
    return pair


def rows_of(report, table):
    return next(t for t in report.tables if t.table == table)


def test_identical_is_equal_in_every_mode(fresh):
    for mode in ("schema", "counts", "sample", "full"):
        report = fresh.run(mode=mode)
        assert report.ok, (mode, report.differences())
    full = fresh.run()
    items = rows_of(full, "public.items")
    assert items.chunks >= 3 and items.checked_rows == 24000
    assert rows_of(full, "public.events").checked_rows == 1000   # partitioned, through its root
    assert rows_of(full, "public.empty_t").ok


@pytest.mark.parametrize("statement, table, kind, key, columns", [
    ("DELETE FROM items WHERE id = 12345", "public.items", "missing", {"id": 12345}, []),
    ("INSERT INTO items (id, name) VALUES (999999, 'extra')", "public.items", "extra", {"id": 999999}, []),
    ("UPDATE items SET price = price + 1 WHERE id = 77", "public.items", "changed", {"id": 77}, ["price"]),
    ("UPDATE items SET doc = jsonb_set(doc, '{deep,2400,s}', '\"x\"') WHERE id = 42",
     "public.items", "changed", {"id": 42}, ["doc"]),
    ("UPDATE items SET big = left(big, 32768) WHERE id = 7", "public.items", "changed", {"id": 7}, ["big"]),
    ("UPDATE items SET blob = set_byte(blob, 3, 0) WHERE id = 500", "public.items", "changed", {"id": 500}, ["blob"]),
    ("UPDATE items SET name = NULL WHERE id = 501", "public.items", "changed", {"id": 501}, ["name"]),
    ("DELETE FROM pairs WHERE a = 10 AND b = 3", "public.pairs", "missing", {"a": 10, "b": 3}, []),
    ("UPDATE uu SET v = -1 WHERE id = md5('77')::uuid", "public.uu", "changed", None, ["v"]),
    ("UPDATE events SET v = 'changed' WHERE id = 300", "public.events", "changed", None, ["v"]),
    ("UPDATE odd SET p = point(0, 0) WHERE id = 9", "public.odd", "changed", {"id": 9}, ["p"]),
])
def test_row_differences_are_found_and_named(fresh, statement, table, kind, key, columns):
    fresh.on_target(statement)
    report = fresh.run()
    assert not report.ok
    t = rows_of(report, table)
    assert len(t.rows) == 1, t.lines()
    diff = t.rows[0]
    assert diff.kind == kind
    if key is not None:
        assert diff.key == key
    assert diff.columns == columns
    # every other table is still equal: the difference is localized
    assert all(o.ok for o in report.tables if o.table != table), [o.lines() for o in report.tables if not o.ok]


def test_no_primary_key_change_is_found_but_not_localizable(fresh):
    fresh.on_target("UPDATE nopk SET y = 'zz' WHERE x = 3")
    report = fresh.run()
    t = rows_of(report, "public.nopk")
    assert not report.ok and not t.ok and "no primary key" in t.problems[0]


def test_sequence_behind(fresh):
    fresh.on_target("SELECT setval('free_seq', 10)")
    report = fresh.run(mode="counts")
    assert not report.ok
    assert any("free_seq is behind: source 500, target 10" in s for s in report.sequences)


def test_schema_differences(fresh):
    fresh.on_target("DROP INDEX items_name_idx")
    fresh.on_target("ALTER TABLE pairs ALTER v TYPE varchar(50)")
    report = fresh.run(mode="schema")
    assert not report.ok
    assert "index public.items_name_idx is missing on the target" in report.schema
    assert any(s.startswith("column public.pairs.v differs") and "character varying(50)" in s for s in report.schema)


def test_table_missing_on_target(fresh):
    fresh.on_target("DROP TABLE uu")
    report = fresh.run()
    assert not report.ok
    assert rows_of(report, "public.uu").error == "table is missing on the target"
    assert "table public.uu is missing on the target" in report.schema


def test_many_differences_in_one_chunk_are_bisected(fresh):
    fresh.on_target("DELETE FROM items WHERE id BETWEEN 3000 AND 3009")
    fresh.on_target("UPDATE items SET m = 'happy' WHERE id = 15000 AND m <> 'happy'")
    report = fresh.run(jobs=3)
    t = rows_of(report, "public.items")
    missing = sorted(r.key["id"] for r in t.rows if r.kind == "missing")
    assert missing == list(range(3000, 3010))
    assert t.differing_chunks == 2


def test_cli_exit_status(fresh):
    same = run_invoke("verify", "--source", fresh.url("source"), "--target", fresh.url("aurora"), "--json",
                      sandbox_dir=fresh.sb.root)
    assert same.returncode == 0, same.stderr[-2000:]
    assert json.loads(same.stdout)["ok"] is True
    fresh.on_target("UPDATE pairs SET v = 'x' WHERE a = 1 AND b = 1")
    diff = run_invoke("verify", "--source", fresh.url("source"), "--target", fresh.url("aurora"),
                      "--tables", "pairs", sandbox_dir=fresh.sb.root)
    assert diff.returncode == 1
    assert "row (a=1, b=1) differs in v" in diff.stdout
    bad = run_invoke("verify", "--source", "source", "--target", "nowhere", sandbox_dir=fresh.sb.root)
    assert bad.returncode == 2 and "unknown node 'nowhere'" in bad.stderr
    bad = run_invoke("verify", "--source", "source", "--target", "aurora", "--mode", "quick",
                     sandbox_dir=fresh.sb.root)
    assert bad.returncode == 2 and "unknown mode 'quick'" in bad.stderr


def test_many_scans_and_hash_buckets_still_localize(fresh):
    """Small chunks: items spans two scans (over 40 chunks each); uu (uuid keys) uses key-hash buckets."""
    fresh.on_target("DELETE FROM items WHERE id IN (5, 23990)")
    fresh.on_target("INSERT INTO items (id, name) VALUES (-7, 'below the source range')")
    fresh.on_target("UPDATE uu SET v = v + 1 WHERE id IN (md5('3')::uuid, md5('999')::uuid)")
    fresh.on_target("INSERT INTO uu VALUES ('00000000-0000-0000-0000-000000000001', 1)")
    report = fresh.run(chunk_rows=100, jobs=3)
    items = rows_of(report, "public.items")
    assert items.chunks > 40
    assert sorted((r.kind, r.key["id"]) for r in items.rows) == [("extra", -7), ("missing", 5), ("missing", 23990)]
    uu = rows_of(report, "public.uu")
    assert uu.chunks == 10
    kinds = sorted(r.kind for r in uu.rows)
    assert kinds == ["changed", "changed", "extra"]
    assert all(r.columns == ["v"] for r in uu.rows if r.kind == "changed")
    assert items.source_rows == 24000 and items.target_rows == 23999


def _same_chunk_and_sub_bucket(pair, n: int = 2) -> list[int]:
    """Ids of ``items`` in one chunk (chunk_rows 10000: ids 1..8000) and in one sub-bucket."""
    with psycopg.connect(pair.url("source")) as conn:
        rows = conn.execute("SELECT id, (hash_record_extended(ROW(id), 1) & 9223372036854775807) % 4 "
                            "FROM items WHERE id BETWEEN 101 AND 8000 AND id % 10 <> 0 ORDER BY id").fetchall()
    first = rows[0][1]
    return [i for i, b in rows if b == first][:n]


def test_differences_that_cancel_in_a_linear_sum_are_found(fresh):
    """A value moved between two rows, and two opposite flips, in one chunk and in one sub-bucket:
    a sum of linear record hashes cancels (it reported EQUAL); the rows must be named."""
    a, b = _same_chunk_and_sub_bucket(fresh)
    # swap two names (one chunk of ~8,000 rows split into 4 sub-buckets: both rows in the same one)
    fresh.on_target(f"UPDATE items SET name = CASE id WHEN {a} THEN 'item {b}' ELSE 'item {a}' END "
                    f"WHERE id IN ({a}, {b})")
    # move a value from a row to a row that had NULL there
    fresh.on_target("UPDATE items SET name = NULL WHERE id = 201; UPDATE items SET name = 'item 201' WHERE id = 200")
    # two opposite boolean flips in a table of one chunk and one sub-bucket
    fresh.on_target("UPDATE flags SET on_off = NOT on_off WHERE id IN (7, 8)")
    report = fresh.run(chunk_rows=10000)
    assert not report.ok
    items = rows_of(report, "public.items")
    assert sorted((r.kind, r.key["id"], tuple(r.columns)) for r in items.rows) == sorted(
        [("changed", a, ("name",)), ("changed", b, ("name",)), ("changed", 200, ("name",)),
         ("changed", 201, ("name",))])
    flags = rows_of(report, "public.flags")
    assert sorted((r.key["id"], tuple(r.columns)) for r in flags.rows) == [(7, ("on_off",)), (8, ("on_off",))]


def test_no_primary_key_swap_is_found(fresh):
    fresh.on_target("UPDATE nopk SET y = CASE x WHEN 3 THEN 'y4' ELSE 'y3' END WHERE x IN (3, 4)")
    report = fresh.run()
    assert not rows_of(report, "public.nopk").ok


@pytest.mark.parametrize("statement, column", [
    ("UPDATE exact SET n = 1.00 WHERE id = 5", "n"),
    ("UPDATE exact SET i = interval '24 hours' WHERE id = 6", "i"),
    ("UPDATE exact SET f = '-0'::float8 WHERE id = 7", "f"),
    ("UPDATE exact SET na = '{1.00}' WHERE id = 8", "na"),
    ("UPDATE exact SET r = numrange(1.00, 2.0) WHERE id = 9", "r"),
])
def test_equal_but_not_identical_values_differ(fresh, statement, column):
    """Values that compare (and hash) equal but are not the same value after a logical copy."""
    fresh.on_target(statement)
    for mode in ("full", "sample"):
        report = fresh.run(mode=mode, sample_percent=100)
        exact = rows_of(report, "public.exact")
        assert [(r.kind, r.columns) for r in exact.rows] == [("changed", [column])], (mode, exact.lines())


@pytest.mark.parametrize("setup, statement, expected", [
    (None, "ALTER TABLE flags ALTER label SET DEFAULT 'x'", "column public.flags.label differs"),
    ("ALTER TABLE exact ALTER id ADD GENERATED BY DEFAULT AS IDENTITY", None, "column public.exact.id differs"),
    ("CREATE SEQUENCE flags_seq; ALTER TABLE flags ALTER id SET DEFAULT nextval('flags_seq')",
     "ALTER TABLE flags ALTER id DROP DEFAULT", "column public.flags.id differs"),
    (None, 'ALTER TABLE flags ALTER label TYPE text COLLATE "POSIX"', "column public.flags.label differs"),
    ("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$; "
     "CREATE TRIGGER flags_touch BEFORE UPDATE ON flags FOR EACH ROW EXECUTE FUNCTION touch()",
     "DROP TRIGGER flags_touch ON flags", "trigger public.flags.flags_touch is missing on the target"),
    ("CREATE FUNCTION answer() RETURNS int LANGUAGE sql AS 'SELECT 42'",
     "CREATE OR REPLACE FUNCTION answer() RETURNS int LANGUAGE sql AS 'SELECT 41'", "function public.answer() differs"),
    ("ALTER TABLE flags ENABLE ROW LEVEL SECURITY; CREATE POLICY mine ON flags USING (on_off)",
     "DROP POLICY mine ON flags", "policy public.flags.mine is missing on the target"),
    (None, "ALTER TABLE flags ENABLE ROW LEVEL SECURITY", "table public.flags differs"),
    ("CREATE ROLE tern_reader_test", "GRANT SELECT ON flags TO tern_reader_test",
     "grant table public.flags exists only on the target"),
    (None, "GRANT INSERT ON items TO PUBLIC", "grant table public.items exists only on the target"),
])
def test_schema_covers_defaults_collations_triggers_functions_policies_grants(fresh, setup, statement, expected):
    if setup:
        for node in ("source", "aurora"):
            with psycopg.connect(fresh.url(node), autocommit=True) as conn:
                if "CREATE ROLE" in setup:
                    conn.execute("DROP ROLE IF EXISTS tern_reader_test")
                conn.execute(setup)
    if statement is None:   # the setup differs: undo it on the target
        fresh.on_target("ALTER TABLE exact ALTER id DROP IDENTITY")
    else:
        fresh.on_target(statement)
    try:
        report = fresh.run(mode="schema")
        assert not report.ok
        assert any(line.startswith(expected) for line in report.schema), report.schema
    finally:
        if setup and "CREATE ROLE" in setup:
            for node in ("source", "aurora"):
                with psycopg.connect(fresh.url(node), autocommit=True) as conn:
                    conn.execute("DROP OWNED BY tern_reader_test")   # its grants
                    conn.execute("DROP ROLE tern_reader_test")


def test_sample_reaches_the_end_of_a_large_table(fresh):
    """5 % of 500,000 rows is more than the 20,000-row bound: the sample must still be spread
    over the whole table (it took the first 400,000 rows only, and missed changes at the end)."""
    for node in ("source", "aurora"):
        with psycopg.connect(fresh.url(node), autocommit=True) as conn:
            conn.execute("CREATE TABLE big (id int PRIMARY KEY, v int)")
            conn.execute("INSERT INTO big SELECT g, g FROM generate_series(1, 500000) g")
            conn.execute("VACUUM ANALYZE big")
    fresh.on_target("UPDATE big SET v = -v WHERE id > 440000")
    report = fresh.run(mode="sample", tables=["big"], sample_percent=5)
    big = rows_of(report, "public.big")
    assert not report.ok
    assert 15000 <= big.checked_rows <= 20000 + NEWEST_ROWS    # and the rows with the highest keys
    assert big.rows and all(r.kind == "changed" and r.key["id"] > 440000 for r in big.rows)
    # bounded in rows and in time: a tiny bound is honoured, and a statement over its time fails loudly
    small = fresh.run(mode="sample", tables=["big"], sample_percent=50, sample_rows=300)
    assert 300 <= rows_of(small, "public.big").checked_rows <= 300 + NEWEST_ROWS
    slow = fresh.run(mode="sample", tables=["big"], sample_percent=100, sample_timeout=0.001, counts=False)
    assert not slow.ok and "statement timeout" in (rows_of(slow, "public.big").error or "")


def test_a_sample_chosen_before_the_window_still_finds_every_kind_of_change(fresh):
    """The gate's sample is chosen and read before the window (so the window reads memory); the
    rows are compared inside it, after whatever changed in between: a planned row changed, a planned
    row deleted on one side only, and the newest rows (not in the plan) missing on the target."""
    plan = choose_sample(fresh.url("source"), fresh.url("aurora"), sample_percent=5, sample_rows=200,
                         sample_timeout=30)
    keys = plan.keys["public.items"]
    assert 50 <= len(keys) <= 200 and "public.nopk" not in plan.keys and plan.rows >= len(keys)
    changed, gone = keys[0][0], keys[1][0]
    fresh.on_target(f"UPDATE items SET price = price + 1 WHERE id = {changed}")
    with psycopg.connect(fresh.url("source"), autocommit=True) as conn:
        conn.execute(f"DELETE FROM items WHERE id = {gone}")                    # deleted on the source only
        conn.execute("INSERT INTO items (id, name) SELECT g, 'late ' || g FROM generate_series(900001, 900003) g")
    report = gate(fresh.url("source"), fresh.url("aurora"), sample_percent=5, sample_rows=200, sample_timeout=30,
                  sample_plan=plan)
    found = {(r.kind, r.key["id"]) for r in rows_of(report, "public.items").rows}
    assert ("changed", changed) in found and ("extra", gone) in found
    assert {("missing", k) for k in (900001, 900002, 900003)} <= found
    assert not report.ok
    fresh.reset()
    assert gate(fresh.url("source"), fresh.url("aurora"), sample_percent=5, sample_rows=200, sample_timeout=30,
                sample_plan=choose_sample(fresh.url("source"), fresh.url("aurora"), sample_percent=5,
                                          sample_rows=200, sample_timeout=30)).ok


SECRET = 'Pw"with\\quote and:at@'


def _tcp_url(pair, node: str, password: str | None = None) -> str:
    from urllib.parse import quote

    auth = "verifier" + (":" + quote(password, safe="") if password else "")
    return f"postgresql://{auth}@127.0.0.1:{pair.nodes[node].port}/verifydb"


def test_cli_with_two_urls_needs_no_sandbox_and_never_prints_the_password(fresh, tmp_path, monkeypatch):
    for node in ("source", "aurora"):
        with psycopg.connect(fresh.url(node), autocommit=True) as conn:
            conn.execute("DROP ROLE IF EXISTS verifier")
            conn.execute(psycopg.sql.SQL("CREATE ROLE verifier LOGIN SUPERUSER PASSWORD {}").format(
                psycopg.sql.Literal(SECRET)))
    nowhere = tmp_path / "no-sandbox"     # no sandbox and no stack: the URLs are enough
    try:
        def run(*args, **env):
            for k, v in env.items():
                monkeypatch.setenv(k, v)
            res = run_invoke("verify", *args, sandbox_dir=nowhere, state_dir=tmp_path / "state")
            for k in env:
                monkeypatch.delenv(k)
            for stream in (res.stdout, res.stderr):
                assert SECRET not in stream and "Pw%22with" not in stream and "quote and" not in stream, stream
                assert "Traceback" not in stream
            return res

        ok = run("--source", _tcp_url(fresh, "source", SECRET), "--target", _tcp_url(fresh, "aurora", SECRET),
                 "--tables", "pairs,flags")
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "EQUAL" in ok.stdout
        # the password from PGPASSWORD, and from a credential reference
        ok = run("--source", _tcp_url(fresh, "source"), "--target", _tcp_url(fresh, "aurora"), "--mode", "counts",
                 PGPASSWORD=SECRET)
        assert ok.returncode == 0, ok.stderr[-2000:]
        ok = run("--source", _tcp_url(fresh, "source"), "--target", _tcp_url(fresh, "aurora"), "--mode", "schema",
                 "--source-password", "env:VERIFY_PW", "--target-password", "env:VERIFY_PW", VERIFY_PW=SECRET)
        assert ok.returncode == 0, ok.stderr[-2000:]
        # a plaintext value where a reference belongs is refused without being echoed
        bad = run("--source", _tcp_url(fresh, "source"), "--target", _tcp_url(fresh, "aurora"),
                  "--source-password", SECRET)
        assert bad.returncode == 2 and "credential reference" in bad.stderr
        # a difference: exit 1, named, and the URLs in the output are masked
        fresh.on_target("UPDATE pairs SET v = 'x' WHERE a = 1 AND b = 1")
        diff = run("--source", _tcp_url(fresh, "source", SECRET), "--target", _tcp_url(fresh, "aurora", SECRET),
                   "--tables", "pairs")
        assert diff.returncode == 1
        assert "row (a=1, b=1) differs in v" in diff.stdout and "verifier:***@" in diff.stderr + diff.stdout
        # bad input: exit 2, one line, no traceback
        src, dst = _tcp_url(fresh, "source", SECRET), _tcp_url(fresh, "aurora", SECRET)
        for args, words in ((("--jobs", "abc"), "--jobs"), (("--sample-pct", "abc"), "--sample-pct"),
                            (("--chunk-rows", "0"), "--chunk-rows"), (("--jobs", "0"), "--jobs"),
                            (("--sample-pct", "0"), "--sample-pct"), (("--mode", "quick"), "mode")):
            res = run("--source", src, "--target", dst, *args)
            assert res.returncode == 2, (args, res.stderr)
            assert words in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        res = run("--source", src.replace(str(fresh.nodes["source"].port), "99999"), "--target", dst)
        assert res.returncode == 2 and "bad port" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    finally:
        for node in ("source", "aurora"):
            with psycopg.connect(fresh.url(node), autocommit=True) as conn:
                conn.execute("DROP ROLE IF EXISTS verifier")
