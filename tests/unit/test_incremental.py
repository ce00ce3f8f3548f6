"""Snapshots taken while streaming (source_connector/incremental.py): the watermark window, what is
published at the high watermark, and the progress kept for a restart."""

from typing import Any

import orjson

from pg_kafka_cdc.common.catalog import Attribute, TableNow
from pg_kafka_cdc.common.lsn import int_to_lsn
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from schemas.signals import SNAPSHOT_PREFIX, snapshot_request
from source_connector.events import EventBuilder, Message
from source_connector.flush import FlushTracker, Transaction
from source_connector.incremental import Chunk, Incremental, Request, chunk_query, stream_columns
from source_connector.table_info import TableInfo

ITEMS = TableName("public", "items")
INFO = TableInfo(ITEMS, "p.public.items", ("id", "v"), {"id": "integer", "v": "text"}, ("id",), "d")


class FakeCursor:
    def __init__(self, conn: "FakeConn") -> None:
        self.conn = conn
        self.result: Any = None

    def __enter__(self) -> "FakeCursor":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def execute(self, query: Any, params: Any = None) -> None:
        if params is not None and params[0] == SNAPSHOT_PREFIX:
            self.conn.lsn += 16
            self.conn.emitted.append((self.conn.lsn, orjson.loads(params[1])))
            self.result = [(int_to_lsn(self.conn.lsn),)]
        elif params == (ITEMS.schema, ITEMS.name):  # catalog.table_now: not a table of this fake
            self.result = [None]
        else:
            self.result = self.conn.chunks.pop(0)

    def fetchone(self) -> Any:
        return self.result[0]

    def fetchall(self) -> Any:
        return self.result


class FakeConn:
    def __init__(self, chunks: list[list[tuple[str, str]]]) -> None:
        self.chunks = chunks
        self.emitted: list[tuple[int, dict[str, Any]]] = []
        self.lsn = 1000

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)


class FakeSession:
    def __init__(self, conn: FakeConn) -> None:
        self.conn = conn

    def run(self, work: Any) -> Any:
        return work(self.conn)


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[Transaction, Message]] = []
        self.stop = StopFlag()

    def publish(self, tx: Transaction, message: Message) -> None:
        tx.outstanding += 1
        self.sent.append((tx, message))


def rig(
    chunks: list[list[tuple[str, str]]], chunk_rows: int = 2
) -> tuple[Incremental, FakeConn, FakePublisher, list[Any]]:
    conn = FakeConn(chunks)
    publisher = FakePublisher()
    tracker = FlushTracker(0)
    builder = EventBuilder("p", "db", "slot", lambda s, n, r: INFO, lambda topic: 2)
    recorded: list[Any] = []
    incremental = Incremental(
        "slot",
        FakeSession(conn),  # type: ignore[arg-type]
        builder,
        publisher,  # type: ignore[arg-type]
        lambda: tracker,
        lambda table: INFO if table == ITEMS else None,
        lambda pending, done: recorded.append(([r.encode() for r in pending], list(done))),
        chunk_rows,
    )
    return incremental, conn, publisher, recorded


def marks(incremental: Incremental, conn: FakeConn, between: list[Message] = ()) -> None:  # type: ignore[assignment]
    """The stream reads the last chunk's two watermarks, with `between` changes in the window."""
    (low_lsn, low), (high_lsn, high) = conn.emitted[-2:]
    incremental.message({"prefix": SNAPSHOT_PREFIX, "content": orjson.dumps(low).decode()}, low_lsn)
    if incremental.window is not None:
        incremental.window.saw(list(between))
    incremental.message({"prefix": SNAPSHOT_PREFIX, "content": orjson.dumps(high).decode()}, high_lsn)


def ack(publisher: FakePublisher) -> None:
    for tx, _ in publisher.sent:
        tx.outstanding = 0


def values(publisher: FakePublisher) -> list[Any]:
    return [orjson.loads(m[2]) for _, m in publisher.sent if m[2] is not None]


def published_ids(publisher: FakePublisher) -> list[int]:
    return [v["after"]["id"] for v in values(publisher)]


def test_request_round_trip() -> None:
    for request in (Request(ITEMS), Request(ITEMS, ("5", None), True)):
        assert Request.decode(orjson.loads(orjson.dumps(request.encode()))) == request


def test_chunk_drops_the_keys_changed_between_the_watermarks() -> None:
    chunk = Chunk(Request(ITEMS), INFO, "t", {b'{"id":1}': {"id": 1}, b'{"id":2}': {"id": 2}}, ("2",), False)
    chunk.saw([("other.topic", b'{"id":1}', b"{}", None, None), (INFO.topic, b'{"id":2}', b"{}", None, None)])
    assert list(chunk.rows) == [b'{"id":1}'] and chunk.dropped == 1
    chunk.saw([(INFO.topic, None, b"{}", 0, None)])  # a truncate: nothing read before it stands
    assert chunk.rows == {}


def test_chunks_are_published_at_their_high_watermark_and_progress_follows_the_acks() -> None:
    incremental, conn, publisher, recorded = rig([[("1", "a"), ("2", "b")], [("3", "c")]])
    incremental.request(Request(ITEMS))
    incremental.step()
    assert [m["mark"] for _, m in conn.emitted] == ["low", "high"]
    incremental.step()
    assert len(conn.emitted) == 2  # one chunk at a time
    changed = EventBuilder.key(INFO, {"id": 2})
    marks(incremental, conn, [(INFO.topic, changed, b"{}", None, None)])
    assert published_ids(publisher) == [1]  # id 2 changed in the window: its own event stands
    high_lsn = conn.emitted[1][0]
    source = values(publisher)[0]["source"]
    assert source["commit_lsn"] == high_lsn - 1 and source["lsn"] == high_lsn and source["snapshot"] is True
    incremental.step()  # not acknowledged yet: nothing recorded; the next chunk is read
    assert recorded == []
    assert len(conn.emitted) == 4
    ack(publisher)
    marks(incremental, conn)
    incremental.step()
    assert recorded[-1] == ([["public", "items", ["2"], False]], [])  # the last chunk is not acknowledged
    ack(publisher)
    incremental.step()
    # both chunks acknowledged: the table is done
    assert recorded[-1] == ([], [ITEMS])
    assert published_ids(publisher) == [1, 3]
    assert not incremental.active


def test_a_restart_goes_on_from_the_first_chunk_not_acknowledged() -> None:
    incremental, conn, publisher, recorded = rig([[("1", "a"), ("2", "b")], [("3", "c"), ("4", "d")], []])
    incremental.request(Request(ITEMS, None, True))
    incremental.step()
    marks(incremental, conn)
    # the truncate first (both partitions), then the rows
    assert [v["op"] for v in values(publisher)] == ["t", "t", "r", "r"]
    ack(publisher)
    incremental.step()  # chunk 1 acknowledged, chunk 2 read
    assert recorded[-1] == ([["public", "items", ["2"], False]], [])
    marks(incremental, conn)
    incremental.step()  # chunk 2 published, not acknowledged: progress stays after chunk 1
    assert incremental.published
    incremental._record([])
    assert recorded[-1] == ([["public", "items", ["2"], False]], [])


def test_a_reset_reads_the_chunk_again_and_old_watermarks_are_ignored() -> None:
    incremental, conn, publisher, _ = rig([[("1", "a")], [("1", "a")]])
    incremental.request(Request(ITEMS))
    incremental.step()
    stale = conn.emitted[:]
    incremental.reset()
    incremental.step()
    _, (high_lsn, high) = stale
    incremental.message({"prefix": SNAPSHOT_PREFIX, "content": orjson.dumps(high).decode()}, high_lsn)
    assert publisher.sent == []  # the high watermark of the chunk given up on
    marks(incremental, conn)
    assert published_ids(publisher) == [1]


def test_a_request_for_another_slot_or_an_unknown_table_is_ignored() -> None:
    incremental, _, _, recorded = rig([])
    other = snapshot_request("other_slot", [ITEMS])
    incremental.message({"prefix": SNAPSHOT_PREFIX, "content": other}, 10)
    unknown = snapshot_request("slot", [TableName("public", "nope")])
    incremental.message({"prefix": SNAPSHOT_PREFIX, "content": unknown}, 20)
    assert not incremental.queue and recorded == []
    incremental.message({"prefix": SNAPSHOT_PREFIX, "content": snapshot_request("slot", [ITEMS])}, 30)
    assert [r.table for r in incremental.queue] == [ITEMS] and recorded


def _now(*attributes: tuple[int, str, bool]) -> TableNow:
    return TableNow(
        1,
        1,
        "d",
        True,
        (1,),
        {n: Attribute(n, name, "text", False, dropped, None, None) for n, name, dropped in attributes},
    )


def test_a_chunk_reads_the_streams_columns_under_the_names_the_catalog_has_now() -> None:
    shape = TableInfo(
        ITEMS, "p.public.items", ("id", "v", "w"), {"id": "integer", "v": "text", "w": "text"}, ("id",), "d"
    )
    assert stream_columns(shape, _now((1, "id", False), (2, "v", False), (3, "w", False))) is None
    assert stream_columns(shape, None) is None
    # renamed and dropped since, a column added since: the stream's shape, read by attnum
    renamed = _now(
        (1, "id", False), (2, "title", False), (3, "........pg.dropped.3........", True), (4, "x", False)
    )
    names = stream_columns(shape, renamed)
    assert names == {"id": "id", "v": "title"}
    text = repr(chunk_query(shape, ("5",), 10, names))
    assert "Identifier('title')" in text and "Identifier('w')" not in text and "Identifier('x')" not in text
