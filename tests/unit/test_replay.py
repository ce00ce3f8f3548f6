"""Replay: messages read again after a restart are published only where their partition does not
hold them yet."""

import orjson
from hypothesis import given
from hypothesis import strategies as st

from schemas.codec import position as message_position
from schemas.envelope import TOMBSTONE_HEADER
from schemas.partitioner import partition_for
from source_connector.events import Message
from source_connector.replay import Replay

TOPIC = "cdc.public.t"
PARTITIONS = 3


def value(op: str, commit_lsn: int, seq: int) -> bytes:
    return orjson.dumps({"op": op, "source": {"commit_lsn": commit_lsn, "seq": seq}})


def change(op: str, commit_lsn: int, seq: int, key: int) -> Message:
    return (TOPIC, orjson.dumps({"id": key}), value(op, commit_lsn, seq), None, None)


def tombstone(commit_lsn: int, seq: int | None, key: int) -> Message:
    header = {"txId": 1, "lsn": commit_lsn, "commit_lsn": commit_lsn, "ts_us": 0}
    if seq is not None:
        header["seq"] = seq
    return (TOPIC, orjson.dumps({"id": key}), None, None, [(TOMBSTONE_HEADER, orjson.dumps(header))])


def partition_of(message: Message) -> int:
    return partition_for(message[1] or b"", PARTITIONS)


def test_positions_order_a_key_change_delete_tombstone_create() -> None:
    d, t, c = change("d", 100, 3, 1), tombstone(100, 3, 1), change("c", 100, 3, 2)
    positions = [message_position(m[2], m[4]) for m in (d, t, c)]
    assert positions == [(100, 3, 0), (100, 3, 1), (100, 3, 2)]
    assert message_position(None, tombstone(100, None, 1)[4]) is None  # written before tombstones had a seq
    assert message_position(b"not json", None) is None


def test_what_a_partition_holds_is_skipped_and_the_rest_published() -> None:
    stream = [change("c", 100, s, key) for s, key in enumerate(range(20), 1)]
    cut = 12  # the topics got the first 12; each partition holds its own part of them
    held: dict[tuple[str, int], tuple[int, int, int]] = {}
    for m in stream[:cut]:
        position = message_position(m[2], m[4])
        assert position is not None
        held[(TOPIC, partition_of(m))] = position
    replay = Replay(held, lambda topic: PARTITIONS)
    kept = [m for m in stream if replay.keep(m)]
    assert kept == stream[cut:]
    assert replay.skipped == cut and replay.done


def test_a_partition_that_got_less_before_the_crash_gets_the_rest() -> None:
    stream = [change("c", 100, s, key) for s, key in enumerate(range(30), 1)]
    by_partition: dict[int, list[Message]] = {}
    for m in stream:
        by_partition.setdefault(partition_of(m), []).append(m)
    # partition 0 received everything, the others only their first message
    held = {}
    for p, messages in by_partition.items():
        got = messages if p == 0 else messages[:1]
        position = message_position(got[-1][2], got[-1][4])
        assert position is not None
        held[(TOPIC, p)] = position
    replay = Replay(held, lambda topic: PARTITIONS)
    kept = [m for m in stream if replay.keep(m)]
    missing = [m for m in stream if partition_of(m) != 0 and m is not by_partition[partition_of(m)][0]]
    assert kept == missing


def test_a_tombstone_is_skipped_only_when_its_partition_holds_it() -> None:
    d, t = change("d", 200, 5, 7), tombstone(200, 5, 7)
    p = partition_of(d)
    only_delete = Replay({(TOPIC, p): (200, 5, 0)}, lambda topic: PARTITIONS)
    assert [only_delete.keep(d), only_delete.keep(t)] == [False, True]
    both = Replay({(TOPIC, p): (200, 5, 1)}, lambda topic: PARTITIONS)
    assert [both.keep(d), both.keep(t)] == [False, False]


def test_a_truncate_goes_by_its_own_partition() -> None:
    held = {(TOPIC, 0): (300, 1, 2)}
    replay = Replay(held, lambda topic: PARTITIONS)
    truncates = [(TOPIC, None, value("t", 300, 1), p, None) for p in range(PARTITIONS)]
    assert [replay.keep(m) for m in truncates] == [False, True, True]


def test_nothing_held_keeps_everything_and_checks_nothing() -> None:
    replay = Replay({}, lambda topic: PARTITIONS)
    assert replay.done
    assert replay.keep(change("c", 1, 1, 1))


@given(st.lists(st.integers(0, 50), min_size=1, max_size=60), st.data())
def test_each_message_is_published_once_whatever_the_cut(keys: list[int], data: st.DataObject) -> None:
    stream = [change("u", 100 + i // 7, i % 7 + 1, key) for i, key in enumerate(keys)]
    # Kafka got, per partition, some prefix of that partition's messages
    published: list[Message] = []
    held = {}
    for p in range(PARTITIONS):
        mine = [m for m in stream if partition_of(m) == p]
        got = mine[: data.draw(st.integers(0, len(mine)))]
        published += got
        if got:
            position = message_position(got[-1][2], got[-1][4])
            assert position is not None
            held[(TOPIC, p)] = position
    replay = Replay(held, lambda topic: PARTITIONS)
    again = [m for m in stream if replay.keep(m)]
    assert sorted(published + again, key=stream.index) == stream
    assert not set(map(stream.index, published)) & set(map(stream.index, again))
