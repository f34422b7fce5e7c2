"""How a row becomes one 64-bit number that two clusters agree on only if the rows are identical.

Two rules, each learnt from a way a checksum was fooled:

* **Exact, not equal.** A type's hash follows its equality, and several equalities are looser
  than identity: ``numeric`` ``1.0 = 1.00``, ``interval '1 day' = '24 hours'``,
  ``float8 -0.0 = 0.0``, ``citext 'A' = 'a'``, strings under a non-deterministic collation.
  A logical copy (hop 2) can turn one into the other, so such columns are hashed by their
  text output (with the session's output settings pinned, see ``SESSION_OPTIONS``). Enum,
  ``reg*`` and composite values hash by OID, which differs between clusters: text as well.
  Types without a hash function (``json``, ``point``) also hash their text.
* **Non-linear per row.** ``hash_record_extended`` combines the column hashes linearly
  (``h = 31 * h + column_hash``), so in a *sum* over rows differences spread over two rows
  cancel: a value moved from one row to another, two opposite boolean flips. Each row's
  record hash is therefore passed through a second, full 64-bit hash (of its decimal text:
  injective, and ``hashtextextended`` mixes every bit) before it is summed. A cancellation
  then needs a 64-bit coincidence.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

# pg_catalog types whose equality is looser than identity: hashed by their text output
LOOSE_EQUALITY = {"numeric", "float4", "float8", "interval"}
# text output depends only on these session settings: pinned on every verification session
SESSION_SETTINGS = {"jit": "off", "work_mem": "64MB", "extra_float_digits": "1", "IntervalStyle": "postgres",
                    "DateStyle": "ISO,YMD", "TimeZone": "UTC", "bytea_output": "hex"}
SESSION_OPTIONS = " ".join(f"-c {k}={v}" for k, v in SESSION_SETTINGS.items())

TYPES_SQL = """
SELECT t.oid, t.typname, n.nspname, t.typtype, t.typcategory, t.typbasetype, t.typelem,
       coalesce(r.rngsubtype, mr.rngsubtype, 0),
       EXISTS (SELECT 1 FROM pg_opclass oc JOIN pg_am am ON am.oid = oc.opcmethod
               WHERE am.amname = 'hash' AND oc.opcdefault
                 AND (oc.opcintype = t.oid
                      OR EXISTS (SELECT 1 FROM pg_cast c WHERE c.castsource = t.oid
                                 AND c.casttarget = oc.opcintype AND c.castmethod = 'b')))
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_range r ON r.rngtypid = t.oid
LEFT JOIN pg_range mr ON mr.rngmultitypid = t.oid
"""


@dataclass(frozen=True)
class TypeInfo:
    oid: int
    name: str
    schema: str
    typtype: str
    category: str
    base: int
    element: int
    subtype: int
    hashable: bool


def load_types(conn) -> dict[int, TypeInfo]:
    return {r[0]: TypeInfo(*r) for r in conn.execute(TYPES_SQL).fetchall()}


def hashed_as_text(type_oid: int, types: dict[int, TypeInfo], deterministic: bool = True, depth: int = 0) -> bool:
    """Whether a column of this type must be hashed by its text to compare values exactly."""
    t = types.get(type_oid)
    if t is None or depth > 10 or not deterministic:
        return True
    if t.typtype == "d":
        return hashed_as_text(t.base, types, True, depth + 1)
    if t.category == "A" and t.element:
        return hashed_as_text(t.element, types, True, depth + 1)
    if t.typtype in ("r", "m"):
        return hashed_as_text(t.subtype, types, True, depth + 1)
    if t.typtype in ("e", "c") or t.name.startswith("reg") or not t.hashable:
        return True
    if t.schema != "pg_catalog":
        return True   # an extension's type (citext, ...): its equality may be looser than identity
    return t.name in LOOSE_EQUALITY


def column_expression(column: str, as_text: bool) -> sql.Composable:
    return sql.SQL("t.{}::text").format(sql.Identifier(column)) if as_text else \
        sql.SQL("t.{}").format(sql.Identifier(column))


def row_hash(columns: list[str], text_columns: set[str]) -> str:
    """The per-row hash summed by the chunk checksums: record hash, then a full 64-bit mix."""
    parts = [column_expression(c, c in text_columns) for c in columns]
    record = sql.SQL("hash_record_extended(ROW({}), 0)").format(sql.SQL(", ").join(parts)).as_string(None)
    return f"hashtextextended(({record})::text, 0)"


TEXT_ROW_HASH = "hashtextextended(t::text, 0)"
