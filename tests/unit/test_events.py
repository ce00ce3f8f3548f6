"""EventBuilder: decoded wal2json messages to Kafka messages, checked against the envelope schema."""

import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import schemas
from pg_kafka_cdc.common.catalog import Attribute, TableNow
from pg_kafka_cdc.common.lsn import lsn_to_int
from pg_kafka_cdc.common.tables import TableName
from schemas.codec import decode
from schemas.envelope import CONNECTOR, ENVELOPE_VERSION, SchemaChange, stream_id
from schemas.topics import topic_for
from source_connector.events import EventBuilder, Message, TxContext, begin_context, snapshot_values
from source_connector.table_info import TableInfo, key_problem, wal2json_type
from source_connector.wal2json import Decoder, timestamp_to_us
from tests.unit.wal2json_messages import TIMESTAMP, Column, bare, begin, bytea, change, text, truncate

PREFIX = "cdc"
SCHEMA = json.loads((Path(schemas.__file__).parent / "envelope.schema.json").read_text())
VALIDATOR = Draft202012Validator(SCHEMA)
DECODER = Decoder()
BIG = "x" * 5000
COMMIT_LSN = "0/1927B78"


def table(
    name: str = "probe",
    columns: Iterable[tuple[str, str]] = (("id", "bigint"), ("n", "numeric(12,2)"), ("big", "text")),
    key: tuple[str, ...] = ("id",),
    replica_identity: str = "d",
    not_null: frozenset[str] = frozenset(),
    schema: str = "public",
) -> TableInfo:
    cols = dict(columns)
    tn = TableName(schema, name)
    return TableInfo(
        name=tn,
        topic=topic_for(PREFIX, tn),
        columns=tuple(cols),
        types=cols,
        key=key,
        replica_identity=replica_identity,
        not_null=not_null,
    )


class FakeTables:
    """The catalog as the builder sees it; `refreshed` is what a re-read of the catalog returns,
    `now` its facts by attnum (no entry: the table is gone); `changes` the schema changes told."""

    def __init__(self, *infos: TableInfo) -> None:
        self.infos = {(i.name.schema, i.name.name): i for i in infos}
        self.refreshed: dict[tuple[str, str], TableInfo] = {}
        self.calls: list[tuple[str, str, bool]] = []
        self.now: dict[TableName, TableNow] = {}
        self.now_calls = 0
        self.changes: list[tuple[TableInfo, TableInfo, SchemaChange]] = []

    def table_now(self, table: TableName, xid: int | None = None) -> TableNow | None:
        self.now_calls += 1
        return self.now.get(table)

    def remember(self, info: TableInfo) -> None:
        self.infos[(info.name.schema, info.name.name)] = info

    def changed(self, old: TableInfo, new: TableInfo, change: SchemaChange, lsn: int | None) -> None:
        self.changes.append((old, new, change))

    def __call__(self, schema: str, name: str, refresh: bool) -> TableInfo | None:
        self.calls.append((schema, name, refresh))
        if refresh and (schema, name) in self.refreshed:
            self.infos[(schema, name)] = self.refreshed.pop((schema, name))
        return self.infos.get((schema, name))


class Nans:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, info: TableInfo, column: str) -> None:
        self.seen.append((str(info.name), column))


def builder(*infos: TableInfo, partitions: int = 3, nans: Nans | None = None) -> tuple[EventBuilder, FakeTables]:
    tables = FakeTables(*(infos or (table(),)))
    b = EventBuilder(
        PREFIX,
        "shop",
        "cdc_slot",
        tables,
        lambda topic: partitions,
        on_nan=nans if nans is not None else Nans(),
        table_now=tables.table_now,
        remember=tables.remember,
        on_schema_change=tables.changed,
    )
    b.stream = stream_id("7431", "cdc_slot", 0x1927000)
    return b, tables


def tx() -> TxContext:
    return begin_context(DECODER.decode(begin()))


def row(b: EventBuilder, payload: bytes, ctx: TxContext | None = None) -> list[Message]:
    return b.row(DECODER.decode(payload), ctx if ctx is not None else tx())


def envelope(value: bytes | None) -> dict[str, Any]:
    """The event value, after checking it against schemas/envelope.schema.json."""
    assert value is not None
    env: dict[str, Any] = orjson.loads(value)
    errors = sorted(str(e) for e in VALIDATOR.iter_errors(env))
    assert not errors, errors
    return env


def envelopes(messages: list[Message]) -> list[dict[str, Any]]:
    return [envelope(value) for _, _, value, _, _ in messages]


def cols(id_: int, n: str | None = "1.50", big: str | None = BIG, *, with_big: bool = True) -> list[Column]:
    out: list[Column] = [("id", "bigint", bare(id_)), ("n", "numeric(12,2)", bare(n))]
    if with_big:
        out.append(("big", "text", text(big)))
    return out


def test_the_schema_itself_is_valid() -> None:
    Draft202012Validator.check_schema(SCHEMA)


# --- inserts ------------------------------------------------------------------------------------


def test_insert_is_one_create_keyed_by_the_primary_key() -> None:
    b, _ = builder()
    messages = row(b, change("I", columns=cols(1, "12345678901.25")))
    assert len(messages) == 1
    topic, key, value, partition, headers = messages[0]
    assert topic == "cdc.public.probe"
    assert key == b'{"id":1}'
    assert partition is None and headers is None
    env = envelope(value)
    assert env["op"] == "c"
    assert env["before"] is None
    assert env["after"] == {"id": 1, "n": "12345678901.25", "big": BIG}
    assert env["columns"] == {"id": "bigint", "n": "numeric(12,2)", "big": "text"}
    assert env["key"] == ["id"]
    assert "unchanged" not in env


def test_two_column_key_keeps_key_order() -> None:
    info = table(columns=(("a", "integer"), ("b", "text"), ("v", "text")), key=("b", "a"))
    b, _ = builder(info)
    [(_, key, value, _, _)] = row(
        b,
        change(
            "I",
            columns=[("a", "integer", bare(7)), ("b", "text", text("x")), ("v", "text", text("y"))],
            pk=[("b", "text"), ("a", "integer")],
        ),
    )
    assert key == b'{"b":"x","a":7}'
    assert envelope(value)["key"] == ["b", "a"]


def test_key_values_keep_their_types() -> None:
    info = table(columns=(("k", "numeric(30,5)"), ("b", "bytea"), ("v", "text")), key=("k", "b"))
    b, _ = builder(info)
    [(_, key, _, _, _)] = row(
        b,
        change(
            "I",
            columns=[
                ("k", "numeric(30,5)", bare("1234567890123456789.12345")),
                ("b", "bytea", bytea("00")),
                ("v", "text", text("")),
            ],
        ),
    )
    assert key == b'{"k":"1234567890123456789.12345","b":"\\\\x00"}'


def test_unknown_table_gives_nothing() -> None:
    b, tables = builder()
    ctx = tx()
    assert row(b, change("I", columns=cols(1), table="other"), ctx) == []
    assert ctx.seq == 0
    assert tables.calls == [("public", "other", False)]


# --- source fields ------------------------------------------------------------------------------


def test_source_fields() -> None:
    b, _ = builder()
    ctx = tx()
    first = envelope(row(b, change("I", columns=cols(1), lsn="0/1927000"), ctx)[0][2])
    second = envelope(row(b, change("I", columns=cols(2), lsn="0/1927100"), ctx)[0][2])
    source = first["source"]
    assert source == {
        "version": ENVELOPE_VERSION,
        "connector": CONNECTOR,
        "name": PREFIX,
        "db": "shop",
        "schema": "public",
        "table": "probe",
        "slot": "cdc_slot",
        "lsn": lsn_to_int("0/1927000"),
        "commit_lsn": lsn_to_int(COMMIT_LSN),
        "txId": 730,
        "ts_ms": timestamp_to_us(TIMESTAMP) // 1000,
        "ts_us": timestamp_to_us(TIMESTAMP),
        "seq": 1,
        "snapshot": False,
        "stream": "7431:cdc_slot:1927000",
    }
    assert second["source"]["seq"] == 2
    assert second["source"]["lsn"] == lsn_to_int("0/1927100")
    assert first["ts_ms"] > 1_700_000_000_000  # when the connector produced it


def test_begin_context() -> None:
    ctx = tx()
    assert ctx.xid == 730
    assert ctx.commit_lsn == lsn_to_int(COMMIT_LSN)
    assert ctx.ts_us == timestamp_to_us(TIMESTAMP) == 1795617797816235
    assert ctx.ts_ms == 1795617797816
    assert ctx.seq == 0


def test_seq_increases_over_every_kind_of_change() -> None:
    b, _ = builder()
    ctx = tx()
    seqs: list[int] = []
    for payload in (
        change("I", columns=cols(1)),
        change("U", columns=cols(1, "2.00"), identity=[("id", "bigint", bare(1))]),
        change("U", columns=cols(5), identity=[("id", "bigint", bare(1))]),
        change("D", identity=[("id", "bigint", bare(5))]),
    ):
        seqs.append(max(envelope(v)["source"]["seq"] for _, _, v, _, _ in row(b, payload, ctx) if v is not None))
    seqs.append(envelope(b.truncate(DECODER.decode(truncate()), ctx)[0][2])["source"]["seq"])
    assert seqs == [1, 2, 3, 4, 5]


# --- updates ------------------------------------------------------------------------------------


def test_update_with_same_key_is_u_with_identity_as_before() -> None:
    b, _ = builder()
    messages = row(b, change("U", columns=cols(1, "2.00"), identity=[("id", "bigint", bare(1))]))
    assert len(messages) == 1
    _, key, value, _, _ = messages[0]
    assert key == b'{"id":1}'
    env = envelope(value)
    assert env["op"] == "u"
    assert env["before"] == {"id": 1}
    assert env["after"] == {"id": 1, "n": "2.00", "big": BIG}
    assert "unchanged" not in env


def test_update_without_identity_has_null_before() -> None:
    b, _ = builder()
    env = envelope(row(b, change("U", columns=cols(1)))[0][2])
    assert env["op"] == "u"
    assert env["before"] is None


def test_update_under_full_identity_carries_the_old_row() -> None:
    b, _ = builder(table(replica_identity="f"))
    old = cols(1, "1.00", "old")
    env = envelope(row(b, change("U", columns=cols(1, "2.00", "new"), identity=old))[0][2])
    assert env["before"] == {"id": 1, "n": "1.00", "big": "old"}
    assert env["after"] == {"id": 1, "n": "2.00", "big": "new"}


def test_update_changing_the_key_is_delete_tombstone_create() -> None:
    b, _ = builder()
    messages = row(b, change("U", columns=cols(2), identity=[("id", "bigint", bare(1))]))
    assert [(k, v is None) for _, k, v, _, _ in messages] == [
        (b'{"id":1}', False),
        (b'{"id":1}', True),
        (b'{"id":2}', False),
    ]
    assert all(t == "cdc.public.probe" and p is None for t, _, _, p, _ in messages)
    d = envelope(messages[0][2])
    c = envelope(messages[2][2])
    assert (d["op"], d["before"], d["after"]) == ("d", {"id": 1}, None)
    assert (c["op"], c["before"], c["after"]) == ("c", None, {"id": 2, "n": "1.50", "big": BIG})
    assert d["source"]["seq"] == c["source"]["seq"] == 1


def test_update_changing_one_column_of_a_two_column_key() -> None:
    info = table(columns=(("a", "integer"), ("b", "integer"), ("v", "text")), key=("a", "b"))
    b, _ = builder(info)
    messages = row(
        b,
        change(
            "U",
            columns=[("a", "integer", bare(1)), ("b", "integer", bare(3)), ("v", "text", text("z"))],
            identity=[("a", "integer", bare(1)), ("b", "integer", bare(2))],
        ),
    )
    assert [k for _, k, _, _, _ in messages] == [b'{"a":1,"b":2}', b'{"a":1,"b":2}', b'{"a":1,"b":3}']


# --- deletes ------------------------------------------------------------------------------------


def test_delete_is_d_then_tombstone() -> None:
    b, _ = builder()
    messages = row(b, change("D", identity=[("id", "bigint", bare(1))]))
    assert len(messages) == 2
    (t1, k1, v1, p1, h1), (t2, k2, v2, p2, h2) = messages
    assert (t1, k1, p1) == (t2, k2, p2) == ("cdc.public.probe", b'{"id":1}', None)
    assert v2 is None and h1 is None
    env = envelope(v1)
    assert (env["op"], env["before"], env["after"]) == ("d", {"id": 1}, None)
    assert env["columns"] == {"id": "bigint", "n": "numeric(12,2)", "big": "text"}
    # the tombstone says where its delete happened, so a consumer can skip both together
    assert h2 is not None and [name for name, _ in h2] == ["cdc.source"]
    source = env["source"]
    assert orjson.loads(h2[0][1]) == {
        k: source[k] for k in ("txId", "lsn", "commit_lsn", "ts_us", "seq", "stream")
    }


def test_delete_under_full_identity_carries_the_old_row() -> None:
    b, _ = builder(table(replica_identity="f"))
    messages = row(b, change("D", identity=cols(4, None, "gone")))
    assert messages[0][1] == b'{"id":4}'
    assert envelope(messages[0][2])["before"] == {"id": 4, "n": None, "big": "gone"}


# --- unchanged TOAST columns --------------------------------------------------------------------


def test_update_without_a_toasted_column_lists_it_as_unchanged() -> None:
    b, _ = builder()
    messages = row(b, change("U", columns=cols(1, "3.00", with_big=False), identity=[("id", "bigint", bare(1))]))
    assert len(messages) == 1
    env = envelope(messages[0][2])
    assert env["op"] == "u"
    assert env["unchanged"] == ["big"]
    assert "big" not in env["after"]
    assert env["after"] == {"id": 1, "n": "3.00"}
    assert env["columns"] == {"id": "bigint", "n": "numeric(12,2)", "big": "text"}


def test_update_without_a_toasted_column_under_full_identity_is_completed() -> None:
    b, _ = builder(table(replica_identity="f"))
    messages = row(b, change("U", columns=cols(1, "3.00", with_big=False), identity=cols(1, "2.00", BIG)))
    env = envelope(messages[0][2])
    assert env["after"] == {"id": 1, "n": "3.00", "big": BIG}
    assert "unchanged" not in env
    assert env["before"] == {"id": 1, "n": "2.00", "big": BIG}


def test_full_identity_completes_only_what_identity_has() -> None:
    info = table(columns=(("id", "bigint"), ("a", "text"), ("b", "text")), replica_identity="f")
    b, _ = builder(info)
    env = envelope(
        row(
            b,
            change(
                "U",
                columns=[("id", "bigint", bare(1))],
                identity=[("id", "bigint", bare(1)), ("a", "text", text("A"))],
            ),
        )[0][2]
    )
    assert env["after"] == {"id": 1, "a": "A"}
    assert env["unchanged"] == ["b"]


def test_key_change_with_an_omitted_toast_column_does_not_lose_it() -> None:
    b, _ = builder()
    messages = row(b, change("U", columns=cols(2, "3.00", with_big=False), identity=[("id", "bigint", bare(1))]))
    created = [envelope(v) for _, _, v, _, _ in messages if v is not None and envelope(v)["op"] == "c"]
    assert len(created) == 1
    # not carried, and said so: the sink must not write it as NULL
    assert "big" not in created[0]["after"]
    assert created[0]["unchanged"] == ["big"]


def test_key_change_with_an_omitted_toast_column_reads_it_back() -> None:
    b, _ = builder()
    asked: list[tuple[dict[str, Any], list[str], int | None]] = []

    def refetch(
        info: TableInfo, key: dict[str, Any], columns: list[str], xid: int | None
    ) -> dict[str, Any] | None:
        asked.append((key, columns, xid))
        return {"big": "the big value"}

    b.refetch = refetch
    messages = row(b, change("U", columns=cols(2, "3.00", with_big=False), identity=[("id", "bigint", bare(1))]))
    created = [envelope(v) for _, _, v, _, _ in messages if v is not None and envelope(v)["op"] == "c"]
    assert asked == [({"id": 2}, ["big"], tx().xid)]
    assert created[0]["after"]["big"] == "the big value"
    assert created[0]["refetched"] == ["big"]
    assert "unchanged" not in created[0]


def test_update_with_an_omitted_toasted_key_column_uses_identity() -> None:
    info = table(columns=(("k", "text"), ("v", "integer")), key=("k",))
    b, _ = builder(info)
    long_key = "k" * 3000
    messages = row(
        b,
        change(
            "U",
            columns=[("v", "integer", bare(2), 2)],
            identity=[("k", "text", text(long_key))],
            pk=[("k", "text")],
        ),
    )
    assert [k for _, k, _, _, _ in messages] == [orjson.dumps({"k": long_key})]
    env = envelope(messages[0][2])
    assert env["after"] == {"v": 2, "k": long_key}
    assert "unchanged" not in env


# --- the table changed since it was read ----------------------------------------------------------


def now_of(
    info: TableInfo,
    relfilenode: int = 0,
    extra: Iterable[Attribute] = (),
    dropped: Iterable[int] = (),
) -> TableNow:
    """The catalog's facts as they would be for `info`, with `extra` attributes and `dropped` attnums."""
    gone = set(dropped)
    attributes = {
        a: Attribute(a, c, info.types[c], c in info.not_null, False, None, None)
        for a, c in zip(info.attnums, info.columns, strict=True)
    }
    for a in gone:
        attributes[a] = Attribute(a, f"........pg.dropped.{a}........", "-", False, True, None, None)
    for attr in extra:
        attributes[attr.attnum] = attr
    by_name = dict(zip(info.columns, info.attnums, strict=True))
    return TableNow(
        1,
        relfilenode or info.relfilenode,
        info.replica_identity,
        True,
        tuple(by_name[k] for k in info.key),
        attributes,
    )


def schema_events(messages: list[Message]) -> list[dict[str, Any]]:
    return [envelope(v) for _, k, v, _, _ in messages if k is None]


def test_an_added_column_is_a_schema_change_on_every_partition_before_the_insert() -> None:
    b, tables = builder(table())
    tables.now[TableName("public", "probe")] = now_of(
        table(), extra=[Attribute(4, "added", "date", True, False, "2026-01-01", "'2026-01-01'::date")]
    )
    ctx = tx()
    messages = row(b, change("I", columns=[*cols(1), ("added", "date", text("2026-11-25"))]), ctx)
    assert [(p, k) for _, k, _, p, _ in messages] == [(0, None), (1, None), (2, None), (None, b'{"id":1}')]
    assert len({v for _, _, v, _, _ in messages[:3]}) == 1  # the same value on every partition
    s = envelope(messages[0][2])
    assert (s["op"], s["before"], s["after"], s["partitions"], s["key"]) == ("s", None, None, 3, ["id"])
    assert s["columns"] == {"id": "bigint", "n": "numeric(12,2)", "big": "text", "added": "date"}
    assert s["schema_change"] == {
        "renamed": [],
        "retyped": [],
        "dropped": [],
        "added": [
            {
                "name": "added",
                "type": "date",
                "not_null": True,
                "default": "'2026-01-01'::date",
                "missing": "2026-01-01",
            }
        ],
        "rewritten": False,
    }
    c = envelope(messages[3][2])
    assert (s["source"]["seq"], c["source"]["seq"]) == (1, 1), "the event takes the seq of the change it precedes"
    assert c["columns"] == s["columns"]
    assert c["after"]["added"] == "2026-11-25"
    assert decode(messages[0][2] or b"")["schema_change"] == s["schema_change"]
    # the new shape is remembered: the next insert takes the fast path, no second event
    assert row(b, change("I", columns=[*cols(2), ("added", "date", text("2026-11-26"))]), ctx)[0][1] == b'{"id":2}'
    assert len(tables.changes) == 1
    assert tables.infos[("public", "probe")].attnums == (1, 2, 3, 4)


def test_a_changed_column_type_is_retyped_with_the_catalogs_type_names() -> None:
    b, tables = builder()
    new = table(columns=(("id", "bigint"), ("n", "numeric(20,4)"), ("big", "text")))
    tables.now[TableName("public", "probe")] = now_of(new)
    payload = change(
        "I",
        columns=[("id", "bigint", bare(1)), ("n", "numeric(20,4)", bare("1.0000")), ("big", "text", text("b"))],
    )
    messages = row(b, payload)
    [s] = schema_events(messages[:1])
    assert s["schema_change"]["retyped"] == [{"name": "n", "from": "numeric(12,2)", "to": "numeric(20,4)"}]
    env = envelope(messages[-1][2])
    assert env["columns"]["n"] == "numeric(20,4)"
    assert env["after"]["n"] == "1.0000"


def test_a_column_unknown_to_the_catalog_still_gets_the_messages_type() -> None:
    b, _ = builder()  # no catalog facts at all (the table is gone by now)
    messages = row(b, change("I", columns=[*cols(1), ("ghost", "integer", bare(3))]))
    [s] = schema_events(messages[:1])
    assert s["schema_change"]["added"] == [
        {"name": "ghost", "type": "integer", "not_null": False, "default": None, "missing": None}
    ]
    env = envelope(messages[-1][2])
    assert env["columns"]["ghost"] == "integer"
    assert env["after"]["ghost"] == 3


def test_a_renamed_key_column_renames_the_key() -> None:
    b, tables = builder()
    messages = row(
        b,
        change(
            "U",
            columns=[
                ("ident", "bigint", bare(1)),
                ("n", "numeric(12,2)", bare("2.00")),
                ("big", "text", text("b")),
            ],
            identity=[("ident", "bigint", bare(1))],
        ),
    )
    [s] = schema_events(messages[:1])
    assert s["schema_change"]["renamed"] == [{"from": "id", "to": "ident"}]
    assert s["key"] == ["ident"]
    assert messages[-1][1] == b'{"ident":1}'
    assert envelope(messages[-1][2])["op"] == "u"
    [(old, new, _)] = tables.changes
    assert (old.key, new.key) == (("id",), ("ident",))


def test_an_update_leaving_out_a_toasted_column_is_no_drop() -> None:
    b, tables = builder()
    tables.now[TableName("public", "probe")] = now_of(table())
    ctx = tx()
    for i in (1, 2):
        messages = row(b, change("U", columns=cols(i, with_big=False), identity=[("id", "bigint", bare(i))]), ctx)
        assert [k for _, k, _, _, _ in messages] == [f'{{"id":{i}}}'.encode()]
        assert envelope(messages[0][2])["unchanged"] == ["big"]
    assert tables.now_calls == 1  # once per transaction
    assert tables.changes == []


def test_an_update_after_a_drop_publishes_the_drop_and_a_key_change_reads_back_the_current_shape() -> None:
    info = table(columns=(("id", "bigint"), ("gone", "integer"), ("big", "text")))
    asked: list[list[str]] = []

    def refetch(i: TableInfo, key: dict[str, Any], columns: list[str], xid: int | None) -> dict[str, Any]:
        asked.append(columns)
        return {c: "read back" for c in columns}

    b, tables = builder(info)
    b.refetch = refetch
    tables.now[TableName("public", "probe")] = now_of(info, dropped=[2])
    # a key change that carries neither the dropped column nor the unchanged TOASTed one
    messages = row(
        b,
        change("U", columns=[("id", "bigint", bare(2), 1)], identity=[("id", "bigint", bare(1))]),
    )
    [s] = schema_events(messages[:1])
    assert s["schema_change"]["dropped"] == ["gone"]
    assert s["columns"] == {"id": "bigint", "big": "text"}
    assert asked == [["big"]]
    ops = [(k, envelope(v)["op"] if v else None) for _, k, v, p, _ in messages if p is None]
    assert ops == [(b'{"id":1}', "d"), (b'{"id":1}', None), (b'{"id":2}', "c")]
    assert envelope(messages[-1][2])["after"] == {"id": 2, "big": "read back"}


def test_a_column_dropped_and_added_again_under_its_name_is_a_drop_and_an_add() -> None:
    b, tables = builder()
    tables.now[TableName("public", "probe")] = now_of(
        table(), dropped=[3], extra=[Attribute(4, "big", "text", False, False, None, None)]
    )
    # same names and types as before: only the last attnum tells
    messages = row(b, change("I", columns=[*cols(1)[:2], ("big", "text", text("new"), 4)]))
    [s] = schema_events(messages[:1])
    change_ = s["schema_change"]
    assert (change_["dropped"], [a["name"] for a in change_["added"]]) == (["big"], ["big"])
    assert tables.infos[("public", "probe")].attnums == (1, 2, 4)


def test_a_rewritten_table_says_so() -> None:
    old = replace(table(), relfilenode=100)
    b, tables = builder(old)
    tables.now[TableName("public", "probe")] = now_of(
        old, relfilenode=200, extra=[Attribute(4, "v", "double precision", False, False, None, "random()")]
    )
    messages = row(b, change("I", columns=[*cols(1), ("v", "double precision", bare("0.5"))]))
    [s] = schema_events(messages[:1])
    assert s["schema_change"]["rewritten"] is True
    assert s["schema_change"]["added"][0]["default"] == "random()"
    assert tables.infos[("public", "probe")].relfilenode == 200


def test_a_delete_is_no_schema_change() -> None:
    b, tables = builder()
    messages = row(b, change("D", identity=[("id", "bigint", bare(1))]))
    assert [envelope(v)["op"] for _, _, v, _, _ in messages if v] == ["d"]
    assert tables.changes == []


def test_quoted_catalog_type_takes_the_fast_path() -> None:
    info = table(columns=(("id", "bigint"), ("m", '"Mood"'), ("ms", '"Mood"[]')))
    b, tables = builder(info)
    payload = change(
        "I", columns=[("id", "bigint", bare(1)), ("m", "Mood", text("ok")), ("ms", '"Mood"[]', text("{ok}"))]
    )
    env = envelope(row(b, payload)[0][2])
    assert tables.calls == [("public", "probe", False)]
    assert env["columns"] == {"id": "bigint", "m": '"Mood"', "ms": '"Mood"[]'}


# --- NaN / Infinity arriving as null --------------------------------------------------------------


def test_not_null_numeric_arriving_null_is_reported() -> None:
    nans = Nans()
    info = table(not_null=frozenset({"id", "n"}))
    b, _ = builder(info, nans=nans)
    env = envelope(row(b, change("I", columns=cols(1, None)))[0][2])
    assert env["after"]["n"] is None
    assert nans.seen == [("public.probe", "n")]
    row(b, change("U", columns=cols(1, None), identity=[("id", "bigint", bare(1))]))
    assert len(nans.seen) == 2
    row(b, change("I", columns=cols(2, "1.00")))
    assert len(nans.seen) == 2


def test_nullable_numeric_arriving_null_is_not_reported() -> None:
    nans = Nans()
    b, _ = builder(nans=nans)
    row(b, change("I", columns=cols(1, None)))
    assert nans.seen == []


@pytest.mark.parametrize("type_", ["real", "double precision", "numeric", "numeric(5,-2)"])
def test_nan_columns_are_the_not_null_decimal_ones(type_: str) -> None:
    info = table(columns=(("id", "bigint"), ("x", type_), ("t", "text")), not_null=frozenset({"id", "x", "t"}))
    assert info.nan_columns == ("x",)


# --- truncate -----------------------------------------------------------------------------------


def test_truncate_is_one_event_per_partition() -> None:
    b, _ = builder(partitions=4)
    ctx = tx()
    messages = b.truncate(DECODER.decode(truncate()), ctx)
    assert [(t, k, p) for t, k, _, p, _ in messages] == [("cdc.public.probe", None, p) for p in range(4)]
    for env in envelopes(messages):
        assert env["op"] == "t"
        assert env["partitions"] == 4
        assert env["before"] is None
        assert env["after"] is None
        assert env["source"]["lsn"] == lsn_to_int("0/1927B00")
        assert env["source"]["seq"] == 1
    assert ctx.seq == 1


def test_truncate_of_an_unknown_table_gives_nothing() -> None:
    b, _ = builder()
    assert b.truncate(DECODER.decode(truncate(table="other")), tx()) == []


# --- snapshot -----------------------------------------------------------------------------------

SNAP = table(
    columns=(
        ("id", "bigint"),
        ("i", "integer"),
        ("s", "smallint"),
        ("o", "oid"),
        ("ok", "boolean"),
        ("n", "numeric(12,2)"),
        ("b", "bytea"),
        ("t", "text"),
    )
)


def test_snapshot_values_convert_integers_and_booleans() -> None:
    names = SNAP.columns
    got = snapshot_values(
        SNAP, names, ("9223372036854775807", "-1", "2", "4294967295", "true", "1.50", "\\x00ff", "t")
    )
    assert got == {
        "id": 9223372036854775807,
        "i": -1,
        "s": 2,
        "o": 4294967295,
        "ok": True,
        "n": "1.50",
        "b": "\\x00ff",
        "t": "t",
    }
    assert snapshot_values(SNAP, ("ok", "t"), ("false", "true")) == {"ok": False, "t": "true"}


def test_snapshot_values_keep_none() -> None:
    got = snapshot_values(SNAP, SNAP.columns, ("1", None, None, None, None, None, None, None))
    assert got == {"id": 1, "i": None, "s": None, "o": None, "ok": None, "n": None, "b": None, "t": None}


def test_snapshot_values_need_one_text_per_name() -> None:
    with pytest.raises(ValueError):
        snapshot_values(SNAP, ("id", "i"), ("1",))


def test_snapshot_values_equal_the_streamed_values() -> None:
    texts = ("7", "-1", "2", "3", "true", "1.50", "\\x00ff", 'a "q"')
    streamed = DECODER.decode(
        change(
            "I",
            columns=[
                ("id", "bigint", bare(7)),
                ("i", "integer", bare(-1)),
                ("s", "smallint", bare(2)),
                ("o", "oid", bare(3)),
                ("ok", "boolean", b"true"),
                ("n", "numeric(12,2)", bare("1.50")),
                ("b", "bytea", bytea("00ff")),
                ("t", "text", text('a "q"')),
            ],
        )
    )
    assert snapshot_values(SNAP, SNAP.columns, texts) == {c["name"]: c["value"] for c in streamed["columns"]}


def test_snapshot_row_is_an_r_event() -> None:
    nans = Nans()
    info = table(not_null=frozenset({"id", "n"}))
    b, _ = builder(info, nans=nans)
    ctx = TxContext(None, 5000, 1_795_617_797_816_235)
    topic, key, value, partition, headers = b.snapshot_row(info, {"id": 1, "n": None, "big": "b"}, ctx, 5000)
    assert (topic, key, partition, headers) == ("cdc.public.probe", b'{"id":1}', None, None)
    env = envelope(value)
    assert env["op"] == "r"
    assert env["before"] is None
    assert env["after"] == {"id": 1, "n": None, "big": "b"}
    assert env["source"]["snapshot"] is True
    assert env["source"]["txId"] is None
    assert env["source"]["lsn"] == env["source"]["commit_lsn"] == 5000
    assert env["source"]["seq"] == 1
    assert nans.seen == [("public.probe", "n")]
    b.snapshot_row(info, {"id": 2, "n": "1", "big": "b"}, ctx, 5000)
    assert ctx.seq == 2


# --- table_info ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("catalog", "printed"),
    [
        ("integer", "integer"),
        ("numeric(12,2)", "numeric(12,2)"),
        ("character varying(20)", "character varying(20)"),
        ("timestamp with time zone", "timestamp with time zone"),
        ("text[]", "text[]"),
        ('"Mood"', "Mood"),
        ('"char"', "char"),
        ('"Mood"[]', '"Mood"[]'),
        ('myschema."Mood"', 'myschema."Mood"'),
    ],
)
def test_wal2json_type(catalog: str, printed: str) -> None:
    assert wal2json_type(catalog) == printed


def test_table_info_derived_fields() -> None:
    info = table(
        columns=(("id", "bigint"), ("ok", "boolean"), ("n", "numeric"), ("m", '"Mood"'), ("o", "oid")),
        not_null=frozenset({"id", "n"}),
    )
    assert info.wal2json_types == ["bigint", "boolean", "numeric", "Mood", "oid"]
    assert info.integer_columns == {"id", "o"}
    assert info.boolean_columns == {"ok"}
    assert info.nan_columns == ("n",)
    assert orjson.loads(orjson.dumps(info.columns_json)) == dict(info.types)
    assert orjson.loads(orjson.dumps(info.key_json)) == ["id"]
    assert not info.full_identity
    assert table(replica_identity="f").full_identity


T = TableName("public", "Order Items")


def test_key_problem_no_key() -> None:
    problem = key_problem(T, (), False, "d")
    assert problem is not None
    assert 'public."Order Items"' in problem
    assert "no primary key" in problem
    assert "ADD PRIMARY KEY" in problem
    assert "REPLICA IDENTITY USING INDEX" in problem


def test_key_problem_replica_identity_nothing() -> None:
    problem = key_problem(T, ("id",), True, "n")
    assert problem is not None
    assert "REPLICA IDENTITY NOTHING" in problem
    assert 'ALTER TABLE public."Order Items" REPLICA IDENTITY DEFAULT' in problem


def test_key_problem_pk_with_identity_on_another_index() -> None:
    problem = key_problem(T, ("id",), True, "i")
    assert problem is not None
    assert "another index" in problem
    assert "REPLICA IDENTITY DEFAULT" in problem


@pytest.mark.parametrize(
    ("key", "has_pk", "identity"),
    [(("id",), True, "d"), (("id",), True, "f"), (("code",), False, "i"), (("a", "b"), True, "d")],
)
def test_key_problem_none_when_replicable(key: tuple[str, ...], has_pk: bool, identity: str) -> None:
    assert key_problem(T, key, has_pk, identity) is None


# --- partitioned tables ---------------------------------------------------------------------------


class RootOf(FakeTables):
    """A partitioned table public.probe: its leaves' changes are looked up as the root's."""

    def __call__(self, schema: str, name: str, refresh: bool) -> TableInfo | None:
        return super().__call__(schema, "probe" if name.startswith("probe_") else name, refresh)


def test_a_row_moving_between_partitions_is_a_delete_then_a_create_on_the_root() -> None:
    b, _ = builder()
    b.tables = RootOf(table())
    ctx = tx()
    # UPDATE probe SET id = ... moving the row: wal2json reports a D from one leaf, then an I into another.
    deleted = row(b, change("D", identity=[("id", "bigint", bare(5))], table="probe_1", lsn="0/1927100"), ctx)
    created = row(b, change("I", columns=cols(5, "2.00"), table="probe_2", lsn="0/1927180"), ctx)
    messages = deleted + created
    assert [(topic, key, value is None) for topic, key, value, _, _ in messages] == [
        ("cdc.public.probe", b'{"id":5}', False),
        ("cdc.public.probe", b'{"id":5}', True),
        ("cdc.public.probe", b'{"id":5}', False),
    ]
    delete, create = envelope(messages[0][2]), envelope(messages[2][2])
    assert (delete["op"], create["op"]) == ("d", "c")
    assert (delete["source"]["table"], create["source"]["table"]) == ("probe", "probe")
    assert delete["source"]["seq"] < create["source"]["seq"], "the delete comes first"
    assert create["after"] == {"id": 5, "n": "2.00", "big": BIG}


def test_a_truncate_of_the_root_covers_its_partitions_and_one_of_a_partition_alone_is_reported() -> None:
    b, _ = builder(partitions=2)
    b.tables = RootOf(table())
    skipped: list[tuple[str, str]] = []
    b.on_partition_truncate = lambda info, partition: skipped.append((str(info.name), str(partition)))
    ctx = tx()
    # TRUNCATE probe: reported for the root, then for each partition, at one LSN
    messages = [
        m
        for name in ("probe", "probe_1", "probe_2")
        for m in b.truncate(DECODER.decode(truncate(table=name)), ctx)
    ]
    assert [(t, p) for t, _, _, p, _ in messages] == [("cdc.public.probe", 0), ("cdc.public.probe", 1)]
    assert skipped == [] and ctx.seq == 1
    # TRUNCATE probe_2 alone: a `t` would empty the whole target table
    assert b.truncate(DECODER.decode(truncate(table="probe_2", lsn="0/1927C00")), ctx) == []
    assert skipped == [("public.probe", "public.probe_2")]


def test_a_delete_naming_a_renamed_key_takes_the_catalogs_shape() -> None:
    b, tables = builder()
    renamed = table(columns=(("ident", "bigint"), ("n", "numeric(12,2)"), ("big", "text")), key=("ident",))
    tables.now[TableName("public", "probe")] = now_of(renamed)
    messages = row(b, change("D", identity=[("ident", "bigint", bare(1))]))
    [s] = schema_events(messages[:1])
    assert s["schema_change"]["renamed"] == [{"from": "id", "to": "ident"}]
    assert [(k, envelope(v)["op"] if v else None) for _, k, v, p, _ in messages[3:]] == [
        (b'{"ident":1}', "d"),
        (b'{"ident":1}', None),
    ]
    assert (s["source"]["seq"], envelope(messages[3][2])["source"]["seq"]) == (1, 1)


# --- the envelope's template ----------------------------------------------------------------------

names = st.text(alphabet=st.sampled_from('ab%"\\é_ .'), min_size=1, max_size=8)
row_values = st.dictionaries(
    names, st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text())
)


@settings(max_examples=200)
@given(
    prefix=names,
    schema_name=names,
    table_name=names,
    slot=st.one_of(st.none(), names),
    stream=names,
    op=st.sampled_from(["c", "u", "d", "r"]),
    before=st.one_of(st.none(), row_values),
    after=st.one_of(st.none(), row_values),
    xid=st.one_of(st.none(), st.integers(0, 2**32)),
    commit_lsn=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    ts_us=st.one_of(st.none(), st.integers(0, 2**62)),
    lsn=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 10**6),
    snapshot=st.booleans(),
)
def test_values_filled_into_the_template_are_the_bytes_the_codec_encodes(
    prefix: str,
    schema_name: str,
    table_name: str,
    slot: str | None,
    stream: str,
    op: Any,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    xid: int | None,
    commit_lsn: int | None,
    ts_us: int | None,
    lsn: int,
    seq: int,
    snapshot: bool,
) -> None:
    info = TableInfo(
        TableName(schema_name, table_name),
        topic_for(prefix, TableName(schema_name, table_name)),
        ("id", "n%"),
        {"id": "bigint", "n%": "text"},
        ("id",),
        "d",
    )
    builder = EventBuilder(prefix, "db%s", slot, lambda s, t, r: info, lambda topic: 1)
    builder.stream = stream
    tx = TxContext(xid, commit_lsn, ts_us)
    tx.seq = seq
    fast = builder._value(info, op, before, after, tx, lsn, info.columns_json, snapshot)
    # another Fragment of the same columns takes the codec's path
    slow = builder._value(info, op, before, after, tx, lsn, orjson.Fragment(orjson.dumps(info.types)), snapshot)
    assert fast[fast.index(b',"source"') :] == slow[slow.index(b',"source"') :]
    assert type(orjson.loads(fast)["ts_ms"]) is int  # the time of each call: not compared
    assert fast[: fast.index(b',"ts_ms"')] == slow[: slow.index(b',"ts_ms"')]
