"""Schema comparison: every object that matters, described from the catalogs, compared by name.

Each object becomes ``kind name -> description``; a difference is one line naming it.
"""

from __future__ import annotations

import psycopg

# 'tern': tern's own objects (hop 2's sentinel table and DDL guard), never the app's data
USER_SCHEMAS = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'tern') AND n.nspname NOT LIKE 'pg_toast%%' " \
               "AND n.nspname NOT LIKE 'pg_temp%%'"

QUERIES = {
    "database": """
        SELECT 'current database', 'encoding ' || pg_encoding_to_char(encoding) || ', collate ' || datcollate
               || ', ctype ' || datctype || ', provider ' || datlocprovider::text
        FROM pg_database WHERE datname = current_database()""",
    "table": f"""
        SELECT n.nspname || '.' || c.relname,
               c.relkind::text || CASE c.relpersistence WHEN 'u' THEN ' unlogged' ELSE '' END
               || CASE WHEN c.relrowsecurity THEN ' row security' ELSE '' END
               || CASE WHEN c.relforcerowsecurity THEN ' forced' ELSE '' END
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS}""",
    "column": f"""
        SELECT n.nspname || '.' || c.relname || '.' || a.attname,
               format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
               || CASE WHEN a.attidentity <> '' THEN ' identity' ELSE '' END
               || CASE WHEN a.attgenerated <> '' THEN ' generated' ELSE '' END
               || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
               || CASE WHEN a.attcollation <> 0 AND a.attcollation <> ty.typcollation
                       THEN ' collate ' || quote_ident(cn.nspname) || '.' || quote_ident(co.collname) ELSE '' END
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN pg_type ty ON ty.oid = a.atttypid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        LEFT JOIN pg_collation co ON co.oid = a.attcollation
        LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0 AND NOT a.attisdropped AND {USER_SCHEMAS}""",
    "collation": f"""
        SELECT n.nspname || '.' || co.collname,
               'provider ' || co.collprovider::text || ', collate ' || coalesce(co.collcollate, '')
               || ', ctype ' || coalesce(co.collctype, '') || ', locale ' || coalesce(co.colliculocale, '')
               || CASE WHEN co.collisdeterministic THEN '' ELSE ', nondeterministic' END
        FROM pg_collation co JOIN pg_namespace n ON n.oid = co.collnamespace
        WHERE {USER_SCHEMAS}""",
    "trigger": f"""
        SELECT n.nspname || '.' || c.relname || '.' || tg.tgname,
               pg_get_triggerdef(tg.oid) || CASE tg.tgenabled WHEN 'D' THEN ' (disabled)' WHEN 'R' THEN ' (replica)'
                                                               WHEN 'A' THEN ' (always)' ELSE '' END
        FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE NOT tg.tgisinternal AND NOT c.relispartition AND {USER_SCHEMAS}""",
    "function": f"""
        SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
               p.prokind::text || ' returns ' || coalesce(pg_get_function_result(p.oid), '') || ' language '
               || l.lanname || ' ' || p.provolatile::text || CASE WHEN p.prosecdef THEN ' security definer' ELSE '' END
               || coalesce(' set ' || array_to_string(p.proconfig, ','), '') || ' body md5 ' || md5(coalesce(p.prosrc, ''))
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
        WHERE {USER_SCHEMAS}
          AND NOT EXISTS (SELECT 1 FROM pg_depend dep WHERE dep.classid = 'pg_proc'::regclass
                          AND dep.objid = p.oid AND dep.deptype = 'e')""",
    "policy": """
        SELECT schemaname || '.' || tablename || '.' || policyname,
               permissive || ' for ' || cmd || ' to ' || array_to_string(roles, ',')
               || coalesce(' using (' || qual || ')', '') || coalesce(' with check (' || with_check || ')', '')
        FROM pg_policies""",
    "grant": f"""
        SELECT kind || ' ' || name, string_agg(grantee || ':' || privs, '; ' ORDER BY grantee)
        FROM (SELECT kind, name, g.who AS grantee, string_agg(privilege_type || CASE WHEN is_grantable THEN '*' ELSE '' END,
                                                     ',' ORDER BY privilege_type) AS privs
              FROM (SELECT CASE c.relkind WHEN 'S' THEN 'sequence' WHEN 'v' THEN 'view' WHEN 'm' THEN 'view'
                                          ELSE 'table' END AS kind,
                           n.nspname || '.' || c.relname AS name, x.*
                    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    CROSS JOIN LATERAL aclexplode(c.relacl) x
                    WHERE c.relkind IN ('r', 'p', 'S', 'v', 'm') AND c.relacl IS NOT NULL AND NOT c.relispartition
                      AND {USER_SCHEMAS}
                    UNION ALL
                    SELECT 'schema', n.nspname, x.* FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) x
                    WHERE n.nspacl IS NOT NULL AND {USER_SCHEMAS}
                    UNION ALL
                    SELECT 'function', n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid)
                           || ')', x.*
                    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                    CROSS JOIN LATERAL aclexplode(p.proacl) x
                    WHERE p.proacl IS NOT NULL AND {USER_SCHEMAS}) e
              CROSS JOIN LATERAL (SELECT CASE WHEN e.grantee = 0 THEN 'PUBLIC'
                                              ELSE pg_get_userbyid(e.grantee)::text END AS who) g
              WHERE e.grantee <> e.grantor OR e.grantee = 0
              GROUP BY kind, name, g.who) per_grantee
        GROUP BY kind, name""",
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
        if kind in ("column", "constraint", "trigger", "policy"):
            return name.rsplit(".", 1)[0] in tables
        if kind == "grant":
            return name.split(" ", 1)[1] in tables
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
