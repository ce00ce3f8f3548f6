"""The change event: a Debezium-style envelope, one per row change, serialized as JSON.

Values in `before` and `after` are exact: PostgreSQL's own text output of the value as a JSON string,
except smallint/integer/bigint/oid (JSON integers, exact to 64 bits), boolean (JSON true/false) and
NULL (null). numeric, real and double precision are strings, so no digit is ever lost.

`columns` maps each column of the table to its type as PostgreSQL prints it (`numeric(12,2)`,
`timestamp with time zone`, `text[]`), so a consumer can create or check the table.
`unchanged` (updates only) lists columns whose value did not change and is not carried (large
TOASTed values): a consumer must leave them as they are, never set them to NULL.

A delete's tombstone (same key, null value) carries the delete's position in a `cdc.source` header,
the JSON object `{"txId", "lsn", "commit_lsn", "ts_us", "seq"}` of the `d` event's `source`, so a
consumer that skips changes a snapshot already holds can skip the tombstone with its delete.

Positions: (commit_lsn, seq, rank) strictly increases along a topic's partition within one `stream`,
where the rank orders the messages one change gives: a schema change before it (-1), a delete (0),
its tombstone (1), then an insert, update, snapshot read or truncate (2). The source never publishes a position twice, also
after a crash. `stream` names the change stream the position belongs to: the source server's system
identifier, the slot, and the LSN at which the slot was created (`stream_id`); a slot dropped and
created again, or another server, is another stream, whose positions are not comparable.

A schema change (op `s`) of a table is one event on every partition of its topic, like a truncate
(null key, `before` and `after` null, `partitions` the topic's partition count), just before the
first change with the new shape, in that change's transaction, at that change's `seq` (rank -1, so
the changes' seqs do not depend on whether a reading of the stream showed the shape change). `columns` and
`key` are the new shape; `schema_change` says what changed since the shape the source published
before (apply in this order: renamed, retyped by new name, dropped, added). The source detects it
from the stream (each column's attnum, as wal2json's include-column-positions gives it), so a DDL
reaches the topic with the table's next insert or update, not at the DDL.

schemas/codec.py writes and reads these bytes: the source encodes with it, the sink decodes with it.
"""

from typing import Literal, NotRequired, TypedDict

ENVELOPE_VERSION = "1"
CONNECTOR = "cdc-source"

Op = Literal["c", "u", "d", "r", "t", "s"]
OPS: frozenset[str] = frozenset({"c", "u", "d", "r", "t", "s"})
UPSERT_OPS: frozenset[str] = frozenset({"c", "u", "r"})

Value = str | int | bool | None
Row = dict[str, Value]


class Source(TypedDict):
    """Where and when the change happened."""

    version: str
    connector: str
    name: str  # topic prefix: the logical name of the source
    db: str
    schema: str
    table: str
    slot: str | None
    lsn: (
        int | None
    )  # LSN of the change itself (snapshot: the slot's consistent point or the chunk's high watermark)
    # LSN of its transaction's commit record (snapshot: `lsn` - 1, so a transaction committing right
    # at `lsn` orders after it)
    commit_lsn: int | None
    txId: int | None
    ts_ms: int | None  # commit time, milliseconds since the epoch
    ts_us: int | None  # commit time, microseconds since the epoch
    seq: int  # position of the change in its transaction (snapshot: in the table's snapshot)
    snapshot: bool
    stream: NotRequired[str]  # see stream_id (absent in topics written before it was added)


def stream_id(system_id: str, slot: str, created_lsn: int) -> str:
    """The change stream of a slot: `<system identifier>:<slot>:<LSN the slot was created at, hex>`."""
    return f"{system_id}:{slot}:{created_lsn:X}"


TOMBSTONE_HEADER = "cdc.source"


class TombstoneSource(TypedDict):
    """The `cdc.source` header of a tombstone: where its delete happened."""

    txId: int | None
    lsn: int | None
    commit_lsn: int | None
    ts_us: int | None
    seq: NotRequired[int]  # the delete's seq (absent in topics written before it was added)
    stream: NotRequired[str]


# "from" is a keyword: the functional form of TypedDict
Renamed = TypedDict("Renamed", {"from": str, "to": str})
Retyped = TypedDict("Retyped", {"name": str, "from": str, "to": str})


class AddedColumn(TypedDict):
    name: str
    type: str  # as format_type prints it
    not_null: bool
    default: str | None  # the default expression (pg_get_expr), None without one
    # What rows older than the ADD COLUMN read (pg_attribute.attmissingval, the fast default), as the
    # type's output function prints it; None when none (no default, or the table was rewritten).
    missing: str | None


class SchemaChange(TypedDict):
    """What an `s` event changes: every key always present (empty lists, false)."""

    renamed: list[Renamed]
    retyped: list[Retyped]  # `name` is the new name; `from`, `to` types as format_type prints them
    dropped: list[str]  # old names
    added: list[AddedColumn]
    # The table's storage was rewritten since the previous shape (relfilenode changed): rows no event
    # carries may hold other values; the source then snapshots the table while streaming.
    rewritten: bool


class Envelope(TypedDict):
    """The value of a change message."""

    before: Row | None
    after: Row | None
    op: Op
    ts_ms: int  # when the connector produced the event
    source: Source
    columns: dict[str, str]
    key: list[str]
    unchanged: NotRequired[list[str]]
    refetched: NotRequired[list[str]]  # key change only: read back from the table (see the JSON Schema)
    partitions: NotRequired[int]  # TRUNCATE and schema change only: the topic's partition count when it was sent
    schema_change: NotRequired[SchemaChange]  # op `s` only
