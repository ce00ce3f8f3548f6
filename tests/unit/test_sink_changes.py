"""The sink's decoding of change messages and the net effect of a batch per table (changes.py)."""

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.tables import TableName
from schemas.codec import BadMessage
from sink_connector.changes import TOMBSTONE, Change, decode
from sink_connector.net_effect import TableBatch, coalesce

TOPIC = "cdc.public.probe"
TABLE = TableName("public", "probe")
COLUMNS = {"id": "bigint", "n": "numeric(12,2)", "big": "text"}


def key(i: int) -> bytes:
    return orjson.dumps({"id": i})


def envelope(
    op: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    source = {
        "txId": extra.pop("xid", 730),
        "lsn": extra.pop("lsn", 1000),
        "commit_lsn": extra.pop("commit_lsn", 2000),
        "ts_us": extra.pop("ts_us", 1_700_000_000_000_000),
    }
    return {
        "before": before,
        "after": after,
        "op": op,
        "ts_ms": 1_700_000_000_000,
        "source": source,
        "columns": dict(COLUMNS),
        "key": ["id"],
        **extra,
    }


def message(env: dict[str, Any]) -> bytes:
    return orjson.dumps(env)


def change(
    op: str,
    i: int,
    row: dict[str, Any] | None = None,
    partition: int = 0,
    offset: int = 0,
    **extra: Any,
) -> Change:
    """A decoded change of the row with id `i` (`row` is `after`, or `before` for a delete)."""
    if op == TOMBSTONE:
        return decode(TOPIC, partition, offset, key(i), None)
    if op == "t":
        return decode(
            TOPIC, partition, offset, None, message(envelope("t", partitions=extra.pop("partitions", 1)))
        )
    row = {"id": i, **(row or {})}
    env = envelope(op, before=row, **extra) if op == "d" else envelope(op, after=row, **extra)
    return decode(TOPIC, partition, offset, key(i), message(env))


def batch_of(*changes: Change) -> TableBatch:
    batch = TableBatch(TABLE)
    for c in changes:
        batch.add(c)
    return batch


def upsert_rows(batch: TableBatch) -> dict[bytes, dict[str, Any]]:
    return {k: u.row for k, u in batch.upserts.items()}


# --- decode -------------------------------------------------------------------------------------


def test_decodes_a_create() -> None:
    c = decode(TOPIC, 2, 41, key(1), message(envelope("c", after={"id": 1, "n": "1.50", "big": "x"})))
    assert c == Change(
        topic=TOPIC,
        partition=2,
        offset=41,
        key=key(1),
        op="c",
        row={"id": 1, "n": "1.50", "big": "x"},
        columns=COLUMNS,
        key_columns=["id"],
        unchanged=None,
        xid=730,
        lsn=1000,
        commit_lsn=2000,
        ts_us=1_700_000_000_000_000,
        partitions=None,
    )


def test_a_delete_carries_its_before_row() -> None:
    c = decode(TOPIC, 0, 0, key(1), message(envelope("d", before={"id": 1, "n": None}, after=None)))
    assert c.op == "d"
    assert c.row == {"id": 1, "n": None}


def test_an_update_keeps_its_unchanged_columns() -> None:
    env = envelope("u", before=None, after={"id": 1, "n": "2"}, unchanged=["big"])
    c = decode(TOPIC, 0, 0, key(1), message(env))
    assert c.row == {"id": 1, "n": "2"}
    assert c.unchanged == ["big"]


def test_an_empty_unchanged_list_is_none() -> None:
    env = envelope("u", after={"id": 1, "n": "2", "big": "x"}, unchanged=[])
    assert decode(TOPIC, 0, 0, key(1), message(env)).unchanged is None


def test_a_snapshot_read_without_transaction() -> None:
    c = decode(TOPIC, 0, 0, key(1), message(envelope("r", after={"id": 1}, xid=None, commit_lsn=None)))
    assert c.op == "r"
    assert c.xid is None
    assert c.commit_lsn is None
    assert c.lsn == 1000


def test_decodes_a_truncate() -> None:
    c = decode(TOPIC, 3, 7, None, message(envelope("t", partitions=4)))
    assert c.op == "t"
    assert c.key == b""
    assert c.row is None
    assert c.partitions == 4
    assert c.partition == 3


def test_a_tombstone_is_a_delete_of_its_key() -> None:
    c = decode(TOPIC, 1, 9, key(5), None)
    assert c.op == TOMBSTONE
    assert c.row == {"id": 5}
    assert c.key_columns == ["id"]
    assert c.columns is None


def test_a_tombstone_takes_its_delete_position_from_the_header() -> None:
    header = [("other", b"x"), ("cdc.source", b'{"txId":504,"lsn":4000,"commit_lsn":4100,"ts_us":17}')]
    c = decode(TOPIC, 1, 9, key(5), None, header)
    assert (c.op, c.xid, c.lsn, c.commit_lsn, c.ts_us) == (TOMBSTONE, 504, 4000, 4100, 17)
    bare = decode(TOPIC, 1, 9, key(5), None, [("other", b"x")])
    assert (bare.xid, bare.lsn, bare.commit_lsn, bare.ts_us) == (None, None, None, None)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"{nope", "tombstone header cdc.source is not JSON"),
        (None, "tombstone header cdc.source is not JSON"),
        (b"[1]", "must be an object of integers or nulls"),
        (b'{"txId":"504"}', "must be an object of integers or nulls"),
        (b'{"commit_lsn":true}', "must be an object of integers or nulls"),
    ],
)
def test_bad_tombstone_headers(raw: bytes | None, error: str) -> None:
    with pytest.raises(BadMessage, match=error):
        decode(TOPIC, 1, 9, key(5), None, [("cdc.source", raw)])


@pytest.mark.parametrize(
    ("key_bytes", "value", "error"),
    [
        (None, None, "tombstone without a key"),
        (b"", None, "tombstone without a key"),
        (b"{nope", None, "key is not JSON"),
        (b"[1]", None, "key is not a JSON object"),
        (b"{}", None, "key is not a JSON object"),
        (key(1), b"{nope", "value is not JSON"),
        (key(1), b"[1, 2]", "value is not a JSON object"),
        (key(1), b'"c"', "value is not a JSON object"),
    ],
)
def test_undecodable_messages(key_bytes: bytes | None, value: bytes | None, error: str) -> None:
    with pytest.raises(BadMessage, match=error):
        decode(TOPIC, 0, 0, key_bytes, value)


@pytest.mark.parametrize("missing", ["op", "source", "columns", "key", "before", "after"])
def test_an_envelope_field_is_missing(missing: str) -> None:
    env = envelope("c", after={"id": 1})
    del env[missing]
    with pytest.raises(BadMessage, match=f"envelope has no '{missing}' field"):
        decode(TOPIC, 0, 0, key(1), message(env))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"op": "z"}, "unknown op 'z'"),
        ({"columns": ["id"]}, "`columns` must be an object"),
        ({"key": "id"}, "`key` a non-empty list"),
        ({"key": []}, "`key` a non-empty list"),
        ({"source": None}, "`source` must be an object"),
        ({"after": None}, "`after` must be an object holding the key columns"),
        ({"after": {"n": "1"}}, "`after` must be an object holding the key columns"),
        ({"op": "d", "before": {"n": "1"}}, "`before` must be an object holding the key columns"),
        ({"op": "d", "before": None}, "`before` must be an object"),
        ({"op": "d", "before": {"id": 1}, "unchanged": ["big"]}, "`unchanged` is only allowed"),
        ({"op": "r", "unchanged": ["big"]}, "`unchanged` is only allowed"),
        ({"op": "u", "unchanged": "big"}, "`unchanged` is only allowed on updates and creates, as a list"),
        ({"op": "t"}, "truncate event without a valid `partitions` count"),
        ({"op": "t", "partitions": 0}, "truncate event without a valid `partitions` count"),
        ({"op": "t", "partitions": "3"}, "truncate event without a valid `partitions` count"),
        ({"op": "t", "partitions": 2, "unchanged": ["big"]}, "`unchanged` is only allowed"),
    ],
)
def test_malformed_envelopes(changes: dict[str, Any], error: str) -> None:
    env = {**envelope("c", after={"id": 1, "n": "1"}), **changes}
    with pytest.raises(BadMessage, match=error):
        decode(TOPIC, 0, 0, key(1), message(env))


@pytest.mark.parametrize("key_bytes", [None, b""])
def test_a_change_event_without_a_key(key_bytes: bytes | None) -> None:
    with pytest.raises(BadMessage, match="change event without a key"):
        decode(TOPIC, 0, 0, key_bytes, message(envelope("c", after={"id": 1})))


def test_an_op_that_is_not_a_string_is_a_bad_message() -> None:
    env = {**envelope("c", after={"id": 1}), "op": ["c"]}
    with pytest.raises(BadMessage):
        decode(TOPIC, 0, 0, key(1), message(env))


def test_key_columns_that_are_not_strings_are_a_bad_message() -> None:
    env = {**envelope("c", after={"id": 1}), "key": [["id"]]}
    with pytest.raises(BadMessage):
        decode(TOPIC, 0, 0, key(1), message(env))


# --- one key within a batch ---------------------------------------------------------------------


def test_the_last_upsert_of_a_key_wins() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1", "big": "a"}),
        change("u", 1, {"n": "2", "big": "b"}),
        change("u", 1, {"n": "3", "big": "c"}),
    )
    assert upsert_rows(batch) == {key(1): {"id": 1, "n": "3", "big": "c"}}
    assert batch.deletes == {}
    assert batch.upserts[key(1)].unchanged is None
    assert batch.replaced == [{"id": 1, "n": "1", "big": "a"}, {"id": 1, "n": "2", "big": "b"}]


def test_a_delete_after_an_upsert_wins() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1", "big": "a"}, partition=2), change("d", 1, {"n": "1", "big": "a"}, partition=2)
    )
    assert batch.upserts == {}
    assert batch.deletes == {key(1): ({"id": 1}, 2)}  # the key columns only
    assert batch.replaced == [{"id": 1, "n": "1", "big": "a"}]


def test_an_upsert_after_a_delete_recreates_the_row() -> None:
    batch = batch_of(change("d", 1), change("c", 1, {"n": "5", "big": "z"}))
    assert batch.deletes == {}
    assert upsert_rows(batch) == {key(1): {"id": 1, "n": "5", "big": "z"}}
    assert batch.replaced == [{"id": 1}]


def test_a_tombstone_deletes_like_a_delete() -> None:
    batch = batch_of(change("c", 1, {"n": "1"}, partition=1), change(TOMBSTONE, 1, partition=1))
    assert batch.upserts == {}
    assert batch.deletes == {key(1): ({"id": 1}, 1)}
    assert batch.ops == {"c": 1, TOMBSTONE: 1}


def test_a_tombstone_after_a_delete_keeps_one_delete() -> None:
    batch = batch_of(change("d", 1), change(TOMBSTONE, 1))
    assert batch.deletes == {key(1): ({"id": 1}, 0)}
    assert batch.replaced == [{"id": 1}]


def test_snapshot_reads_are_full_rows() -> None:
    batch = batch_of(change("r", 1, {"n": "1", "big": "a"}), change("r", 2, {"n": "2", "big": "b"}))
    assert upsert_rows(batch) == {key(1): {"id": 1, "n": "1", "big": "a"}, key(2): {"id": 2, "n": "2", "big": "b"}}


def test_an_update_with_unchanged_columns_merges_onto_the_upsert_before_it() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1", "big": "BIG"}),
        change("u", 1, {"n": "2"}, unchanged=["big"]),
    )
    upsert = batch.upserts[key(1)]
    assert upsert.row == {"id": 1, "n": "2", "big": "BIG"}
    assert upsert.unchanged is None
    assert batch.replaced == [{"id": 1, "n": "1", "big": "BIG"}]


def test_an_update_with_unchanged_columns_alone_writes_only_its_columns() -> None:
    batch = batch_of(change("u", 1, {"n": "2"}, unchanged=["big"]))
    upsert = batch.upserts[key(1)]
    assert upsert.row == {"id": 1, "n": "2"}  # `big` is left as it is in the target
    assert upsert.unchanged == {"big"}


def test_updates_with_unchanged_columns_merge_with_each_other() -> None:
    batch = batch_of(
        change("u", 1, {"n": "2"}, unchanged=["big"]),
        change("u", 1, {"n": "3"}, unchanged=["big"]),
    )
    upsert = batch.upserts[key(1)]
    assert upsert.row == {"id": 1, "n": "3"}
    assert upsert.unchanged == {"big"}


def test_a_full_update_after_a_partial_one_replaces_it() -> None:
    batch = batch_of(
        change("u", 1, {"n": "2"}, unchanged=["big"]),
        change("u", 1, {"n": "3", "big": "new"}),
    )
    upsert = batch.upserts[key(1)]
    assert upsert.row == {"id": 1, "n": "3", "big": "new"}
    assert upsert.unchanged is None


def test_a_create_with_unchanged_columns_is_partial_too() -> None:
    """The create of a key change whose row was gone when read back may leave columns unchanged."""
    batch = batch_of(change("c", 1, {"n": "2"}, unchanged=["big"]))
    assert batch.upserts[key(1)].row == {"id": 1, "n": "2"}


def test_a_delete_after_a_partial_update_wins() -> None:
    batch = batch_of(change("u", 1, {"n": "2"}, unchanged=["big"]), change("d", 1))
    assert batch.upserts == {}
    assert key(1) in batch.deletes


def test_keys_are_independent() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1"}),
        change("c", 2, {"n": "2"}),
        change("d", 1),
        change("u", 2, {"n": "3"}, unchanged=["big"]),
    )
    assert upsert_rows(batch) == {key(2): {"id": 2, "n": "3"}}
    assert set(batch.deletes) == {key(1)}


# --- truncate -----------------------------------------------------------------------------------


def test_a_truncate_drops_the_earlier_changes_of_its_partition() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1"}, partition=0),
        change("d", 2, partition=0),
        change("c", 3, {"n": "3"}, partition=1),
        change("t", 0, partition=0, partitions=2),
    )
    assert upsert_rows(batch) == {key(3): {"id": 3, "n": "3"}}
    assert batch.deletes == {}
    assert batch.truncated == {0: 2}
    assert batch.replaced == [{"id": 1, "n": "1"}, {"id": 2}]


def test_changes_after_a_truncate_are_kept() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1"}, partition=0),
        change("t", 0, partition=0, partitions=2),
        change("c", 1, {"n": "2"}, partition=0),
        change("d", 2, partition=0),
    )
    assert batch.truncated == {0: 2}
    assert upsert_rows(batch) == {key(1): {"id": 1, "n": "2"}}
    assert set(batch.deletes) == {key(2)}
    assert batch.replaced == [{"id": 1, "n": "1"}]


def test_a_truncate_of_every_partition() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1"}, partition=0),
        change("c", 2, {"n": "2"}, partition=1),
        change("t", 0, partition=0, partitions=2),
        change("t", 0, partition=1, partitions=2),
    )
    assert batch.upserts == {}
    assert batch.truncated == {0: 2, 1: 2}
    assert batch.ops == {"c": 2, "t": 2}
    assert batch.changes == 4


def test_a_single_partition_truncate() -> None:
    batch = batch_of(change("c", 1, {"n": "1"}), change("t", 0, partitions=1))
    assert batch.truncated == {0: 1}
    assert batch.upserts == {}


# --- batch metadata -----------------------------------------------------------------------------


def test_counts_ops_and_keeps_the_newest_positions() -> None:
    batch = batch_of(
        change("c", 1, {"n": "1"}, ts_us=30, commit_lsn=300),
        change("u", 1, {"n": "2"}, ts_us=10, commit_lsn=500),
        change("d", 2, ts_us=20, commit_lsn=None),
        change(TOMBSTONE, 3),
    )
    assert batch.changes == 4
    assert batch.ops == {"c": 1, "u": 1, "d": 1, TOMBSTONE: 1}
    assert batch.max_ts_us == 30
    assert batch.max_commit_lsn == 500


def test_an_empty_batch_has_no_positions() -> None:
    batch = TableBatch(TABLE)
    assert batch.max_ts_us is None
    assert batch.max_commit_lsn is None
    assert batch.columns == {}
    assert batch.key_columns == []


def test_columns_accumulate_and_tombstones_leave_them() -> None:
    first = change("c", 1, {"n": "1"})
    wider = change("c", 2, {"n": "2"})
    wider.columns = {**COLUMNS, "extra": "integer"}
    batch = batch_of(first, change(TOMBSTONE, 3), wider)
    assert batch.columns == {**COLUMNS, "extra": "integer"}
    assert batch.key_columns == ["id"]
    assert batch_of(change(TOMBSTONE, 3)).columns == {}


def test_coalesce_groups_by_table_in_message_order() -> None:
    other = TableName("public", "Other")
    tables = {TOPIC: TABLE, "cdc.public.Other": other}
    first = change("c", 1, {"n": "1"})
    second = change("c", 1, {"n": "x"})
    second.topic = "cdc.public.Other"
    third = change("u", 1, {"n": "2"})
    batches = coalesce([first, second, third], tables)
    assert list(batches) == [TABLE, other]
    assert batches[TABLE].table == TABLE
    assert upsert_rows(batches[TABLE]) == {key(1): {"id": 1, "n": "2"}}
    assert upsert_rows(batches[other]) == {key(1): {"id": 1, "n": "x"}}
    assert coalesce([], tables) == {}


# --- the net effect equals applying the changes one by one ---------------------------------------

KEYS = 3
PARTITIONS = 2


def partition_of(i: int) -> int:
    return i % PARTITIONS


Row = dict[str, Any]
Model = dict[int, Row]

values = st.sampled_from(["0", "1", "2.50", None])
steps = st.one_of(
    st.tuples(st.sampled_from(["c", "r", "u"]), st.integers(0, KEYS - 1), values, values),
    st.tuples(st.just("partial"), st.integers(0, KEYS - 1), values, st.none()),
    st.tuples(st.sampled_from(["d", TOMBSTONE]), st.integers(0, KEYS - 1), st.none(), st.none()),
    st.tuples(st.just("t"), st.integers(0, PARTITIONS - 1), st.none(), st.none()),
)
initial_rows = st.dictionaries(
    st.integers(0, KEYS - 1), st.fixed_dictionaries({"n": values, "big": values}), max_size=KEYS
)


def apply_one_by_one(model: Model, steps: list[tuple[str, int, Any, Any]]) -> list[Change]:
    """Apply each step to `model` as the source did; return the change events of the stream.

    An update that leaves `big` unchanged only exists for a row that exists: on a missing row the
    step becomes a create.
    """
    changes: list[Change] = []
    for offset, (kind, i, n, big) in enumerate(steps):
        if kind == "t":
            for k in [k for k in model if partition_of(k) == i]:
                del model[k]
            changes.append(change("t", 0, partition=i, offset=offset, partitions=PARTITIONS))
            continue
        p = partition_of(i)
        if kind == "partial" and i in model:
            model[i] = {**model[i], "id": i, "n": n}
            changes.append(change("u", i, {"n": n}, partition=p, offset=offset, unchanged=["big"]))
        elif kind in ("c", "r", "u", "partial"):
            model[i] = {"id": i, "n": n, "big": big}
            changes.append(
                change("c" if kind == "partial" else kind, i, {"n": n, "big": big}, partition=p, offset=offset)
            )
        else:
            model.pop(i, None)
            changes.append(change(kind, i, partition=p, offset=offset))
    return changes


def apply_net_effect(model: Model, batch: TableBatch) -> None:
    """What apply_table does: truncates, then deletes, then upserts (INSERT ... ON CONFLICT DO UPDATE
    of the columns the row carries; a column a new row does not carry is NULL)."""
    for p in batch.truncated:
        for k in [k for k in model if partition_of(k) == p]:
            del model[k]
    for row, _ in batch.deletes.values():
        model.pop(row["id"], None)
    for upsert in batch.upserts.values():
        i = upsert.row["id"]
        model[i] = {**model[i], **upsert.row} if i in model else {"n": None, "big": None, **upsert.row}


@given(initial_rows, st.lists(steps, max_size=25))
def test_the_net_effect_of_a_batch_equals_its_changes_one_by_one(
    initial: dict[int, Row], batch_steps: list[tuple[str, int, Any, Any]]
) -> None:
    start = {i: {"id": i, **row} for i, row in initial.items()}
    expected = {i: dict(row) for i, row in start.items()}
    changes = apply_one_by_one(expected, batch_steps)

    batch = batch_of(*changes)
    assert not batch.upserts.keys() & batch.deletes.keys()
    assert batch.changes == len(changes)
    actual = {i: dict(row) for i, row in start.items()}
    apply_net_effect(actual, batch)
    assert actual == expected


@given(initial_rows, st.lists(steps, max_size=25), st.integers(1, 24))
def test_splitting_a_batch_does_not_change_its_effect(
    initial: dict[int, Row], batch_steps: list[tuple[str, int, Any, Any]], cut: int
) -> None:
    start = {i: {"id": i, **row} for i, row in initial.items()}
    changes = apply_one_by_one({i: dict(row) for i, row in start.items()}, batch_steps)
    whole = {i: dict(row) for i, row in start.items()}
    apply_net_effect(whole, batch_of(*changes))
    split = {i: dict(row) for i, row in start.items()}
    apply_net_effect(split, batch_of(*changes[:cut]))
    apply_net_effect(split, batch_of(*changes[cut:]))
    assert split == whole
