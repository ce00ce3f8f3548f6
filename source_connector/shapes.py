"""Shape changes read from the stream: the shape the source last published for a table against the
shape an I or U message carries (wal2json's `include-column-positions`). Pure.

A column is identified by its attnum, which a rename keeps and a drop never gives to another column:
- an attnum in the message, not in the shape: added;
- the same attnum under another name: renamed; with another type: retyped;
- an attnum of the shape absent from an INSERT: dropped. An UPDATE leaves out unchanged TOASTed
  columns, so an attnum absent from one counts as dropped only when the catalog says that attnum is
  dropped now (pg_attribute.attisdropped); otherwise the column stays in the shape.

The new shape is the message's (names, types, attnums), completed from the catalog by attnum (key,
NOT NULL, the type as format_type prints it when it is the one the message carries). The catalog
may be ahead of the stream (two ALTERs in quick succession), so names are never taken from it for
attnums the message carries.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pg_kafka_cdc.common.catalog import Attribute, TableNow
from schemas.envelope import AddedColumn, SchemaChange
from source_connector.table_info import TableInfo, wal2json_type

Shape = list[tuple[int, str, str]]  # (attnum, name, type as wal2json prints it), in attnum order
Dropped = Callable[[list[int]], Iterable[int]]  # attnums absent from an update -> those dropped now


@dataclass(frozen=True)
class ShapeDiff:
    """How a message's shape differs from the published one, and the shape to publish next."""

    shape: Shape
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (old name, new name)
    retyped: list[tuple[int, str, str]] = field(default_factory=list)  # (attnum, old type, new type), wal2json's
    dropped: list[tuple[int, str]] = field(default_factory=list)  # (attnum, old name)
    added: list[int] = field(default_factory=list)  # attnums


def compare(old: Shape, message: Shape, insert: bool, dropped_now: Dropped) -> ShapeDiff | None:
    """The difference, or None when the message fits the shape (an update leaving out unchanged
    TOASTed columns fits it). `dropped_now` is asked only about attnums absent from an update."""
    before = {a: (n, t) for a, n, t in old}
    carried = {a for a, _, _ in message}
    renamed: list[tuple[str, str]] = []
    retyped: list[tuple[int, str, str]] = []
    added: list[int] = []
    for attnum, name, type_name in message:
        was = before.get(attnum)
        if was is None:
            added.append(attnum)
            continue
        if was[0] != name:
            renamed.append((was[0], name))
        if was[1] != type_name:
            retyped.append((attnum, was[1], type_name))
    absent = [a for a, _, _ in old if a not in carried]
    gone: set[int] = set(absent) if insert else (set(dropped_now(absent)) if absent else set())
    if not (renamed or retyped or added or gone):
        return None
    kept = [(a, n, t) for a, n, t in old if a not in carried and a not in gone]
    shape = sorted([*message, *kept])
    dropped = [(a, before[a][0]) for a in absent if a in gone]
    return ShapeDiff(shape, renamed, retyped, dropped, added)


def next_info(old: TableInfo, shape: Shape, now: TableNow | None) -> TableInfo:
    """The table with the new shape: names and attnums from the message, the rest from the catalog by attnum."""
    attributes = now.attributes if now is not None else {}
    old_types = dict(zip(old.attnums, (old.types[c] for c in old.columns), strict=True))
    old_not_null = {a for a, c in zip(old.attnums, old.columns, strict=True) if c in old.not_null}
    names = {a: n for a, n, _ in shape}
    types: dict[str, str] = {}
    not_null: set[str] = set()
    for attnum, name, type_name in shape:
        attr = _live(attributes, attnum)
        if attr is not None and wal2json_type(attr.type) == type_name:
            types[name] = attr.type
        elif attnum in old_types and wal2json_type(old_types[attnum]) == type_name:
            types[name] = old_types[attnum]
        else:
            types[name] = type_name
        if attr.not_null if attr is not None else (now is None and attnum in old_not_null):
            not_null.add(name)
    key = _key(old, names, now)
    return TableInfo(
        name=old.name,
        topic=old.topic,
        columns=tuple(n for _, n, _ in shape),
        types=types,
        key=key,
        replica_identity=now.replica_identity if now is not None else old.replica_identity,
        not_null=frozenset(not_null),
        key_from_pk=now.has_pk if now is not None else old.key_from_pk,
        attnums=tuple(a for a, _, _ in shape),
        relfilenode=now.relfilenode if now is not None else old.relfilenode,
    )


def _live(attributes: dict[int, Attribute], attnum: int) -> Attribute | None:
    attr = attributes.get(attnum)
    return None if attr is None or attr.dropped else attr


def _key(old: TableInfo, names: dict[int, str], now: TableNow | None) -> tuple[str, ...]:
    """The key by the catalog's key attnums, named as in the new shape; the old key's attnums when
    the catalog's key is not all in the shape (the catalog ahead of the stream)."""
    if now is not None and now.key_attnums and all(a in names for a in now.key_attnums):
        return tuple(names[a] for a in now.key_attnums)
    by_name = dict(zip(old.columns, old.attnums, strict=True))
    return tuple(names.get(by_name[k], k) if k in by_name else k for k in old.key)


def schema_change(old: TableInfo, new: TableInfo, diff: ShapeDiff, now: TableNow | None) -> SchemaChange:
    """The event's `schema_change`: types as format_type prints them, names as the event's `columns`."""
    attributes = now.attributes if now is not None else {}
    names = dict(zip(new.attnums, new.columns, strict=True))
    old_types = dict(zip(old.attnums, (old.types[c] for c in old.columns), strict=True))
    added: list[AddedColumn] = []
    for attnum in diff.added:
        name = names[attnum]
        attr = _live(attributes, attnum)
        added.append(
            {
                "name": name,
                "type": new.types[name],
                "not_null": name in new.not_null,
                "default": None if attr is None else attr.default,
                "missing": None if attr is None else attr.missing,
            }
        )
    return {
        "renamed": [{"from": a, "to": b} for a, b in diff.renamed],
        "retyped": [
            {"name": names[a], "from": old_types.get(a, was), "to": new.types[names[a]]}
            for a, was, _ in diff.retyped
        ],
        "dropped": [n for _, n in diff.dropped],
        "added": added,
        "rewritten": bool(now is not None and old.relfilenode and now.relfilenode != old.relfilenode),
    }


def renamed_key(old: TableInfo, change: SchemaChange) -> list[tuple[str, str]]:
    """The key columns a change renames, (old, new)."""
    return [(r["from"], r["to"]) for r in change["renamed"] if r["from"] in old.key]
