"""Schema comparison: every object that matters, described from the catalogs, compared by name.

Each object becomes ``kind name -> description``; a difference is one line naming it.
"""

from __future__ import annotations

import psycopg

USER_SCHEMAS = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%' " \
               "AND n.nspname NOT LIKE 'pg_temp%%'"

QUERIES = {
    "table": f"""
        SELECT n.nspname || '.' || c.relname, c.relkind::text
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS}""",
    "column": f"""
        SELECT n.nspname || '.' || c.relname || '.' || a.attname,
               format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
               || CASE WHEN a.attidentity <> '' THEN ' identity' ELSE '' END
               || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0 AND NOT a.attisdropped AND {USER_SCHEMAS}""",
    "index": f"""
        SELECT n.nspname || '.' || ic.relname, regexp_replace(pg_get_indexdef(i.indexrelid), ' ON ONLY ', ' ON ')
        FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_namespace n ON n.oid = ic.relnamespace
        JOIN pg_class tc ON tc.oid = i.indrelid
        WHERE NOT tc.relispartition AND {USER_SCHEMAS}""",
    "constraint": f"""
        SELECT n.nspname || '.' || c.relname || '.' || co.conname, pg_get_constraintdef(co.oid)
        FROM pg_constraint co JOIN pg_class c ON c.oid = co.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT c.relispartition AND {USER_SCHEMAS}""",
    "sequence": f"""
        SELECT n.nspname || '.' || c.relname,
               format_type(s.seqtypid, NULL) || ' increment ' || s.seqincrement || ' min ' || s.seqmin
               || ' max ' || s.seqmax || CASE WHEN s.seqcycle THEN ' cycle' ELSE '' END
        FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE {USER_SCHEMAS}""",
    "type": f"""
        SELECT n.nspname || '.' || t.typname,
               CASE t.typtype
                 WHEN 'e' THEN 'enum (' || (SELECT string_agg(quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                                           FROM pg_enum e WHERE e.enumtypid = t.oid) || ')'
                 WHEN 'd' THEN 'domain over ' || format_type(t.typbasetype, t.typtypmod)
                 WHEN 'c' THEN 'composite (' || (SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', '
                                                ORDER BY a.attnum) FROM pg_attribute a
                                                WHERE a.attrelid = t.typrelid AND a.attnum > 0) || ')'
                 ELSE t.typtype::text END
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE (t.typtype IN ('e', 'd') OR (t.typtype = 'c' AND (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c'))
          AND {USER_SCHEMAS}""",
    "extension": "SELECT extname, extversion FROM pg_extension WHERE extname <> 'plpgsql'",
    "view": f"""
        SELECT n.nspname || '.' || c.relname, c.relkind::text || ': ' || pg_get_viewdef(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('v', 'm') AND {USER_SCHEMAS}""",
}

# differences that do not threaten the data: an extension's minor version
LENIENT = {"extension"}


def describe(conn: psycopg.Connection) -> dict[str, dict[str, str]]:
    return {kind: {row[0]: row[1] for row in conn.execute(q).fetchall()} for kind, q in QUERIES.items()}


def compare(source: dict[str, dict[str, str]], target: dict[str, dict[str, str]],
            tables: set[str] | None = None) -> list[str]:
    """One line per difference; ``tables`` limits table-bound objects to those tables."""
    lines: list[str] = []

    def wanted(kind: str, name: str, defn: str) -> bool:
        if tables is None:
            return True
        if kind in ("table", "sequence", "view"):
            return name in tables
        if kind in ("column", "constraint"):
            return name.rsplit(".", 1)[0] in tables
        if kind == "index":
            return any(f" ON {t} " in defn or f" ON {t.split('.', 1)[1]} " in defn for t in tables)
        return False

    for kind in QUERIES:
        s, t = source.get(kind, {}), target.get(kind, {})
        for name in sorted(set(s) | set(t)):
            if not wanted(kind, name, s.get(name) or t.get(name) or ""):
                continue
            if name not in t:
                lines.append(f"{kind} {name} is missing on the target")
            elif name not in s:
                lines.append(f"{kind} {name} exists only on the target")
            elif s[name] != t[name] and kind not in LENIENT:
                lines.append(f"{kind} {name} differs: source {s[name]!r}, target {t[name]!r}")
    return lines
