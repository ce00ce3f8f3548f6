"""source_connector/shapes.py: the published shape of a table against the shape a message carries."""

from typing import cast

from pg_kafka_cdc.common.catalog import Attribute, TableNow
from pg_kafka_cdc.common.tables import TableName
from source_connector.events import Message
from source_connector.incremental import Incremental
from source_connector.shapes import Shape, ShapeDiff, compare, next_info, renamed_key, schema_change
from source_connector.stream import messages_seen
from source_connector.table_info import TableInfo

OLD: Shape = [(1, "id", "integer"), (2, "name", "text"), (3, "qty", "integer"), (4, "note", "text")]


def nothing_dropped(attnums: list[int]) -> list[int]:
    return []


def everything_dropped(attnums: list[int]) -> list[int]:
    return list(attnums)


def info(shape: Shape = OLD, key: tuple[str, ...] = ("id",), relfilenode: int = 10) -> TableInfo:
    return TableInfo(
        name=TableName("public", "t"),
        topic="cdc.public.t",
        columns=tuple(n for _, n, _ in shape),
        types={n: t for _, n, t in shape},
        key=key,
        replica_identity="d",
        not_null=frozenset({"id"}),
        attnums=tuple(a for a, _, _ in shape),
        relfilenode=relfilenode,
    )


def attr(
    attnum: int,
    name: str,
    type_: str,
    not_null: bool = False,
    dropped: bool = False,
    missing: str | None = None,
    default: str | None = None,
) -> Attribute:
    return Attribute(attnum, name, type_, not_null, dropped, missing, default)


def now(*attributes: Attribute, relfilenode: int = 10, key: tuple[int, ...] = (1,)) -> TableNow:
    return TableNow(1, relfilenode, "d", True, key, {a.attnum: a for a in attributes})


def test_the_same_shape_is_no_change() -> None:
    assert compare(OLD, list(OLD), True, everything_dropped) is None


def test_an_added_column() -> None:
    diff = compare(OLD, [*OLD, (5, "score", "integer")], True, nothing_dropped)
    assert diff == ShapeDiff([*OLD, (5, "score", "integer")], added=[5])


def test_a_dropped_column_of_an_insert() -> None:
    message = [c for c in OLD if c[0] != 3]
    diff = compare(OLD, message, True, nothing_dropped)  # an insert carries every column: no catalog asked
    assert diff == ShapeDiff(message, dropped=[(3, "qty")])


def test_a_renamed_column_keeps_its_attnum() -> None:
    message = [(1, "id", "integer"), (2, "full_name", "text"), (3, "qty", "integer"), (4, "note", "text")]
    assert compare(OLD, message, True, nothing_dropped) == ShapeDiff(message, renamed=[("name", "full_name")])


def test_a_retyped_column() -> None:
    message = [(1, "id", "integer"), (2, "name", "text"), (3, "qty", "bigint"), (4, "note", "text")]
    assert compare(OLD, message, True, nothing_dropped) == ShapeDiff(message, retyped=[(3, "integer", "bigint")])


def test_a_renamed_and_retyped_column() -> None:
    message = [(1, "id", "integer"), (2, "name", "text"), (3, "amount", "bigint"), (4, "note", "text")]
    diff = compare(OLD, message, True, nothing_dropped)
    assert diff == ShapeDiff(message, renamed=[("qty", "amount")], retyped=[(3, "integer", "bigint")])


def test_several_changes_at_once() -> None:
    message = [(1, "id", "bigint"), (2, "label", "text"), (5, "score", "integer"), (6, "at", "date")]
    diff = compare(OLD, message, True, nothing_dropped)
    assert diff == ShapeDiff(
        message,
        renamed=[("name", "label")],
        retyped=[(1, "integer", "bigint")],
        dropped=[(3, "qty"), (4, "note")],
        added=[5, 6],
    )


def test_an_update_leaving_out_a_toasted_column_is_not_a_drop() -> None:
    asked: list[list[int]] = []

    def dropped(attnums: list[int]) -> list[int]:
        asked.append(attnums)
        return []

    assert compare(OLD, OLD[:3], False, dropped) is None
    assert asked == [[4]]


def test_an_update_without_a_column_the_catalog_says_is_dropped() -> None:
    diff = compare(OLD, [OLD[0], OLD[1], OLD[3]], False, everything_dropped)
    assert diff == ShapeDiff([OLD[0], OLD[1], OLD[3]], dropped=[(3, "qty")])


def test_an_update_with_a_rename_keeps_the_toasted_column_it_left_out() -> None:
    message = [(1, "id", "integer"), (2, "label", "text"), (3, "qty", "integer")]
    diff = compare(OLD, message, False, nothing_dropped)
    assert diff is not None
    assert diff.shape == [*message, (4, "note", "text")]
    assert diff.renamed == [("name", "label")] and diff.dropped == []


def test_the_catalog_is_not_asked_when_nothing_is_absent() -> None:
    def never(attnums: list[int]) -> list[int]:
        raise AssertionError("asked")

    assert compare(OLD, [*OLD, (5, "x", "text")], False, never) is not None


def test_a_column_dropped_and_added_again_under_its_name() -> None:
    message = [(1, "id", "integer"), (2, "name", "text"), (3, "qty", "integer"), (5, "note", "text")]
    diff = compare(OLD, message, True, nothing_dropped)
    assert diff == ShapeDiff(message, dropped=[(4, "note")], added=[5])


def test_next_info_takes_names_from_the_message_and_facts_from_the_catalog() -> None:
    # the catalog is ahead of the stream: attnum 2 is renamed once more there
    catalog = now(
        attr(1, "id", "integer", True),
        attr(2, "newer_name", "text"),
        attr(3, "qty", "bigint", True),
        attr(4, "note", "text"),
        attr(5, "score", "integer", True, missing="5", default="5"),
    )
    shape: Shape = [(1, "id", "integer"), (2, "label", "text"), (3, "qty", "integer"), (4, "note", "text")]
    shape.append((5, "score", "integer"))
    new = next_info(info(), shape, catalog)
    assert new.columns == ("id", "label", "qty", "note", "score")
    assert new.attnums == (1, 2, 3, 4, 5)
    # qty is bigint in the catalog but integer in the stream: the stream's type stands
    assert new.types == {"id": "integer", "label": "text", "qty": "integer", "note": "text", "score": "integer"}
    assert new.not_null == frozenset({"id", "qty", "score"})
    assert new.key == ("id",)
    assert new.last_attnum == 5


def test_next_info_keeps_the_catalogs_spelling_of_a_type() -> None:
    shape: Shape = [(1, "id", "integer"), (2, "m", "Mood")]
    new = next_info(info([(1, "id", "integer")]), shape, now(attr(1, "id", "integer"), attr(2, "m", '"Mood"')))
    assert new.types["m"] == '"Mood"'
    assert new.wal2json_types == ["integer", "Mood"]


def test_a_renamed_key_column_renames_the_key() -> None:
    old = info()
    shape: Shape = [(1, "ident", "integer"), *OLD[1:]]
    new = next_info(old, shape, now(attr(1, "ident", "integer", True)))
    assert new.key == ("ident",)
    diff = compare(OLD, shape, True, nothing_dropped)
    assert diff is not None
    assert renamed_key(old, schema_change(old, new, diff, None)) == [("id", "ident")]
    # without the catalog (table gone), the key follows the attnums
    assert next_info(old, shape, None).key == ("ident",)


def test_schema_change_fields() -> None:
    old = info()
    message: Shape = [(1, "id", "bigint"), (2, "label", "text"), (4, "note", "text"), (5, "score", "integer")]
    catalog = now(
        attr(1, "id", "bigint", True),
        attr(2, "label", "text"),
        attr(3, "........pg.dropped.3........", "-", dropped=True),
        attr(4, "note", "text"),
        attr(5, "score", "integer", True, missing="5", default="5"),
        relfilenode=11,
    )
    diff = compare(OLD, message, True, nothing_dropped)
    assert diff is not None
    new = next_info(old, diff.shape, catalog)
    assert schema_change(old, new, diff, catalog) == {
        "renamed": [{"from": "name", "to": "label"}],
        "retyped": [{"name": "id", "from": "integer", "to": "bigint"}],
        "dropped": ["qty"],
        "added": [{"name": "score", "type": "integer", "not_null": True, "default": "5", "missing": "5"}],
        "rewritten": True,
    }
    assert new.relfilenode == 11


def test_not_rewritten_when_the_storage_is_the_same_or_unknown() -> None:
    diff = compare(OLD, [*OLD, (5, "x", "text")], True, nothing_dropped)
    assert diff is not None
    catalog = now(attr(5, "x", "text"))
    assert schema_change(info(), next_info(info(), diff.shape, catalog), diff, catalog)["rewritten"] is False
    unknown = info(relfilenode=0)
    other = now(attr(5, "x", "text"), relfilenode=99)
    assert schema_change(unknown, next_info(unknown, diff.shape, other), diff, other)["rewritten"] is False


# --- the stream's side: a snapshot chunk under way when its table's shape changes ------------------


class FakeChunk:
    def __init__(self, topic: str) -> None:
        self.info = info()
        self.info.topic = topic
        self.seen: list[list[Message]] = []

    def saw(self, messages: list[Message]) -> None:
        self.seen.append(messages)


class FakeIncremental:
    def __init__(self, chunk: FakeChunk, open_: bool) -> None:
        self.chunk: FakeChunk | None = chunk
        self.window: FakeChunk | None = chunk if open_ else None
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1
        self.chunk = self.window = None


SCHEMA_EVENT: list[Message] = [("cdc.public.t", None, b"s", p, None) for p in range(2)]
CREATE: Message = ("cdc.public.t", b'{"id":1}', b"c", None, None)


def test_a_schema_change_of_the_chunks_table_reads_the_chunk_again() -> None:
    for open_ in (True, False):
        chunk = FakeChunk("cdc.public.t")
        incremental = FakeIncremental(chunk, open_)
        messages_seen(cast(Incremental, incremental), [*SCHEMA_EVENT, CREATE], False)
        assert incremental.resets == 1 and chunk.seen == []


def test_a_schema_change_of_another_table_is_no_truncate_for_the_chunk() -> None:
    chunk = FakeChunk("cdc.public.other")
    incremental = FakeIncremental(chunk, True)
    messages_seen(cast(Incremental, incremental), [*SCHEMA_EVENT, CREATE], False)
    assert incremental.resets == 0
    assert chunk.seen == [[CREATE]]  # the keyless schema events are not taken for a TRUNCATE
    truncate: list[Message] = [("cdc.public.other", None, b"t", 0, None)]
    messages_seen(cast(Incremental, incremental), truncate, True)
    assert chunk.seen[-1] == truncate
