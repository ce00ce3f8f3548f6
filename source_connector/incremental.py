"""Snapshots taken while streaming: a table added to the scope, or one asked for with `cdc-source
snapshot`, is read in chunks in key order while every table's changes keep streaming (the watermark
method of Debezium's incremental snapshots and Netflix's DBLog).

For each chunk the connector writes a low watermark to the WAL (a non-transactional logical
message), reads the next rows in key order, and writes a high watermark. The stream hands both over
in WAL order. A change of the table between the two may be newer than the read, so its key is
dropped from the chunk; at the high watermark the rest of the chunk is published as `r` events at
the watermark's position. Each row so published is the row's value at that position: a change
committed before the low watermark is in the read, one committed after the high watermark is not
and comes after it in the topic, and the keys changed in between are left to their own events.

Progress (the last key of the last chunk Kafka acknowledged) goes into the connector's state
record, so a restart goes on from there; a chunk read but not acknowledged is read again. A table
whose topic holds messages from before (it was replicated earlier, then left out) starts with a
`t`, so that a consumer replaying the topic drops what came before the snapshot.
"""

import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from psycopg2 import sql

from pg_kafka_cdc.common.catalog import TableNow, table_exists, table_now
from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.lsn import int_to_lsn, lsn_to_int
from pg_kafka_cdc.common.pg import connect_source
from pg_kafka_cdc.common.tables import TableName
from schemas.signals import SNAPSHOT_PREFIX, snapshot_request
from schemas.values import output_text
from source_connector.events import EventBuilder, Message, snapshot_context, snapshot_values
from source_connector.flush import FlushTracker, Transaction
from source_connector.publisher import Publisher
from source_connector.session import SourceSession
from source_connector.slot import get_slot
from source_connector.table_info import TableInfo

log = logging.getLogger("source.incremental")

CHUNK_ROWS = 4096
PROGRESS_LOG_INTERVAL = 5.0  # seconds between two progress lines of one table

Key = tuple[str | None, ...]  # a row's key columns as text, in key order


@dataclass(frozen=True)
class Request:
    """A table to snapshot, from the row after `after` (None: from the start)."""

    table: TableName
    after: Key | None = None
    truncate: bool = False  # a `t` first: the topic holds messages from before

    def encode(self) -> list[Any]:
        return [
            self.table.schema,
            self.table.name,
            None if self.after is None else list(self.after),
            self.truncate,
        ]

    @classmethod
    def decode(cls, item: Sequence[Any]) -> "Request":
        schema, name, after, truncate = item
        return cls(TableName(schema, name), None if after is None else tuple(after), bool(truncate))


def ask_for_snapshot(dsn: str, slot: str, tables: Sequence[TableName]) -> int:
    """`cdc-source snapshot`: write the request to the WAL, for the connector of `slot`; its LSN."""
    conn = connect_source(dsn, application_name="cdc-source snapshot")
    try:
        found = get_slot(conn, slot)
        if found is None:
            raise ConfigError(
                f"there is no replication slot {slot} on the source: name the running connector's slot "
                "with --slot (or SOURCE_SLOT)"
            )
        for table in tables:
            if not table_exists(conn, table):
                raise ConfigError(f"table {table} does not exist on the source (check --tables)")
        return emit(conn, snapshot_request(slot, list(tables)))
    finally:
        conn.close()


def watermark_content(slot: str, token: str, mark: str) -> str:
    return orjson.dumps({"slot": slot, "token": token, "mark": mark}).decode()


def emit(conn: Any, content: str) -> int:
    """Write a snapshot message to the WAL now (not at a commit); its LSN."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_logical_emit_message(false, %s, %s)::text", (SNAPSHOT_PREFIX, content))
        [lsn] = cur.fetchone()
    return lsn_to_int(lsn)


def chunk_query(
    info: TableInfo, after: Key | None, limit: int, names: dict[str, str] | None = None
) -> sql.Composable:
    """The next `limit` rows in key order after the key `after`, read as text. `names`: the
    catalog's name now of each column of the shape the stream is at (see stream_columns); the
    values come under the stream's names."""
    now = names if names is not None else {c: c for c in info.columns}
    key = sql.SQL(", ").join(sql.Identifier(now[k]) for k in info.key)
    where: sql.Composable = sql.SQL("")
    if after is not None:
        # Literals, not parameters: output_text() holds a '%s' of its own.
        where = sql.SQL(" WHERE ({}) > ({})").format(
            key,
            sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(info.types[k]))
                for k, v in zip(info.key, after, strict=True)
            ),
        )
    return sql.SQL("SELECT {} FROM {}{} ORDER BY {} LIMIT {}").format(
        sql.SQL(", ").join(output_text(now[c], info.types[c]) for c in info.columns if c in now),
        sql.Identifier(info.name.schema, info.name.name),
        where,
        key,
        sql.Literal(limit),
    )


def stream_columns(info: TableInfo, current: TableNow | None) -> dict[str, str] | None:
    """The catalog's name now of each column of the stream's shape, by attnum; a column dropped
    since is left out (the catalog may be ahead of the stream: a DDL the stream has not reached
    yet). None when the names are the same, or the table cannot be read."""
    if current is None:
        return None
    names = {a.attnum: a.name for a in current.attributes.values() if not a.dropped}
    now = {c: names[n] for c, n in zip(info.columns, info.attnums, strict=True) if n in names}
    if len(now) == len(info.columns) and all(c == n for c, n in now.items()):
        return None
    if any(k not in now for k in info.key):
        return None  # a key column dropped: the read fails and says so
    return now


@dataclass
class Chunk:
    """Rows read between two watermarks, by message key, waiting for the high watermark."""

    request: Request
    info: TableInfo
    token: str
    rows: dict[bytes, dict[str, Any]]
    last: Key | None  # the key of the last row read (None: nothing read)
    final: bool  # fewer rows than asked for: the table ends with this chunk
    open: bool = False  # the low watermark went by
    dropped: int = 0

    def saw(self, messages: list[Message]) -> None:
        """Changes read between the watermarks: their keys are left to them."""
        for topic, key, _, _, _ in messages:
            if topic != self.info.topic:
                continue
            if key is None:  # a TRUNCATE: nothing read before it stands
                self.dropped += len(self.rows)
                self.rows.clear()
            elif self.rows.pop(key, None) is not None:
                self.dropped += 1


@dataclass
class Published:
    """A chunk handed to the producer: its progress counts once Kafka acknowledged it."""

    tx: Transaction
    started: Request  # the request as it was before this chunk: where a restart goes on from
    final: bool

    @property
    def acknowledged(self) -> bool:
        return self.tx.committed and self.tx.outstanding == 0


@dataclass
class TableProgress:
    started: float = field(default_factory=time.monotonic)
    rows: int = 0
    logged: float = field(default_factory=time.monotonic)


# (requests still to do, tables whose snapshot completed) -> recorded in the connector's state
Progress = Callable[[list[Request], list[TableName]], None]
Lookup = Callable[[TableName], TableInfo | None]


class Incremental:
    def __init__(
        self,
        slot: str,
        session: SourceSession,
        builder: EventBuilder,
        publisher: Publisher,
        tracker: Callable[[], FlushTracker],
        lookup: Lookup,
        progress: Progress,
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.slot = slot
        self.session = session
        self.builder = builder
        self.publisher = publisher
        self.tracker = tracker
        self.lookup = lookup
        self.progress = progress
        self.chunk_rows = chunk_rows
        self.queue: deque[Request] = deque()
        self.chunk: Chunk | None = None  # read, its high watermark not seen yet
        self.window: Chunk | None = None  # between its watermarks: the stream reports changes to it
        self.published: deque[Published] = deque()
        self.tables: dict[TableName, TableProgress] = {}
        self.rows: Counter[str] = Counter()  # `r` events published, by table, for the metrics
        self.dropped = 0  # rows left out of chunks because a change of theirs came between the watermarks
        self.busy = False

    # --- requests ---------------------------------------------------------------------------------

    def request(self, request: Request) -> bool:
        """Queue a snapshot; False when the table is queued already."""
        if any(r.table == request.table for r in self.queue):
            return False
        self.queue.append(request)
        self.tables.setdefault(request.table, TableProgress())
        return True

    @property
    def active(self) -> bool:
        return bool(self.queue or self.published)

    def reset(self) -> None:
        """The stream restarts from the confirmed position: a chunk not yet published is read again."""
        self.chunk = self.window = None

    # --- the stream's side --------------------------------------------------------------------------

    def message(self, doc: dict[str, Any], lsn: int) -> None:
        """A logical message with SNAPSHOT_PREFIX, read from the stream at `lsn`."""
        try:
            content = orjson.loads(doc.get("content") or "null")
        except orjson.JSONDecodeError:
            content = None
        tracker = self.tracker()
        if not isinstance(content, dict) or content.get("slot") != self.slot:
            tracker.point(lsn)
            return
        if "snapshot" in content:
            tracker.point(lsn)
            self._asked(content["snapshot"], lsn)
            return
        chunk = self.chunk
        if chunk is None or content.get("token") != chunk.token:
            tracker.point(lsn)  # a watermark of a chunk given up on (an earlier run, a reconnect)
            return
        if content.get("mark") == "low":
            chunk.open = True
            self.window = chunk
            if chunk.request.truncate and chunk.request.after is None:
                tx = tracker.begin(None, lsn)
                ctx = snapshot_context(lsn)
                doc = {"schema": chunk.info.name.schema, "table": chunk.info.name.name, "lsn": int_to_lsn(lsn)}
                for message in self.builder.truncate(doc, ctx):
                    self.publisher.publish(tx, message)
                tracker.commit(tx)
                self.queue[0] = replace(self.queue[0], truncate=False)  # once, even if the chunk is read again
            else:
                tracker.point(lsn)
            return
        self.window = self.chunk = None
        self.busy = True  # a full producer queue runs the stream's housekeeping: no chunk read meanwhile
        try:
            self._publish(chunk, tracker, lsn)
        finally:
            self.busy = False

    def _asked(self, tables: Any, lsn: int) -> None:
        for item in tables if isinstance(tables, list) else []:
            table = TableName(*item)
            if self.lookup(table) is None:
                log.warning(
                    "a snapshot of %s was asked for at %s, but this connector does not replicate it: ignored",
                    table,
                    int_to_lsn(lsn),
                    extra={"table": str(table)},
                )
            elif self.request(Request(table)):
                log.info(
                    "snapshot of %s asked for at %s: reading it while streaming goes on", table, int_to_lsn(lsn)
                )
                self._record([])
            else:
                log.info("snapshot of %s asked for at %s: it is under way already", table, int_to_lsn(lsn))

    def _publish(self, chunk: Chunk, tracker: FlushTracker, lsn: int) -> None:
        info = chunk.info
        tx = tracker.begin(None, lsn)
        ctx = snapshot_context(lsn)
        snapshot_row, publish = self.builder.snapshot_row, self.publisher.publish
        for values in chunk.rows.values():
            publish(tx, snapshot_row(info, values, ctx, lsn))
        tracker.commit(tx)
        self.rows[info.label] += len(chunk.rows)
        self.dropped += chunk.dropped
        self.tables.setdefault(info.name, TableProgress()).rows += len(chunk.rows)
        self.queue.popleft()
        if not chunk.final:
            self.queue.appendleft(replace(chunk.request, after=chunk.last, truncate=False))
        self.published.append(Published(tx, chunk.request, chunk.final))

    # --- the connector's side ---------------------------------------------------------------------

    def step(self) -> None:
        """Between two reads of the stream: record what Kafka acknowledged, read the next chunk."""
        self.acknowledged()
        if self.busy or self.chunk is not None or not self.queue or self.publisher.stop:
            return
        request = self.queue[0]
        info = self.lookup(request.table)
        if info is None:
            self.queue.popleft()
            log.warning("%s is no longer replicated: its snapshot is given up", request.table)
            self._record([])
            return
        self.chunk = self.session.run(lambda conn: self._read(conn, request, info))

    def _read(self, conn: Any, request: Request, info: TableInfo) -> Chunk:
        token = uuid.uuid4().hex
        names = stream_columns(info, table_now(conn, info.name))
        read = info.columns if names is None else tuple(c for c in info.columns if c in names)
        emit(conn, watermark_content(self.slot, token, "low"))
        with conn.cursor() as cur:
            cur.execute(chunk_query(info, request.after, self.chunk_rows, names))
            texts = cur.fetchall()
        emit(conn, watermark_content(self.slot, token, "high"))
        rows: dict[bytes, dict[str, Any]] = {}
        positions = [read.index(k) for k in info.key]
        last: Key | None = request.after
        for row in texts:
            values = snapshot_values(info, read, row)
            rows[self.builder.key(info, values)] = values
            last = tuple(row[i] for i in positions)
        return Chunk(request, info, token, rows, last, len(texts) < self.chunk_rows)

    def acknowledged(self) -> None:
        """Record the progress of the chunks Kafka acknowledged."""
        done: list[TableName] = []
        moved = False
        while self.published and self.published[0].acknowledged:
            item = self.published.popleft()
            moved = True
            if item.final:
                done.append(item.started.table)
                self._finished(item.started.table)
        if moved:
            self._record(done)

    def _finished(self, table: TableName) -> None:
        progress = self.tables.pop(table, TableProgress())
        log.info(
            "snapshot of %s done: %d rows in %.1f s while streaming",
            table,
            progress.rows,
            time.monotonic() - progress.started,
            extra={"table": str(table)},
        )

    def _record(self, done: list[TableName]) -> None:
        """The state to keep: what is still to do, from the last acknowledged key on."""
        pending: dict[TableName, Request] = {}
        for item in self.published:  # published, not acknowledged: from where that chunk started
            pending.setdefault(item.started.table, item.started)
        for request in self.queue:
            pending.setdefault(request.table, request)
        self.progress(list(pending.values()), done)
        now = time.monotonic()
        for table, progress in self.tables.items():
            if now - progress.logged >= PROGRESS_LOG_INTERVAL:
                progress.logged = now
                log.info("snapshot of %s: %d rows so far", table, progress.rows, extra={"table": str(table)})
