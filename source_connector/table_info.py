"""What the source connector knows of a table: columns, types, key, replica identity. Pure."""

from dataclasses import dataclass, field

import orjson

from pg_kafka_cdc.common.tables import TableName
from schemas.values import typed_columns

DECIMAL_TYPES = ("numeric", "real", "double precision")

REPLICA_IDENTITY = {"d": "DEFAULT", "f": "FULL", "i": "USING INDEX", "n": "NOTHING"}


def wal2json_type(catalog_type: str) -> str:
    """The type name as wal2json prints it: a quoted name loses its quotes (`"Mood"` -> `Mood`),
    except arrays (`"Mood"[]` stays)."""
    if catalog_type.startswith('"') and not catalog_type.endswith("]"):
        return catalog_type[1:-1]
    return catalog_type


def is_decimal(type_name: str) -> bool:
    return type_name in ("real", "double precision") or type_name == "numeric" or type_name.startswith("numeric(")


@dataclass
class TableInfo:
    name: TableName
    topic: str
    columns: tuple[str, ...]
    types: dict[str, str]
    key: tuple[str, ...]
    replica_identity: str  # d, f, i or n (pg_class.relreplident)
    not_null: frozenset[str] = frozenset()
    key_from_pk: bool = True
    # Each column's attnum (pg_attribute), in column order: kept by a rename, never reused after a
    # drop. Empty: 1, 2, 3... (a table read without them).
    attnums: tuple[int, ...] = ()
    relfilenode: int = 0  # the table's storage when this shape was read (0: unknown)
    # derived, for the hot path
    wal2json_types: list[str] = field(init=False)
    last_attnum: int = field(init=False)  # the last column's attnum: see EventBuilder.row
    columns_json: orjson.Fragment = field(init=False)
    key_json: orjson.Fragment = field(init=False)
    integer_columns: frozenset[str] = field(init=False)
    boolean_columns: frozenset[str] = field(init=False)
    nan_columns: tuple[str, ...] = field(init=False)
    label: str = field(init=False)  # `schema.table` for logs and metrics

    def __post_init__(self) -> None:
        self.label = str(self.name)
        if not self.attnums:
            self.attnums = tuple(range(1, len(self.columns) + 1))
        if len(self.attnums) != len(self.columns):
            raise ValueError(f"{self.name}: {len(self.columns)} columns but {len(self.attnums)} attnums")
        self.last_attnum = self.attnums[-1] if self.attnums else 0
        self.wal2json_types = [wal2json_type(self.types[c]) for c in self.columns]
        self.columns_json = orjson.Fragment(orjson.dumps({c: self.types[c] for c in self.columns}))
        self.key_json = orjson.Fragment(orjson.dumps(list(self.key)))
        self.integer_columns, self.boolean_columns = typed_columns({c: self.types[c] for c in self.columns})
        self.nan_columns = tuple(c for c in self.columns if c in self.not_null and is_decimal(self.types[c]))

    @property
    def full_identity(self) -> bool:
        return self.replica_identity == "f"

    @property
    def shape(self) -> list[tuple[int, str, str]]:
        """(attnum, name, type as wal2json prints it) of each column, in attnum order."""
        return list(zip(self.attnums, self.columns, self.wal2json_types, strict=True))


def key_problem(table: TableName, key: tuple[str, ...], has_pk: bool, replica_identity: str) -> str | None:
    """Why the table cannot be replicated exactly, with the fix; None when it can."""
    ident = str(table)
    if not key:
        return (
            f"table {ident} has no primary key: wal2json would drop its updates and deletes silently. "
            f"Add one (ALTER TABLE {ident} ADD PRIMARY KEY (...)), or make a unique index on NOT NULL columns "
            f"its replica identity (ALTER TABLE {ident} REPLICA IDENTITY USING INDEX ...), which then serves as the key"
        )
    if replica_identity == "n":
        return (
            f"table {ident} has REPLICA IDENTITY NOTHING: its updates and deletes carry no key. "
            f"Fix: ALTER TABLE {ident} REPLICA IDENTITY DEFAULT"
        )
    if has_pk and replica_identity == "i":
        return (
            f"table {ident} has a primary key but its replica identity is another index, so key changes "
            f"cannot be followed. Fix: ALTER TABLE {ident} REPLICA IDENTITY DEFAULT (or FULL)"
        )
    return None
