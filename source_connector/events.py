"""From decoded wal2json messages to Kafka messages (topic, key, value, partition, headers). Pure.

One message per row change, keyed by the primary key:
- insert -> `c`; update -> `u`; delete -> `d` followed by a tombstone (same key, no value, the
  delete's position in its `cdc.source` header);
- an update that changes the key -> `d` + tombstone for the old key, then `c` for the new key;
- an update that omits unchanged TOASTed columns -> completed from the old row under REPLICA
  IDENTITY FULL, otherwise the event lists them in `unchanged` (never sent as null);
- truncate -> one `t` event on every partition of the table's topic, so it is ordered with the
  other changes of every key;
- an insert or update whose columns differ from the table's shape (by attnum: see shapes.py) ->
  one `s` event on every partition first, at the seq of the change and rank -1, then the change
  with the new shape;
- a change wal2json reports under a partition's name is published as the table the lookup returns
  (the root); a TRUNCATE of a partition only as part of its root's (see truncate()).

Every message of a change carries its transaction (`source.txId`, `source.commit_lsn`,
`source.stream`; a tombstone in its header); with transaction metadata, the END record of the
transaction counts each of them in its topic: the row events, the tombstones, and the `t` and `s`
events on every partition (see transactions.py). Snapshot reads (`r`) belong to no transaction.
"""

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from pg_kafka_cdc.common.catalog import TableNow
from pg_kafka_cdc.common.lsn import lsn_to_int
from pg_kafka_cdc.common.tables import TableName
from schemas.codec import Columns, encode, encode_key, encode_tombstone
from schemas.envelope import (
    CONNECTOR,
    ENVELOPE_VERSION,
    TOMBSTONE_HEADER,
    Op,
    SchemaChange,
    Source,
    TombstoneSource,
)
from schemas.values import json_row
from source_connector.row_match import HEAD, RowShape
from source_connector.shapes import ShapeDiff, compare, next_info, schema_change
from source_connector.table_info import TableInfo, wal2json_type
from source_connector.wal2json import timestamp_to_us

Headers = list[tuple[str, bytes]]
# (topic, key, value, partition, headers); value None is a tombstone, partition None lets the key
# decide; headers are None except on tombstones.
Message = tuple[str, bytes | None, bytes | None, int | None, Headers | None]

TableLookup = Callable[[str, str, bool], TableInfo | None]  # (schema, table, refresh) -> info
# (the table the partition is replicated as, the partition) of a TRUNCATE that is not published
SkippedTruncate = Callable[[TableInfo, TableName], None]
# (table, key values, columns) -> those columns' current values in the table, or None (row gone)
Refetch = Callable[[TableInfo, dict[str, Any], list[str], int | None], dict[str, Any] | None]
# The catalog's facts of a table now, by attnum (None: gone); the new shape after a schema change is
# remembered with `remember`; `on_schema_change` is told (old, new, change, the commit LSN of its
# transaction) once its event is built.
ReadNow = Callable[[TableName, int | None], TableNow | None]  # (table, the change's xid)
SchemaChanged = Callable[[TableInfo, TableInfo, SchemaChange, int | None], None]


class TxContext:
    """What every event of one transaction shares."""

    __slots__ = ("commit_lsn", "seq", "source_part", "ts_ms", "ts_us", "xid")

    def __init__(self, xid: int | None, commit_lsn: int | None, ts_us: int | None) -> None:
        self.xid = xid
        self.commit_lsn = commit_lsn
        self.ts_us = ts_us
        self.ts_ms = None if ts_us is None else ts_us // 1000
        self.seq = 0
        # The transaction's fields of `source`, as JSON (see Envelopes): `"commit_lsn":..,"ts_us":..,`
        self.source_part = b'"commit_lsn":%s,"txId":%s,"ts_ms":%s,"ts_us":%s,' % (
            orjson.dumps(commit_lsn),
            orjson.dumps(xid),
            orjson.dumps(self.ts_ms),
            orjson.dumps(ts_us),
        )


def snapshot_context(lsn: int) -> TxContext:
    """The context of snapshot events read at WAL position `lsn` (the slot's consistent point, or a
    high watermark): their position's commit LSN is `lsn - 1`. A transaction streamed after them
    may commit exactly at `lsn` (the next WAL record), and its changes, at seq 1, 2, ..., must come
    after every snapshot row in the partitions' order, never at or before one of them; everything
    streamed before them committed below `lsn - 1` (a WAL record is longer than one byte)."""
    return TxContext(None, lsn - 1, int(time.time() * 1_000_000))


def begin_context(doc: dict[str, Any]) -> TxContext:
    """The context of a transaction from its wal2json `B` message."""
    return TxContext(doc.get("xid"), lsn_to_int(doc["lsn"]), timestamp_to_us(doc["timestamp"]))


class Envelopes:
    """The value of an event without extras (no `unchanged`, `refetched`, `partitions` or
    `schema_change`) filled into a template of its table, op and stream: the bytes
    schemas.codec.encode gives for it, at a fraction of the cost. Templates are kept per table
    definition (a new TableInfo after a schema change gets new ones)."""

    def __init__(self, builder: "EventBuilder") -> None:
        self.builder = builder
        self.templates: dict[tuple[int, str, bool, str], tuple[TableInfo, bytes]] = {}

    def template(self, info: TableInfo, op: Op, snapshot: bool) -> bytes:
        builder = self.builder
        key = (id(info), op, snapshot, builder.stream)
        found = self.templates.get(key)
        if found is not None and found[0] is info:
            return found[1]
        if len(self.templates) > 4096:
            self.templates.clear()
        constant: dict[str, object] = {
            "version": ENVELOPE_VERSION,
            "connector": CONNECTOR,
            "name": builder.prefix,
            "db": builder.database,
            "schema": info.name.schema,
            "table": info.name.name,
            "slot": builder.slot,
        }
        head = orjson.dumps(constant)[:-1].replace(b"%", b"%%")
        tail = orjson.dumps({"snapshot": snapshot, "stream": builder.stream})[1:].replace(b"%", b"%%")
        rest = orjson.dumps({"columns": info.columns_json, "key": info.key_json})[1:].replace(b"%", b"%%")
        template = b"".join(
            (
                b'{"before":%s,"after":%s,"op":',
                orjson.dumps(op),
                b',"ts_ms":%d,"source":',
                head,
                b',"lsn":%d,%s"seq":%d,',
                tail,
                b",",
                rest,
            )
        )
        self.templates[key] = (info, template)
        return template


class EventBuilder:
    def __init__(
        self,
        prefix: str,
        database: str,
        slot: str | None,
        tables: TableLookup,
        partitions: Callable[[str], int],
        on_nan: Callable[[TableInfo, str], None] = lambda info, column: None,
        refetch: Refetch | None = None,
        on_partition_truncate: SkippedTruncate = lambda info, partition: None,
        table_now: ReadNow = lambda table, xid: None,
        remember: Callable[[TableInfo], None] = lambda info: None,
        on_schema_change: SchemaChanged = lambda old, new, change, lsn: None,
    ) -> None:
        self.prefix = prefix
        self.database = database
        self.slot = slot
        self.tables = tables
        self.partitions = partitions
        self.on_nan = on_nan
        self.refetch = refetch
        self.on_partition_truncate = on_partition_truncate
        self.table_now = table_now
        self.remember = remember
        self.on_schema_change = on_schema_change
        # The catalog read last, for the transaction it was read in: the updates of one transaction
        # that leave out TOASTed columns ask it once whether those columns are dropped.
        self._now: tuple[tuple[TableName, int | None, int | None], TableNow | None] | None = None
        self.truncated: tuple[int | None, int, str] | None = None  # (commit LSN, LSN, topic) of the last `t`
        self.events: Counter[tuple[str, str]] = Counter()  # by table and op, for the metrics
        self.bytes: Counter[str] = Counter()
        self.stream = ""  # schemas.envelope.stream_id of the slot, once the connector knows it
        self.envelopes = Envelopes(self)
        self.numbers_as_strings = False  # wal2json's numeric-data-types-as-string (see row_match.py)
        self.row_shapes: dict[tuple[int, bool], RowShape] = {}
        self.last_shape: RowShape | None = None

    # --- envelope -------------------------------------------------------------------------

    def _value(
        self,
        info: TableInfo,
        op: Op,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        tx: TxContext,
        lsn: int | None,
        columns: Columns,
        snapshot: bool = False,
        unchanged: list[str] | None = None,
        refetched: list[str] | None = None,
        partitions: int | None = None,
        change: SchemaChange | None = None,
    ) -> bytes:
        if (
            columns is info.columns_json
            and lsn is not None
            and not unchanged
            and not refetched
            and partitions is None
            and change is None
        ):
            return self._encoded(
                info,
                op,
                b"null" if before is None else orjson.dumps(before),
                b"null" if after is None else orjson.dumps(after),
                tx,
                lsn,
                snapshot,
            )
        source: Source = {
            "version": ENVELOPE_VERSION,
            "connector": CONNECTOR,
            "name": self.prefix,
            "db": self.database,
            "schema": info.name.schema,
            "table": info.name.name,
            "slot": self.slot,
            "lsn": lsn,
            "commit_lsn": tx.commit_lsn,
            "txId": tx.xid,
            "ts_ms": tx.ts_ms,
            "ts_us": tx.ts_us,
            "seq": tx.seq,
            "snapshot": snapshot,
            "stream": self.stream,
        }
        value = encode(
            before,
            after,
            op,
            int(time.time() * 1000),
            source,
            columns,
            info.key_json,
            unchanged,
            refetched,
            partitions,
            change,
        )
        self.events[(info.label, op)] += 1
        self.bytes[info.label] += len(value)
        return value

    def _encoded(
        self, info: TableInfo, op: Op, before: bytes, after: bytes, tx: TxContext, lsn: int, snapshot: bool = False
    ) -> bytes:
        """The value of an event without extras, its rows given as JSON."""
        value = self.envelopes.template(info, op, snapshot) % (
            before,
            after,
            int(time.time() * 1000),
            lsn,
            tx.source_part,
            tx.seq,
        )
        self.events[(info.label, op)] += 1
        self.bytes[info.label] += len(value)
        return value

    @staticmethod
    def key(info: TableInfo, row: dict[str, Any]) -> bytes:
        """The message key: the key columns as a JSON object, in key order."""
        return encode_key(row, info.key)

    # --- row changes ------------------------------------------------------------------------

    def row_payload(self, payload: bytes, tx: TxContext) -> list[Message] | None:
        """The messages of a wal2json I, U or D message whose table has the shape it had last, read
        without decoding it (see row_match.py); None: it needs decoding, then `row`."""
        action = payload[11:12]  # {"action":"I"
        shape = self.last_shape  # that of the last change read so: most often the same table's
        found = None if shape is None else shape.match(action, payload)
        if (
            found is None
            or shape is None
            or self.tables(shape.info.name.schema, shape.info.name.name, False) is not shape.info
        ):
            shape = self._row_shape(payload)
            found = None if shape is None else shape.match(action, payload)
            if found is None or shape is None:
                return None
            self.last_shape = shape
        info = shape.info
        lsn, after, before, key, old_key = found
        if old_key is not None and old_key != key:
            return None  # a key change: a delete and a create (see _update)
        tx.seq += 1
        if action == b"I":
            return [(info.topic, key, self._encoded(info, "c", b"null", after or b"null", tx, lsn), None, None)]
        if action == b"U":
            value = self._encoded(info, "u", before or b"null", after or b"null", tx, lsn)
            return [(info.topic, key, value, None, None)]
        return self._deleted(info, before or b"null", key, tx, lsn)

    def _row_shape(self, payload: bytes) -> RowShape | None:
        """The patterns of the shape the message's table has now (None: a table not published under
        its own name, or one whose name needs escapes)."""
        head = HEAD.match(payload)
        if head is None:
            return None
        try:
            schema, table = head[4].decode(), head[5].decode()
        except UnicodeDecodeError:
            return None
        info = self.tables(schema, table, False)
        if info is None or info.name.name != table or info.name.schema != schema:
            return None
        cache_key = (id(info), self.numbers_as_strings)
        found = self.row_shapes.get(cache_key)
        if found is None or found.info is not info:
            if len(self.row_shapes) > 4096:
                self.row_shapes.clear()
            found = self.row_shapes[cache_key] = RowShape(info, self.numbers_as_strings)
        return found

    def wal2json_numbers(self, as_strings: bool) -> None:
        """Whether wal2json prints every number as a string (numeric-data-types-as-string)."""
        if as_strings != self.numbers_as_strings:
            self.numbers_as_strings = as_strings
            self.last_shape = None

    def row(self, doc: dict[str, Any], tx: TxContext) -> list[Message]:
        """The messages for one wal2json I, U or D message (an `s` event on every partition first
        when an I or U shows that the table's shape changed)."""
        info = self.tables(doc["schema"], doc["table"], False)
        if info is None:
            return []
        action = doc["action"]
        lsn = lsn_to_int(doc["lsn"])
        if action == "D":
            before = {c["name"]: c["value"] for c in doc["identity"]}
            if not all(k in before for k in info.key) and doc["table"] == info.name.name:
                # A key column renamed since the shape was read, and no insert or update told yet:
                # identity entries carry no positions, so the catalog's shape is taken for it.
                info, shown = self._catalog_shape(info, tx, lsn)
                tx.seq += 1
                return [*shown, *self._delete(info, before, tx, lsn)]
            tx.seq += 1
            return self._delete(info, before, tx, lsn)
        carried = doc["columns"]
        after = {c["name"]: c["value"] for c in carried}
        columns: Columns = info.columns_json
        unchanged: list[str] = []
        changed: list[Message] = []
        # The fast path: same names and types in the same order, and the same last attnum. Columns
        # are listed in attnum order and a new column gets an attnum above every earlier one, so
        # with equal names and the same last attnum the attnums are the same (a column dropped and
        # added again under its name has a new, higher, attnum).
        if (
            tuple(after) != info.columns
            or [c["type"] for c in carried] != info.wal2json_types
            or carried[-1]["position"] != info.last_attnum
        ):
            identity = doc.get("identity") if action == "U" else None
            if doc["table"] == info.name.name and doc["schema"] == info.name.schema:
                info, changed = self._shape(info, carried, action == "I", tx, lsn)
                info, columns, unchanged = self._irregular(info, carried, after, identity, False)
            else:  # a partition's change, published as its root: attnums are the partition's own
                info, columns, unchanged = self._irregular(info, carried, after, identity, True)
        tx.seq += 1
        if info.nan_columns:
            self._check_nan(info, after)
        if action == "I":
            created: Message = (
                info.topic,
                self.key(info, after),
                self._value(info, "c", None, after, tx, lsn, columns),
                None,
                None,
            )
            return [*changed, created] if changed else [created]
        before = {c["name"]: c["value"] for c in doc.get("identity", ())}
        updated = self._update(info, before, after, columns, unchanged, tx, lsn)
        return [*changed, *updated] if changed else updated

    # --- schema changes -----------------------------------------------------------------------

    def _shape(
        self, info: TableInfo, carried: list[dict[str, Any]], insert: bool, tx: TxContext, lsn: int
    ) -> tuple[TableInfo, list[Message]]:
        """The table's shape after this message, and the `s` event on every partition when it changed."""
        message = [(c["position"], c["name"], c["type"]) for c in carried]
        read: list[TableNow | None] = []

        def now() -> TableNow | None:
            if not read:
                read.append(self._catalog_now(info.name, tx))
            return read[0]

        def dropped(attnums: list[int]) -> list[int]:
            found = now()
            if found is None:  # gone from the catalog: nothing to tell a drop from TOAST by
                return []
            return [a for a in attnums if a not in found.attributes or found.attributes[a].dropped]

        diff = compare(info.shape, message, insert, dropped)
        if diff is None:
            return info, []
        return self._changed(info, diff, now(), tx, lsn)

    def _catalog_shape(self, info: TableInfo, tx: TxContext, lsn: int) -> tuple[TableInfo, list[Message]]:
        """The shape change a delete shows (its key named otherwise), by the catalog's shape now."""
        facts = self._catalog_now(info.name, tx)
        if facts is None:
            return info, []
        message = [(a.attnum, a.name, wal2json_type(a.type)) for a in facts.attributes.values() if not a.dropped]
        diff = compare(info.shape, sorted(message), True, lambda attnums: attnums)
        if diff is None:
            return info, []
        return self._changed(info, diff, facts, tx, lsn)

    def _changed(
        self, info: TableInfo, diff: ShapeDiff, facts: TableNow | None, tx: TxContext, lsn: int
    ) -> tuple[TableInfo, list[Message]]:
        new = next_info(info, diff.shape, facts)
        change = schema_change(info, new, diff, facts)
        self.remember(new)
        # The event takes the seq of the change it precedes, at rank -1 (schemas.codec.RANKS): the
        # seqs of the changes stay what they are when the stream is read again after a restart,
        # whether or not that reading shows the shape change again.
        tx.seq += 1
        count = self.partitions(new.topic)
        value = self._value(new, "s", None, None, tx, lsn, new.columns_json, partitions=count, change=change)
        tx.seq -= 1
        self.on_schema_change(info, new, change, tx.commit_lsn)
        return new, [(new.topic, None, value, p, None) for p in range(count)]

    def _catalog_now(self, table: TableName, tx: TxContext) -> TableNow | None:
        """The catalog's facts of the table, read once per transaction and table."""
        key = (table, tx.xid, tx.commit_lsn)
        if self._now is None or self._now[0] != key:
            self._now = (key, self.table_now(table, tx.xid))
        return self._now[1]

    def _update(
        self,
        info: TableInfo,
        before: dict[str, Any],
        after: dict[str, Any],
        columns: Columns,
        unchanged: list[str],
        tx: TxContext,
        lsn: int,
    ) -> list[Message]:
        if unchanged and any(k in unchanged for k in info.key):
            # A key column stored out of line and left unchanged: the old key (identity) holds it.
            for k in info.key:
                if k not in after and k in before:
                    after[k] = before[k]
            unchanged = [c for c in unchanged if c not in after]
        new_key = self.key(info, after)
        if before and all(k in before for k in info.key):
            old_key = self.key(info, before)
            if old_key != new_key:
                missing, refetched = self._read_back(info, after, unchanged, tx) if unchanged else (None, None)
                created = self._value(info, "c", None, after, tx, lsn, columns, False, missing, refetched)
                return [*self._delete(info, before, tx, lsn, old_key), (info.topic, new_key, created, None, None)]
        value = self._value(info, "u", before or None, after, tx, lsn, columns, unchanged=unchanged)
        return [(info.topic, new_key, value, None, None)]

    def _read_back(
        self, info: TableInfo, after: dict[str, Any], unchanged: list[str], tx: TxContext
    ) -> tuple[list[str] | None, list[str] | None]:
        """A key change's new row has no old row to leave the unchanged columns alone in: read them
        back from the table (the row's current value, which any later change of the key corrects);
        when the row is gone already, say they are not carried. (unchanged, refetched) of the event."""
        values = (
            None
            if self.refetch is None
            else self.refetch(info, {k: after[k] for k in info.key}, unchanged, tx.xid)
        )
        if values is None:
            return unchanged, None
        after.update(values)
        return None, unchanged

    def _delete(
        self, info: TableInfo, before: dict[str, Any], tx: TxContext, lsn: int, key: bytes | None = None
    ) -> list[Message]:
        return self._deleted(
            info, orjson.dumps(before), key if key is not None else self.key(info, before), tx, lsn
        )

    def _deleted(self, info: TableInfo, before: bytes, key: bytes, tx: TxContext, lsn: int) -> list[Message]:
        """A `d` event of the old row `before` (as JSON), then its tombstone."""
        value = self._encoded(info, "d", before, b"null", tx, lsn)
        position: TombstoneSource = {
            "txId": tx.xid,
            "lsn": lsn,
            "commit_lsn": tx.commit_lsn,
            "ts_us": tx.ts_us,
            "seq": tx.seq,
            "stream": self.stream,
        }
        return [
            (info.topic, key, value, None, None),
            (info.topic, key, None, None, [(TOMBSTONE_HEADER, encode_tombstone(position))]),
        ]

    def _irregular(
        self,
        info: TableInfo,
        carried: list[dict[str, Any]],
        after: dict[str, Any],
        identity: list[dict[str, Any]] | None,
        refresh: bool,
    ) -> tuple[TableInfo, Columns, list[str]]:
        """The slow path: unchanged TOAST columns left out, or (`refresh`: a partition's change) the
        table changed since it was read."""
        message_types = {c["name"]: c["type"] for c in carried}
        if refresh and any(
            n not in info.types or wal2json_type(info.types[n]) != t for n, t in message_types.items()
        ):
            info = self.tables(info.name.schema, info.name.name, True) or info
        unchanged = [n for n in info.columns if n not in after]
        if unchanged and identity is not None and info.full_identity:
            old = {c["name"]: c for c in identity}
            for n in unchanged:
                if n in old:
                    after[n] = old[n]["value"]
                    message_types[n] = old[n]["type"]
            unchanged = [n for n in unchanged if n not in after]
        columns = dict(info.types)
        for n, t in message_types.items():
            if n not in columns or wal2json_type(columns[n]) != t:
                columns[n] = t
        return info, orjson.Fragment(orjson.dumps(columns)), unchanged if identity is not None else []

    def _check_nan(self, info: TableInfo, row: dict[str, Any]) -> None:
        for n in info.nan_columns:
            if n in row and row[n] is None:
                self.on_nan(info, n)

    # --- truncate ---------------------------------------------------------------------------

    def truncate(self, doc: dict[str, Any], tx: TxContext) -> list[Message]:
        """A `t` event on every partition of the table's topic.

        A TRUNCATE of a partitioned table is reported for the table first, then for each partition,
        all at one LSN: the partitions' are covered by the table's. A partition truncated on its own
        is not published, as with publish_via_partition_root: a `t` would empty the whole target
        table, and the rows to delete are not known; the callback reports it."""
        info = self.tables(doc["schema"], doc["table"], False)
        if info is None:
            return []
        lsn = lsn_to_int(doc["lsn"])
        if doc["table"] != info.name.name or doc["schema"] != info.name.schema:
            if self.truncated != (tx.commit_lsn, lsn, info.topic):
                self.on_partition_truncate(info, TableName(doc["schema"], doc["table"]))
            return []
        tx.seq += 1
        self.truncated = (tx.commit_lsn, lsn, info.topic)
        count = self.partitions(info.topic)
        value = self._value(info, "t", None, None, tx, lsn, info.columns_json, partitions=count)
        return [(info.topic, None, value, p, None) for p in range(count)]

    # --- snapshot ---------------------------------------------------------------------------

    def snapshot_row(self, info: TableInfo, row: dict[str, Any], tx: TxContext, lsn: int) -> Message:
        """An `r` event for a row read by the initial snapshot (values already converted)."""
        tx.seq += 1
        if info.nan_columns:
            self._check_nan(info, row)
        value = self._value(info, "r", None, row, tx, lsn, info.columns_json, snapshot=True)
        return (info.topic, self.key(info, row), value, None, None)


def snapshot_values(info: TableInfo, names: tuple[str, ...], texts: tuple[str | None, ...]) -> dict[str, Any]:
    """A row read as text (schemas.values.output_text) in the form wal2json gives: integers and booleans typed."""
    return json_row(names, texts, info.integer_columns, info.boolean_columns)
