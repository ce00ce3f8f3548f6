"""User-defined types on the target: created from the source's catalog when the sink creates a table
that uses them (enums, domains, composites, ranges, and arrays of these, dependencies first), and enum
labels the source added since, added to the target at the same place in the sort order.

The source's catalog is read with search_path set to pg_catalog alone, so that every type, function
and collation outside pg_catalog comes back schema-qualified (format_type, pg_get_constraintdef,
pg_get_expr) and means the same on the target whatever its search_path."""

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import psycopg2
from psycopg2 import sql

from pg_kafka_cdc.common.catalog import FIRST_USER_OID, Column, enum_labels
from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.pg import error_reason, sqlstate
from pg_kafka_cdc.common.tables import TableName, quote_if_needed

log = logging.getLogger("sink.user_types")

KINDS = {"e": "enum", "d": "domain", "c": "composite", "r": "range"}

NAMEDATALEN = 64

Name = tuple[str, str]  # (schema, name)


def qualified(name: Name) -> str:
    """`schema.name` as PostgreSQL prints it (quoted where needed)."""
    return f"{quote_if_needed(name[0])}.{quote_if_needed(name[1])}"


def literal(text: str) -> str:
    """A string as an SQL literal, for the lines printed to the operator."""
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class Check:
    name: str
    definition: str  # pg_get_constraintdef: `CHECK ((VALUE > 0))`, with ` NOT VALID` when not validated
    validated: bool


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # format_type
    collation: Name | None  # only when not the attribute type's default


@dataclass(frozen=True)
class UserType:
    """A user-defined type as the source's catalog describes it, enough to create it elsewhere."""

    oid: int
    schema: str
    name: str
    kind: str  # e enum, d domain, c composite, r range
    depends: tuple[int, ...] = ()  # user-defined types it needs (arrays resolved to their element)
    labels: tuple[str, ...] = ()  # enum: in sort order
    base: str = ""  # domain: its base type; range: its subtype (format_type)
    not_null: bool = False  # domain
    default: str | None = None  # domain: the default expression
    collation: Name | None = None  # domain, range: only when not the base type's / subtype's default
    checks: tuple[Check, ...] = ()  # domain
    attributes: tuple[Attribute, ...] = ()  # composite, in order
    opclass: Name | None = None  # range: the subtype's operator class, only when not the default
    subtype_diff: Name | None = None  # range
    multirange: Name | None = None  # range: only when not the name PostgreSQL would give it

    @property
    def qualified_name(self) -> Name:
        return (self.schema, self.name)

    @property
    def description(self) -> str:
        return f"{KINDS[self.kind]} {qualified(self.qualified_name)}"


def default_multirange_name(range_name: str) -> str:
    """The multirange type name CREATE TYPE ... AS RANGE gives a range without MULTIRANGE_TYPE_NAME
    (PostgreSQL's makeMultirangeTypeName): `range` becomes `multirange`, else `_multirange` is appended."""
    at = range_name.find("range")
    if at >= 0:
        name = range_name[:at] + "multi" + range_name[at:]
    else:
        name = _clip(range_name, NAMEDATALEN - 12) + "_multirange"
    return _clip(name, NAMEDATALEN - 1)


def _clip(text: str, size: int) -> str:
    """The longest prefix of `text` of at most `size` bytes in UTF-8, cut at a character boundary."""
    encoded = text.encode()
    if len(encoded) <= size:
        return text
    return encoded[:size].decode(errors="ignore")


def creation_order(types: Mapping[int, UserType]) -> list[UserType]:
    """The types, each after the types among them it depends on (dependencies outside `types` exist
    already); otherwise in the mapping's order."""
    ordered: list[UserType] = []
    placed: set[int] = set()
    visiting: set[int] = set()

    def place(oid: int) -> None:
        if oid in placed or oid not in types:
            return
        if oid in visiting:  # PostgreSQL allows no cycle between types; never loop on one
            return
        visiting.add(oid)
        for dependency in types[oid].depends:
            place(dependency)
        visiting.discard(oid)
        placed.add(oid)
        ordered.append(types[oid])

    for oid in types:
        place(oid)
    return ordered


def _collate(collation: Name | None) -> sql.Composable:
    return sql.SQL("") if collation is None else sql.SQL(" COLLATE {}").format(sql.Identifier(*collation))


def create_statements(user_type: UserType) -> list[sql.Composed]:
    """The statements that create the type (catalog texts such as format_type's and
    pg_get_constraintdef's are used as they are: they come from the source's own catalog)."""
    ident = sql.Identifier(user_type.schema, user_type.name)
    if user_type.kind == "e":
        return [
            sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
                ident, sql.SQL(", ").join(map(sql.Literal, user_type.labels))
            )
        ]
    if user_type.kind == "d":
        # CREATE DOMAIN cannot add a NOT VALID check: those are added by ALTER DOMAIN (which, on an
        # unused domain, has nothing to validate anyway)
        inline = [c for c in user_type.checks if c.validated]
        statements = [
            sql.SQL("CREATE DOMAIN {} AS {}{}{}{}{}").format(
                ident,
                sql.SQL(user_type.base),
                _collate(user_type.collation),
                sql.SQL("")
                if user_type.default is None
                else sql.SQL(" DEFAULT {}").format(sql.SQL(user_type.default)),
                sql.SQL(" NOT NULL" if user_type.not_null else ""),
                sql.SQL("").join(
                    sql.SQL(" CONSTRAINT {} {}").format(sql.Identifier(c.name), sql.SQL(c.definition))
                    for c in inline
                ),
            )
        ]
        statements.extend(
            sql.SQL("ALTER DOMAIN {} ADD CONSTRAINT {} {}").format(
                ident, sql.Identifier(c.name), sql.SQL(c.definition)
            )
            for c in user_type.checks
            if not c.validated
        )
        return statements
    if user_type.kind == "c":
        return [
            sql.SQL("CREATE TYPE {} AS ({})").format(
                ident,
                sql.SQL(", ").join(
                    sql.SQL("{} {}{}").format(sql.Identifier(a.name), sql.SQL(a.type), _collate(a.collation))
                    for a in user_type.attributes
                ),
            )
        ]
    if user_type.kind == "r":
        options: list[sql.Composable] = [sql.SQL("SUBTYPE = {}").format(sql.SQL(user_type.base))]
        if user_type.opclass is not None:
            options.append(sql.SQL("SUBTYPE_OPCLASS = {}").format(sql.Identifier(*user_type.opclass)))
        if user_type.collation is not None:
            options.append(sql.SQL("COLLATION = {}").format(sql.Identifier(*user_type.collation)))
        if user_type.subtype_diff is not None:
            options.append(sql.SQL("SUBTYPE_DIFF = {}").format(sql.Identifier(*user_type.subtype_diff)))
        if user_type.multirange is not None:
            options.append(sql.SQL("MULTIRANGE_TYPE_NAME = {}").format(sql.Identifier(*user_type.multirange)))
        return [sql.SQL("CREATE TYPE {} AS RANGE ({})").format(ident, sql.SQL(", ").join(options))]
    raise ValueError(f"no statement creates a type of kind {user_type.kind!r}")


# --- reading the source's catalog ----------------------------------------------------------------


class Uncreatable(Exception):
    """A type the sink cannot create: what it is, and how the operator can create it."""

    def __init__(self, name: Name, what: str, fix: str) -> None:
        super().__init__(f"{qualified(name)} ({what})")
        self.name = name
        self.what = what
        self.fix = fix


_TYPE = """
SELECT n.nspname, t.typname, t.typtype, coalesce(c.relkind::text, ''), t.typrelid,
       coalesce((SELECT e.oid FROM pg_type e WHERE e.typarray = t.oid), 0),
       {multirange_of},
       (SELECT x.extname FROM pg_depend d JOIN pg_extension x ON x.oid = d.refobjid
        WHERE d.classid = 'pg_type'::regclass AND d.objid = t.oid
          AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' LIMIT 1),
       (SELECT quote_ident(rn.nspname) || '.' || quote_ident(r.relname) FROM pg_class r JOIN pg_namespace rn ON rn.oid = r.relnamespace
        WHERE r.oid = t.typrelid)
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_class c ON c.oid = t.typrelid
WHERE t.oid = %s
"""

# The types a type's definition refers to: its base type or subtype, its attributes' types, the
# types its default and its checks use.
_DEPENDS = """
SELECT d.refobjid FROM pg_depend d
WHERE d.refclassid = 'pg_type'::regclass AND d.refobjid <> %(oid)s
  AND ((d.classid = 'pg_type'::regclass AND d.objid = %(oid)s)
       OR (d.classid = 'pg_class'::regclass AND d.objid = %(relid)s AND %(relid)s <> 0)
       OR (d.classid = 'pg_constraint'::regclass
           AND d.objid IN (SELECT oid FROM pg_constraint WHERE contypid = %(oid)s)))
ORDER BY d.classid, d.objsubid, d.refobjid
"""

_DOMAIN = """
SELECT t.typbasetype, format_type(t.typbasetype, t.typtypmod), t.typnotnull, pg_get_expr(t.typdefaultbin, 0),
       cn.nspname, co.collname
FROM pg_type t JOIN pg_type b ON b.oid = t.typbasetype
LEFT JOIN pg_collation co ON co.oid = t.typcollation AND t.typcollation <> b.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE t.oid = %s
"""

_CHECKS = """
SELECT conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint
WHERE contypid = %s AND contype = 'c' ORDER BY conname
"""

_ATTRIBUTES = """
SELECT a.atttypid, a.attname, format_type(a.atttypid, a.atttypmod), cn.nspname, co.collname
FROM pg_type t JOIN pg_attribute a ON a.attrelid = t.typrelid
JOIN pg_type at ON at.oid = a.atttypid
LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> at.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
WHERE t.oid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_RANGE = """
SELECT r.rngsubtype, format_type(r.rngsubtype, NULL), opc.opcdefault, opn.nspname, opc.opcname,
       cn.nspname, co.collname, r.rngcanonical::oid, r.rngcanonical::text, pn.nspname, p.proname,
       {multirange}
FROM pg_range r JOIN pg_type st ON st.oid = r.rngsubtype
JOIN pg_opclass opc ON opc.oid = r.rngsubopc JOIN pg_namespace opn ON opn.oid = opc.opcnamespace
LEFT JOIN pg_collation co ON co.oid = r.rngcollation AND r.rngcollation <> st.typcollation
LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
LEFT JOIN pg_proc p ON p.oid = r.rngsubdiff LEFT JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE r.rngtypid = %s
"""

_MULTIRANGE = (
    "(SELECT mn.nspname FROM pg_type m JOIN pg_namespace mn ON mn.oid = m.typnamespace WHERE m.oid = r.rngmultitypid),"
    " (SELECT m.typname FROM pg_type m WHERE m.oid = r.rngmultitypid)"
)


def _has_multiranges(conn: Any) -> bool:
    return int(conn.server_version) >= 140000


@contextmanager
def _qualifying_cursor(conn: Any) -> Iterator[Any]:
    """A cursor on `conn` with search_path set to pg_catalog alone (every other name comes back
    schema-qualified), the connection's own search_path restored afterwards."""
    with conn.cursor() as cur:
        cur.execute("SELECT current_setting('search_path')")
        saved = cur.fetchone()[0]
        cur.execute("SELECT set_config('search_path', 'pg_catalog', false)")
        try:
            yield cur
        finally:
            # when the transaction failed this fails too, and the rollback restores the setting
            with suppress(psycopg2.Error):
                cur.execute("SELECT set_config('search_path', %s, false)", (saved,))


def _type_exists(cur: Any, name: Name) -> bool:
    cur.execute(
        "SELECT 1 FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace "
        "WHERE n.nspname = %s AND t.typname = %s",
        name,
    )
    return cur.fetchone() is not None


def _ensure_schema(cur: Any, schema: str) -> None:
    """As target.ensure_schema (not imported from there: target imports this module)."""
    cur.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,))
    if cur.fetchone() is None:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))


@dataclass(frozen=True)
class _TypeHead:
    schema: str
    name: str
    kind: str
    relkind: str
    relid: int
    element: int  # the element of an array type, else 0
    range_of: int  # the range of a multirange type, else 0
    extension: str | None
    relation: str | None


def _head(cur: Any, oid: int) -> _TypeHead | None:
    multirange_of = (
        "coalesce((SELECT r.rngtypid FROM pg_range r WHERE r.rngmultitypid = t.oid), 0)"
        if _has_multiranges(cur.connection)
        else "0"
    )
    cur.execute(sql.SQL(_TYPE).format(multirange_of=sql.SQL(multirange_of)), (oid,))
    row = cur.fetchone()
    return None if row is None else _TypeHead(*row)


def _dependencies(cur: Any, oid: int, relid: int, explicit: Sequence[int]) -> tuple[int, ...]:
    cur.execute(_DEPENDS, {"oid": oid, "relid": relid})
    found = [*explicit, *(r[0] for r in cur.fetchall())]
    return tuple(dict.fromkeys(d for d in found if d != oid and d >= FIRST_USER_OID))


def _name_of(schema: str | None, name: str | None) -> Name | None:
    """A catalog object's (schema, name), None when the query found none."""
    return None if schema is None or name is None else (schema, name)


def read_user_type(cur: Any, oid: int, head: _TypeHead) -> UserType:
    """The type's definition from the source's catalog (a cursor of _qualifying_cursor)."""
    name = (head.schema, head.name)
    if head.extension is not None:
        raise Uncreatable(name, f"a type of extension {head.extension}", f"CREATE EXTENSION {head.extension}")
    if head.kind == "e":
        return UserType(oid, head.schema, head.name, "e", labels=tuple(enum_labels(cur.connection, oid)))
    if head.kind == "d":
        cur.execute(_DOMAIN, (oid,))
        base_oid, base, not_null, default, coll_schema, coll_name = cur.fetchone()
        cur.execute(_CHECKS, (oid,))
        checks = tuple(Check(n, d, v) for n, d, v in cur.fetchall())
        return UserType(
            oid,
            head.schema,
            head.name,
            "d",
            depends=_dependencies(cur, oid, 0, [base_oid]),
            base=base,
            not_null=not_null,
            default=default,
            collation=_name_of(coll_schema, coll_name),
            checks=checks,
        )
    if head.kind == "c":
        if head.relkind != "c":
            raise Uncreatable(
                name,
                f"the row type of table {head.relation}",
                f"create table {head.relation} on the target first (pg_dump --schema-only -t {head.relation})",
            )
        cur.execute(_ATTRIBUTES, (oid,))
        rows = cur.fetchall()
        return UserType(
            oid,
            head.schema,
            head.name,
            "c",
            depends=_dependencies(cur, oid, head.relid, [r[0] for r in rows]),
            attributes=tuple(Attribute(n, t, _name_of(s, c)) for _, n, t, s, c in rows),
        )
    if head.kind == "r":
        multirange = _MULTIRANGE if _has_multiranges(cur.connection) else "NULL, NULL"
        cur.execute(sql.SQL(_RANGE).format(multirange=sql.SQL(multirange)), (oid,))
        (subtype_oid, subtype, opc_default, opc_schema, opc_name, coll_schema, coll_name, canonical, canonical_name,
         diff_schema, diff_name, multi_schema, multi_name) = cur.fetchone()  # fmt: skip
        if canonical:
            raise Uncreatable(
                name,
                f"a range type with canonical function {canonical_name}, which is written in C",
                "pg_dump --schema-only of the source",
            )
        multi = _name_of(multi_schema, multi_name)
        if multi == (head.schema, default_multirange_name(head.name)):
            multi = None
        return UserType(
            oid,
            head.schema,
            head.name,
            "r",
            depends=_dependencies(cur, oid, 0, [subtype_oid]),
            base=subtype,
            collation=_name_of(coll_schema, coll_name),
            opclass=None if opc_default else (opc_schema, opc_name),
            subtype_diff=_name_of(diff_schema, diff_name),
            multirange=multi,
        )
    what = "a base type, defined in C" if head.kind == "b" else f"a type of kind {head.kind!r}"
    raise Uncreatable(
        name, what, "with CREATE EXTENSION for the extension that defines it, or from pg_dump --schema-only"
    )


def _uncreatable_line(column: Column, table: TableName, exc: Uncreatable, own: bool) -> str:
    needs = f" ({exc.what})" if own else f", which needs type {qualified(exc.name)} ({exc.what}),"
    return (
        f"column {column.name} of {table} has type {column.type}{needs} missing on the target, "
        f"and the sink cannot create it: create it there first ({exc.fix}), then restart the sink"
    )


def create_missing_types(source_conn: Any, cur: Any, table: TableName, columns: Sequence[Column]) -> list[str]:
    """Create on the target (through `cur`, in its transaction) every user-defined type the columns
    use that the target lacks (by schema and name), with the types they depend on, from the source's
    catalog; dependencies first. One description per created type ("enum public.mood")."""
    missing: dict[int, UserType] = {}
    needed_by: dict[int, Column] = {}
    seen: set[int] = set()
    with _qualifying_cursor(source_conn) as src:

        def collect(oid: int, column: Column) -> None:
            if oid < FIRST_USER_OID or oid in seen:
                return
            seen.add(oid)
            head = _head(src, oid)
            if head is None:
                raise SinkError(
                    f"column {column.name} of {table} has type {column.type}, which the source's catalog no "
                    "longer has (dropped meanwhile?): restart the sink"
                )
            if head.element or head.range_of:  # an array or a multirange comes with its element or range
                collect(head.element or head.range_of, column)
                return
            if _type_exists(cur, (head.schema, head.name)):
                return
            try:
                user_type = read_user_type(src, oid, head)
            except Uncreatable as exc:
                own = oid in (column.type_oid, column.element_oid)
                raise SinkError(_uncreatable_line(column, table, exc, own)) from None
            for dependency in user_type.depends:
                collect(dependency, column)
            missing[oid] = user_type
            needed_by[oid] = column

        for column in columns:
            collect(column.type_oid, column)

    created = []
    for user_type in creation_order(missing):
        column = needed_by[user_type.oid]
        _ensure_schema(cur, user_type.schema)
        if user_type.multirange is not None:
            _ensure_schema(cur, user_type.multirange[0])
        try:
            for statement in create_statements(user_type):
                cur.execute(statement)
        except psycopg2.Error as exc:
            raise SinkError(
                f"column {column.name} of {table} has type {column.type}, which needs {user_type.description}, "
                f"missing on the target; creating it there failed ({error_reason(exc)}): create it there "
                "first (e.g. from pg_dump --schema-only of the source), then restart the sink"
            ) from None
        log.info(
            "created %s on the target (for column %s of %s)",
            user_type.description,
            column.name,
            table,
            extra={"table": str(table)},
        )
        created.append(user_type.description)
    return created


# --- enum labels ---------------------------------------------------------------------------------

_ENUM_VALUE = re.compile(r'^invalid input value for enum (.+?): "(.*)"$', re.DOTALL)


def _primary_message(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    message = getattr(diag, "message_primary", None) if diag is not None else None
    if message:
        return str(message)
    text = str(exc).strip().split("\n", 1)[0]
    return text.removeprefix("ERROR:").strip()


def _enum_error(exc: BaseException) -> re.Match[str] | None:
    """The enum error PostgreSQL raised (exc, or the error it was raised from), matched: type, value."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if sqlstate(current) == "22P02":
            match = _ENUM_VALUE.match(_primary_message(current))
            if match:
                return match
        current = current.__cause__
    return None


def is_missing_enum_value(exc: BaseException) -> bool:
    """True for PostgreSQL's error for a value that is not a label of an enum (SQLSTATE 22P02,
    `invalid input value for enum ...`), raised directly or as the cause of `exc`."""
    return _enum_error(exc) is not None


def missing_enum_value_line(table: TableName, exc: BaseException) -> str:
    """The line the sink prints when the target's enum lacks a value and the source cannot be read
    to add it."""
    match = _enum_error(exc)
    type_name, value = (match.group(1), match.group(2)) if match else ("<type>", "<value>")
    return (
        f"cannot apply a change to {table}: enum type {type_name} on the target has no value {literal(value)} "
        "(added on the source) and the source could not be read to add it: run "
        f"ALTER TYPE {type_name} ADD VALUE {literal(value)} on the target (with BEFORE or AFTER its neighbour "
        "in the source's order), then restart the sink"
    )


@dataclass(frozen=True)
class LabelAddition:
    label: str
    position: str | None  # BEFORE, AFTER, or None (at the end)
    neighbour: str | None


class LabelOrderError(Exception):
    """The target orders labels it shares with the source differently: adding cannot fix it."""


def label_additions(source: Sequence[str], target: Sequence[str]) -> list[LabelAddition]:
    """What to add to the target's labels, in order, so that they hold the source's labels in the
    source's order (labels only the target has stay where they are). Each label goes AFTER its
    predecessor in the source (which exists by then), the first ones BEFORE the first shared label."""
    source_set = set(source)
    shared = [label for label in target if label in source_set]
    target_set = set(target)
    if shared != [label for label in source if label in target_set]:
        raise LabelOrderError(
            f"the target orders {', '.join(map(literal, shared))}; the source "
            f"{', '.join(literal(label) for label in source if label in target_set)}"
        )
    additions = []
    for index, label in enumerate(source):
        if label in target_set:
            continue
        if index > 0:
            additions.append(LabelAddition(label, "AFTER", source[index - 1]))
        elif shared:
            additions.append(LabelAddition(label, "BEFORE", shared[0]))
        else:
            additions.append(LabelAddition(label, None, None))
    return additions


def add_value_statement(name: Name, addition: LabelAddition) -> sql.Composed:
    position: sql.Composable = sql.SQL("")
    if addition.position is not None:
        assert addition.neighbour is not None
        position = sql.SQL(" {} {}").format(sql.SQL(addition.position), sql.Literal(addition.neighbour))
    return sql.SQL("ALTER TYPE {} ADD VALUE IF NOT EXISTS {}{}").format(
        sql.Identifier(*name), sql.Literal(addition.label), position
    )


_TARGET_TYPE = """
SELECT n.nspname, t.typname, t.typtype,
       array_remove(ARRAY[(SELECT e.oid FROM pg_catalog.pg_type e WHERE e.typarray = t.oid),
                          nullif(t.typbasetype, 0),
                          (SELECT r.rngsubtype FROM pg_catalog.pg_range r WHERE r.rngtypid = t.oid),
                          {multirange_of}]::oid[]
                    || ARRAY(SELECT a.atttypid FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = t.typrelid AND t.typrelid <> 0 AND a.attnum > 0
                               AND NOT a.attisdropped ORDER BY a.attnum),
                    NULL)
FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE t.oid = %s
"""

_SOURCE_ENUM = """
SELECT t.oid FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = %s AND t.typname = %s AND t.typtype = 'e'
"""


def _enums_used(conn: Any, type_names: Sequence[str]) -> dict[int, Name]:
    """The enum types the types use: themselves, as array elements, domain bases, composite
    attributes, range subtypes (oid on `conn` -> schema, name)."""
    multirange_of = (
        "(SELECT r.rngtypid FROM pg_catalog.pg_range r WHERE r.rngmultitypid = t.oid)"
        if _has_multiranges(conn)
        else "NULL"
    )
    query = sql.SQL(_TARGET_TYPE).format(multirange_of=sql.SQL(multirange_of))
    enums: dict[int, Name] = {}
    seen: set[int] = set()
    with conn.cursor() as cur:
        pending = []
        for type_name in type_names:
            cur.execute("SELECT pg_catalog.to_regtype(%s)::oid", (type_name,))
            row = cur.fetchone()
            if row is not None and row[0] is not None:
                pending.append(int(row[0]))
        while pending:
            oid = pending.pop(0)
            if oid < FIRST_USER_OID or oid in seen:
                continue
            seen.add(oid)
            cur.execute(query, (oid,))
            found = cur.fetchone()
            if found is None:
                continue
            schema, name, kind, uses = found
            if kind == "e":
                enums[oid] = (schema, name)
            pending.extend(int(u) for u in uses or ())
    return enums


def add_missing_enum_values(
    source_conn: Any, target_conn: Any, table: TableName, columns: Mapping[str, str]
) -> list[str]:
    """Add to the target's enum types that the table's columns use (name -> type as the target prints
    it; arrays, domains, composites and ranges over enums count) every label the source's enum of the
    same schema and name has and the target's lacks, at the same place in the sort order; committed
    on target_conn (a new label is usable only once its transaction committed), so call it outside
    any batch. Returns one description per label added (`public.mood: 'ecstatic'`)."""
    added: list[str] = []
    try:
        enums = _enums_used(target_conn, list(dict.fromkeys(columns.values())))
        for oid, name in enums.items():
            with source_conn.cursor() as src:
                src.execute(_SOURCE_ENUM, name)
                row = src.fetchone()
            if row is None:
                raise SinkError(
                    f"enum type {qualified(name)} of table {table} on the target has no enum of that name on the "
                    f"source, so the values it lacks cannot be added from there: add them on the target "
                    f"(ALTER TYPE {qualified(name)} ADD VALUE '...'), then restart the sink"
                )
            source_labels = enum_labels(source_conn, int(row[0]))
            target_labels = enum_labels(target_conn, oid)
            try:
                additions = label_additions(source_labels, target_labels)
            except LabelOrderError as exc:
                raise SinkError(
                    f"enum type {qualified(name)} of table {table} orders its values differently on the target "
                    f"than on the source ({exc}), which adding values cannot fix: recreate it on the target "
                    "with the source's values in the source's order (pg_dump --schema-only of the source), "
                    "then restart the sink"
                ) from None
            with target_conn.cursor() as cur:
                for addition in additions:
                    try:
                        cur.execute(add_value_statement(name, addition))
                    except psycopg2.Error as exc:
                        raise SinkError(
                            f"cannot add value {literal(addition.label)} to enum type {qualified(name)} of table "
                            f"{table} on the target: {error_reason(exc)}: run "
                            f"{add_value_statement(name, addition).as_string(target_conn)} there (as the type's "
                            "owner), then restart the sink"
                        ) from None
                    added.append(f"{qualified(name)}: {literal(addition.label)}")
        target_conn.commit()
    except BaseException:
        if not target_conn.closed:
            target_conn.rollback()
        raise
    for description in added:
        log.info("added enum value %s on the target (for %s)", description, table, extra={"table": str(table)})
    return added
