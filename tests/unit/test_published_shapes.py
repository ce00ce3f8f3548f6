"""The shapes kept per table in the state topic (source_connector/published_shapes.py): which one a
restart compares the stream with, and the records produced."""

import pytest

from pg_kafka_cdc.common.tables import TableName
from source_connector.published_shapes import (
    HISTORY,
    Published,
    PublishedShapes,
    appended,
    as_of,
    decode,
    encode,
    fields_of,
    info_from,
    is_shape_key,
    shape_key,
)
from source_connector.state import SourceState, state_key
from source_connector.table_info import TableInfo
from tests.unit.test_shape_changes import info

ITEM = TableName("public", "t")  # the table of tests.unit.test_shape_changes.info
STATE = SourceState("cdc_slot", "shop", "7431", "done", 1000, 5000, 5000)


def item(*columns: tuple[int, str, str], key: tuple[str, ...] = ("id",)) -> TableInfo:
    return info(list(columns), key, relfilenode=16400)


BEFORE = item((1, "id", "integer"), (2, "label", "text"))
RENAMED = item((1, "id", "integer"), (2, "title", "text"))
ADDED = item((1, "id", "integer"), (2, "title", "text"), (3, "qty", "bigint"))


class FakeProducer:
    def __init__(self, full: int = 0) -> None:
        self.produced: list[tuple[str, bytes, bytes]] = []
        self.full = full  # BufferErrors to raise first
        self.polls = 0

    def produce(self, topic: str, value: bytes, key: bytes) -> None:
        if self.full:
            self.full -= 1
            raise BufferError("queue full")
        self.produced.append((topic, value, key))

    def poll(self, timeout: float) -> int:
        self.polls += 1
        return 0

    def flush(self, timeout: float) -> int:
        return 0


def test_a_table_info_survives_its_record() -> None:
    table, history = decode(encode(ITEM, [Published(0, fields_of(BEFORE)), Published(7000, fields_of(ADDED))]))
    assert table == ITEM
    assert [p.lsn for p in history] == [0, 7000]
    again = info_from(history[1].fields, ITEM, ADDED.topic)
    assert fields_of(again) == fields_of(ADDED)  # (TableInfo's derived Fragments compare by identity)
    assert again.shape == ADDED.shape and again.not_null == ADDED.not_null


def test_the_shape_as_of_a_position_is_the_newest_kept_at_or_below_it() -> None:
    history = [Published(0, fields_of(BEFORE)), Published(7000, fields_of(RENAMED)), Published(9000, {})]
    assert as_of(history, 6999) == history[0]
    assert as_of(history, 7000) == history[1]  # resuming after the transaction committed at 7000
    assert as_of(history, 8999) == history[1]
    assert as_of(history, 10**9) == history[2]
    assert as_of(history[1:], 100) is None


def test_a_schema_change_read_again_replaces_what_was_kept_from_its_position() -> None:
    history = appended([], 0, BEFORE)
    history = appended(history, 7000, RENAMED)
    history = appended(history, 9000, ADDED)
    again = appended(history, 7000, RENAMED)  # a restart read the transaction at 7000 again
    assert [p.lsn for p in again] == [0, 7000]
    assert again[-1].fields == fields_of(RENAMED)


def test_the_history_keeps_its_newest_shapes() -> None:
    history: list[Published] = []
    for lsn in range(0, 100 * (HISTORY + 5), 100):
        history = appended(history, lsn, BEFORE)
    assert len(history) == HISTORY
    assert history[-1].lsn == 100 * (HISTORY + 4)


def test_shape_records_are_told_from_the_state_record_and_other_slots() -> None:
    key = shape_key(STATE, ITEM)
    assert is_shape_key(key, STATE)
    assert not is_shape_key(state_key(STATE.system_id, STATE.database, STATE.slot), STATE)
    assert not is_shape_key(None, STATE)
    other_slot = SourceState("cdc_slot2", "shop", "7431", "done", 1000, 5000, 5000)
    recreated = SourceState("cdc_slot", "shop", "7431", "done", 2000, 5000, 5000)  # the slot made again
    assert not is_shape_key(key, other_slot)
    assert not is_shape_key(key, recreated)


def loaded(history: list[Published], producer: FakeProducer | None = None) -> PublishedShapes:
    shapes = PublishedShapes(producer or FakeProducer(), "cdc.__state", STATE)
    records: dict[bytes, bytes | None] = {
        shape_key(STATE, ITEM): encode(ITEM, history),
        shape_key(STATE, TableName("public", "gone")): None,
        state_key(STATE.system_id, STATE.database, STATE.slot): b"{}",
    }
    shapes.load(records)
    return shapes


def test_a_restart_compares_the_stream_with_the_shape_published_before_a_ddl_made_while_stopped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    shapes = loaded([Published(0, fields_of(BEFORE))])
    with caplog.at_level("INFO"):
        published = shapes.as_published(RENAMED, resumed_at=5000)
    assert fields_of(published) == fields_of(BEFORE)
    assert "public.t changed since cdc-source last published it" in caplog.text
    assert "label text" in caplog.text and "title text" in caplog.text


def test_a_restart_within_a_transaction_read_again_takes_the_shape_before_it() -> None:
    shapes = loaded([Published(0, fields_of(BEFORE)), Published(7000, fields_of(RENAMED))])
    assert fields_of(shapes.as_published(RENAMED, resumed_at=6500)) == fields_of(BEFORE)
    assert shapes.as_published(RENAMED, resumed_at=7000) is RENAMED


def test_the_catalog_is_taken_when_only_other_facts_than_the_columns_differ() -> None:
    shapes = loaded([Published(0, fields_of(BEFORE))])
    rekeyed = item((1, "id", "integer"), (2, "label", "text"), key=("id", "label"))
    assert shapes.as_published(rekeyed, resumed_at=5000) is rekeyed


def test_a_table_without_a_history_gets_one_from_the_catalog() -> None:
    producer = FakeProducer(full=2)
    shapes = PublishedShapes(producer, "cdc.__state", STATE)
    assert shapes.as_published(BEFORE, resumed_at=None) is BEFORE
    assert producer.polls == 2  # a full queue is waited out
    [(topic, value, key)] = producer.produced
    assert (topic, key) == ("cdc.__state", shape_key(STATE, ITEM))
    assert decode(value) == (ITEM, [Published(0, fields_of(BEFORE))])


def test_a_schema_change_is_kept_from_its_transaction_on() -> None:
    producer = FakeProducer()
    shapes = loaded([Published(0, fields_of(BEFORE))], producer)
    shapes.record(RENAMED, 7000)
    [(_, value, _)] = producer.produced
    assert [(p.lsn, p.fields) for p in decode(value)[1]] == [(0, fields_of(BEFORE)), (7000, fields_of(RENAMED))]


def test_the_catalog_is_taken_when_no_kept_shape_is_old_enough() -> None:
    shapes = loaded([Published(7000, fields_of(RENAMED))])
    assert shapes.as_published(ADDED, resumed_at=100) is ADDED


def test_every_field_of_a_table_info_is_kept() -> None:
    # name and topic come from the catalog; the derived fields from these
    assert set(fields_of(BEFORE)) == {
        "columns",
        "types",
        "key",
        "replica_identity",
        "not_null",
        "key_from_pk",
        "attnums",
        "relfilenode",
    }
