"""What a schema-change event (`s`, see schemas/envelope.py) means for a target table. Pure.

The source publishes one `s` event per table shape change, in the table's topic, on every
partition, ordered with the table's changes: columns renamed, retyped (by their new name), dropped
and added, applied in that order. The sink (`--schema-changes`):

- keep (the default): RENAME COLUMN; ALTER COLUMN TYPE for a widening type change (`widens`), any
  other type change stops the sink with the statement to run; a dropped column loses its NOT NULL
  and default but stays; an added column gets the value the source's older rows read (`missing`) as
  its default, and NOT NULL as on the source, else it is added nullable (and, when the source has a
  default for it that the stream does not carry, a snapshot of the table is asked for);
- drop: as keep, but a dropped column is dropped (DROP COLUMN IF EXISTS);
- none: the events are skipped; columns are added as events carry them (target.reconcile).

A change older than a schema change already applied to its table (from a partition not yet past
the event, or replayed by `cdc-sink rebuild`) is translated to the table's current shape before it is
applied (`TableShapes.translate`): its columns renamed and retyped, dropped ones left out in drop
mode.
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from psycopg2 import sql

from pg_kafka_cdc.common.catalog import ColumnFill
from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.tables import TableName, quote_if_needed
from schemas import codec
from sink_connector.added_columns import Fill
from sink_connector.changes import Change
from sink_connector.target import checked_type, fill_note, normalize_type, type_change_line, value_default

MODES = ("keep", "drop", "none")
DEFAULT_MODE = "keep"

Position = tuple[int, int]  # (commit LSN, seq) of the event in its stream
EventId = tuple[str, int, int]  # (stream, commit LSN, seq): the same event on every partition


@dataclass(frozen=True)
class Added:
    name: str
    type: str
    not_null: bool
    default: str | None  # the source's default expression
    missing: str | None  # what the source's rows older than the ADD read


@dataclass(frozen=True)
class SchemaEvent:
    """One `s` event of a table, as applied (or to apply)."""

    stream: str
    commit_lsn: int
    seq: int
    renamed: tuple[tuple[str, str], ...] = ()
    retyped: tuple[tuple[str, str, str], ...] = ()  # (new name, from type, to type)
    dropped: tuple[str, ...] = ()
    added: tuple[Added, ...] = ()
    rewritten: bool = False
    columns: Mapping[str, str] = field(default_factory=dict)  # the new shape
    key: tuple[str, ...] = ()

    @property
    def position(self) -> Position:
        return self.commit_lsn, self.seq

    @property
    def ident(self) -> EventId:
        return self.stream, self.commit_lsn, self.seq

    def document(self) -> dict[str, Any]:
        """The event as stored in the history table (parse_document reads it back)."""
        return {
            "schema_change": {
                "renamed": [{"from": a, "to": b} for a, b in self.renamed],
                "retyped": [{"name": n, "from": a, "to": b} for n, a, b in self.retyped],
                "dropped": list(self.dropped),
                "added": [
                    {
                        "name": a.name,
                        "type": a.type,
                        "not_null": a.not_null,
                        "default": a.default,
                        "missing": a.missing,
                    }
                    for a in self.added
                ],
                "rewritten": self.rewritten,
            },
            "columns": dict(self.columns),
            "key": list(self.key),
        }


def parse(
    stream: str,
    commit_lsn: int,
    seq: int,
    change: Mapping[str, Any],
    columns: Mapping[str, str],
    key: Iterable[str],
) -> SchemaEvent:
    """A SchemaEvent from the `schema_change` object of an envelope (checked by schemas.codec)."""
    return SchemaEvent(
        stream,
        commit_lsn,
        seq,
        tuple((r["from"], r["to"]) for r in change.get("renamed") or ()),
        tuple((r["name"], r["from"], r["to"]) for r in change.get("retyped") or ()),
        tuple(change.get("dropped") or ()),
        tuple(
            Added(a["name"], a["type"], bool(a.get("not_null")), a.get("default"), a.get("missing"))
            for a in change.get("added") or ()
        ),
        bool(change.get("rewritten")),
        dict(columns),
        tuple(key),
    )


def parse_document(stream: str, commit_lsn: int, seq: int, doc: Mapping[str, Any]) -> SchemaEvent:
    return parse(stream, commit_lsn, seq, doc["schema_change"], doc.get("columns") or {}, doc.get("key") or ())


def event_of(change: Change) -> SchemaEvent:
    """The SchemaEvent of an `s` change (changes.decode made sure it has a position)."""
    assert change.schema_change is not None and change.commit_lsn is not None and change.seq is not None
    return parse(
        change.stream or "",
        change.commit_lsn,
        change.seq,
        change.schema_change,
        change.columns or {},
        change.key_columns or (),
    )


# --- type changes ---------------------------------------------------------------------------------

_INT_DIGITS = {"smallint": 5, "integer": 10, "bigint": 19}
_NUMERIC = re.compile(r"^numeric(?:\((\d+),(\d+)\))?$")
_VARCHAR = re.compile(r"^character varying(?:\((\d+)\))?$")
_CHAR = re.compile(r"^character(?:\((\d+)\))?$")


_UNCONSTRAINED = (1000, 0)  # numeric without a typmod: up to 1000 digits, any scale (as wide as numeric gets)


def _numeric(type_name: str) -> tuple[int, int] | None:
    """(precision, scale) of a numeric type (unconstrained: _UNCONSTRAINED); None for another type."""
    m = _NUMERIC.match(type_name)
    if m is None:
        return None
    return _UNCONSTRAINED if m.group(1) is None else (int(m.group(1)), int(m.group(2)))


def widens(old: str, new: str) -> bool:
    """Whether every value of type `old` is a value of type `new`, written the same (so the target
    can take the source's ALTER COLUMN TYPE without a USING expression, and nothing is lost). The type
    to itself (modulo quoting) widens too."""
    old, new = normalize_type(old), normalize_type(new)
    if old == new:
        return True
    while old.endswith("[]") and new.endswith("[]"):
        old, new = old[:-2], new[:-2]
    target = _numeric(new)
    if old in _INT_DIGITS:
        if new in _INT_DIGITS:
            return _INT_DIGITS[new] >= _INT_DIGITS[old]
        return target is not None and (target == _UNCONSTRAINED or target[0] - target[1] >= _INT_DIGITS[old])
    source = _numeric(old)
    if source is not None:
        if target is None or source == _UNCONSTRAINED:
            return False
        if target == _UNCONSTRAINED:
            return True
        (p, s), (p2, s2) = source, target
        return s2 >= s and p2 - s2 >= p - s
    if (m := _VARCHAR.match(old)) is not None:
        if new == "text":
            return True
        m2 = _VARCHAR.match(new)
        if m2 is None:
            return False
        return m2.group(1) is None or (m.group(1) is not None and int(m2.group(1)) >= int(m.group(1)))
    if _CHAR.match(old) is not None:
        return new == "text"
    return old == "real" and new == "double precision"


# --- DDL ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One statement of a schema change, and the log line saying what it did."""

    statement: sql.Composable
    done: str


@dataclass
class Ddl:
    steps: list[Step] = field(default_factory=list)
    # columns added whose values for the rows the target holds the stream does not carry, and the
    # source will not send by itself: a snapshot of the table is to be asked for
    snapshot: list[str] = field(default_factory=list)


def ddl_for(
    event: SchemaEvent, table: TableName, columns: Mapping[str, str], key: Sequence[str], mode: str
) -> Ddl:
    """The statements that give the target table (`columns`: name -> type, its primary key `key`)
    the event's change, in the event's order (renamed, retyped, dropped, added); SinkError (one line)
    for what the sink does not apply."""
    ident = sql.Identifier(table.schema, table.name)
    have = dict(columns)
    ddl = Ddl()
    for old, new in event.renamed:
        if old in have and new not in have:
            ddl.steps.append(
                Step(
                    sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}").format(
                        ident, sql.Identifier(old), sql.Identifier(new)
                    ),
                    f"renamed column {quote_if_needed(old)} of {table} to {quote_if_needed(new)}, as on the source",
                )
            )
            have = {new if n == old else n: t for n, t in have.items()}
        elif old in have and new in have:
            o, n = quote_if_needed(old), quote_if_needed(new)
            raise SinkError(
                f"the source renamed column {o} of {table} to {n}, but the target has both columns (a sink "
                f"without --schema-changes added {n} as a column of its own): drop it on the target (ALTER "
                f"TABLE {table} DROP COLUMN {n}), restart the sink, which renames {o}, and run "
                f"`cdc-source snapshot --tables {table}` for the rows changed since the rename"
            )
        # else: done already (only the new name exists), or neither exists (nothing to rename)
    for name, _, new_type in event.retyped:
        current = have.get(name)
        if current is None or normalize_type(current) == normalize_type(new_type):
            continue
        if not widens(current, new_type):
            raise SinkError(type_change_line(table, name, current, new_type))
        ddl.steps.append(
            Step(
                sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}").format(
                    ident, sql.Identifier(name), checked_type(new_type, table, name)
                ),
                f"changed the type of column {quote_if_needed(name)} of {table} from {current} to {new_type}, "
                "as on the source",
            )
        )
        have[name] = new_type
    for name in event.dropped:
        if name not in have:
            continue
        if mode == "drop":
            ddl.steps.append(
                Step(
                    sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(ident, sql.Identifier(name)),
                    f"dropped column {quote_if_needed(name)} of {table}, as on the source (--schema-changes drop)",
                )
            )
            del have[name]
            continue
        if name in key:
            raise SinkError(
                f"column {quote_if_needed(name)} of {table}, part of the target's primary key, was dropped on "
                "the source: give the target table the source's new primary key, then restart the sink"
            )
        ddl.steps.append(
            Step(
                sql.SQL("ALTER TABLE {0} ALTER COLUMN {1} DROP NOT NULL, ALTER COLUMN {1} DROP DEFAULT").format(
                    ident, sql.Identifier(name)
                ),
                f"column {quote_if_needed(name)} of {table} was dropped on the source: kept on the target, "
                "without its NOT NULL and default (--schema-changes keep)",
            )
        )
    for added in event.added:
        type_sql = checked_type(added.type, table, added.name)
        c = quote_if_needed(added.name)
        current = have.get(added.name)
        if current is not None:
            if normalize_type(current) != normalize_type(added.type):
                raise SinkError(
                    f"column {c} was added to {table} on the source as {added.type}, but the target has a column "
                    f"{c} of type {current} (kept after a DROP COLUMN with --schema-changes keep, or made by hand): "
                    f"rename or drop it on the target (ALTER TABLE {table} RENAME COLUMN {c} TO {c}_old), then "
                    "restart the sink"
                )
            if added.missing is not None:  # e.g. created from the events' new shape, without the default
                ddl.steps.append(
                    Step(
                        sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET{}").format(
                            ident, sql.Identifier(added.name), value_default(added.missing, type_sql)
                        ),
                        f"column {c} of {table}, added on the source, exists on the target already: gave it the "
                        "value the source's rows got at its ADD COLUMN as its default",
                    )
                )
            continue
        not_null = added.not_null and added.missing is not None
        ddl.steps.append(
            Step(
                sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}{}{}").format(
                    ident,
                    sql.Identifier(added.name),
                    type_sql,
                    sql.SQL(" NOT NULL" if not_null else ""),
                    value_default(added.missing, type_sql),
                ),
                f"added column {added.name} {added.type} to {table}{_add_note(added, event.rewritten)}",
            )
        )
        have[added.name] = added.type
        if added.missing is None and not event.rewritten and (added.default is not None or added.not_null):
            ddl.snapshot.append(added.name)
    return ddl


def _add_note(added: Added, rewritten: bool) -> str:
    if added.missing is not None:
        fill = ColumnFill(added.name, added.type, added.not_null, added.missing, added.default)
        return fill_note(Fill.VALUE, fill)
    if added.default is None and not added.not_null:
        return ""
    if rewritten:
        return ", nullable: the source re-reads the table it rewrote, which gives the rows their values"
    return ", nullable: a snapshot of the table gives the rows their values"


# --- translating older changes ----------------------------------------------------------------------


def translate(change: Change, events: Iterable[SchemaEvent], drop: bool) -> Change:
    """`change` as it reads after `events` (newer than it, in their order): a copy with its columns
    renamed and retyped, and dropped ones left out when `drop`."""
    row = change.row
    columns = change.columns
    key_columns = change.key_columns
    unchanged = change.unchanged
    key_renamed = False
    for event in events:
        if event.renamed:
            names = dict(event.renamed)
            if row is not None:
                row = {names.get(k, k): v for k, v in row.items()}
            if columns is not None:
                columns = {names.get(k, k): v for k, v in columns.items()}
            if key_columns is not None and any(k in names for k in key_columns):
                key_columns = [names.get(k, k) for k in key_columns]
                key_renamed = True
            if unchanged is not None:
                unchanged = [names.get(k, k) for k in unchanged]
        if event.retyped and columns is not None:
            columns = dict(columns)
            for name, _, new_type in event.retyped:
                if name in columns:
                    columns[name] = new_type
        if drop and event.dropped:
            gone = set(event.dropped)
            if row is not None:
                row = {k: v for k, v in row.items() if k not in gone}
            if columns is not None:
                columns = {k: v for k, v in columns.items() if k not in gone}
            if unchanged is not None:
                unchanged = [k for k in unchanged if k not in gone] or None
    translated = dataclasses.replace(
        change, row=row, columns=columns, key_columns=key_columns, unchanged=unchanged
    )
    if key_renamed and row is not None and key_columns is not None and all(k in row for k in key_columns):
        translated.key = codec.encode_key(row, key_columns)
    return translated


class TableShapes:
    """The schema changes applied to one table (and those a batch applies), for translating the
    changes older than them."""

    def __init__(self, events: Iterable[SchemaEvent], drop: bool) -> None:
        self.events = sorted(events, key=lambda e: (e.stream, e.position))
        self.drop = drop
        self.latest: dict[str, Position] = {}
        retired: set[str] = set()
        for e in self.events:
            self.latest[e.stream] = max(self.latest.get(e.stream, e.position), e.position)
            retired.update(old for old, _ in e.renamed)
            retired.update(name for name, _, _ in e.retyped)
            if drop:
                retired.update(e.dropped)
        self.retired = frozenset(retired)

    def translate(self, change: Change) -> Change:
        """The change in the table's current shape (itself when it is already)."""
        if change.commit_lsn is None or change.seq is None:
            return change
        stream = change.stream or ""
        latest = self.latest.get(stream)
        here = (change.commit_lsn, change.seq)
        if latest is None or here >= latest:
            return change
        names = change.columns if change.columns is not None else change.row
        if names is None or self.retired.isdisjoint(names):
            return change
        later = [e for e in self.events if e.stream == stream and e.position > here]
        return translate(change, later, self.drop)
