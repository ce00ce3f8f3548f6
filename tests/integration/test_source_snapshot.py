"""cdc-source against the real stack: the initial snapshot (its `r` events, `--snapshot never`,
a snapshot killed half way).
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import signal
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from tests.conftest import Databases, Stack
from tests.helpers import start_cli, wait_until
from tests.pipeline import (
    execute,
    source_args,
    start_source,
)
from tests.source_events import (
    Event,
    EventReader,
    count,
    describe,
    key_text,
    new_slot,
    state_records,
    topic_of,
)

# --- 6. initial snapshot -------------------------------------------------------------------


def test_initial_snapshot_then_changes(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE item (id int PRIMARY KEY, label text, flag boolean, n numeric(10,2))",
        "INSERT INTO item VALUES (1, 'one', true, 1.50), (2, 'two', false, NULL), (3, 'three', NULL, -2)",
        separately=True,
    )
    slot = new_slot()
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    items = topic_of(topic_prefix, "item")
    reader.wait_for([items], count(items, 3), "the snapshot", process)
    execute(
        dbs.source_dsn,
        "INSERT INTO item VALUES (4, 'four', true, 4)",
        "UPDATE item SET label = 'uno' WHERE id = 1",
        "DELETE FROM item WHERE id = 2",
        separately=True,
    )
    events = reader.wait_then_stop([items], count(items, 3 + 4), "the changes after the snapshot", process)

    reads, changes = events[:3], events[3:]
    assert {e.op for e in reads} == {"r"}, describe(events)
    assert {e.key: e.after for e in reads} == {
        b'{"id":1}': {"id": 1, "label": "one", "flag": True, "n": "1.50"},
        b'{"id":2}': {"id": 2, "label": "two", "flag": False, "n": None},
        b'{"id":3}': {"id": 3, "label": "three", "flag": None, "n": "-2.00"},
    }
    [state] = [s for s in state_records(stack.bootstrap_servers, topic_prefix, slot) if s is not None][-1:]
    assert state["snapshot"] == "done"
    for e in reads:
        assert e.before is None
        src = e.source
        assert src["snapshot"] is True and src["txId"] is None
        assert src["lsn"] == state["snapshot_lsn"] and src["commit_lsn"] == state["snapshot_lsn"] - 1, (
            "a snapshot row is read at the consistent point, positioned just before it"
        )
    assert sorted(e.source["seq"] for e in reads) == [1, 2, 3]
    assert [(e.key, e.op) for e in changes] == [
        (b'{"id":4}', "c"),
        (b'{"id":1}', "u"),
        (b'{"id":2}', "d"),
        (b'{"id":2}', None),
    ], describe(events)
    for e in changes[:3]:
        assert e.source["snapshot"] is False
        assert e.source["commit_lsn"] >= state["snapshot_lsn"]
    assert changes[1].after == {"id": 1, "label": "uno", "flag": True, "n": "1.50"}

    # A restart resumes the slot: no second snapshot.
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    execute(dbs.source_dsn, "INSERT INTO item VALUES (5, 'five', false, 5)")
    events = reader.wait_then_stop([items], count(items, 8), "the change after the restart", process)
    assert [(e.key, e.op) for e in events[7:]] == [(b'{"id":5}', "c")], describe(events)
    assert sum(e.op == "r" for e in events) == 3
    reader.assert_valid()


def test_snapshot_never_publishes_no_reads(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE item (id int PRIMARY KEY, label text)",
        "INSERT INTO item VALUES (1, 'old'), (2, 'old')",
        separately=True,
    )
    slot = new_slot()
    process = start_source(dbs, topic_prefix, slot, "--snapshot", "never", streaming=True)
    execute(
        dbs.source_dsn,
        "INSERT INTO item VALUES (3, 'new')",
        "UPDATE item SET label = 'changed' WHERE id = 1",
        separately=True,
    )
    items = topic_of(topic_prefix, "item")
    events = reader.wait_then_stop([items], count(items, 2), "the changes", process)
    assert [(e.key, e.op) for e in events] == [(b'{"id":3}', "c"), (b'{"id":1}', "u")], describe(events)
    assert events[1].after == {"id": 1, "label": "changed"}
    states = [s for s in state_records(stack.bootstrap_servers, topic_prefix, slot) if s is not None]
    assert states and states[-1]["snapshot"] == "skipped"
    reader.assert_valid()


def replay(events: list[Event]) -> dict[str, Any]:
    """What a consumer replaying the topic from the start ends up with: the rows by key."""
    rows: dict[str, Any] = {}
    for e in events:
        if e.value is None or e.op == "d":
            rows.pop(key_text(e.key), None)
        elif e.op == "t":
            rows.clear()
        else:
            rows[key_text(e.key)] = e.after
    return rows


def test_snapshot_killed_half_way_is_replaced_not_mixed(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    """kill -9 during the initial snapshot, rows deleted meanwhile, restart: the new snapshot starts
    with a truncate, so replaying the topic gives today's table, not the deleted rows back."""
    execute(
        dbs.source_dsn,
        "CREATE TABLE public.big (id integer PRIMARY KEY, pad text)",
        "INSERT INTO public.big SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g",
        separately=True,
    )
    slot, topic = new_slot(), topic_of(topic_prefix, "big")
    first = start_cli(source_args(dbs, topic_prefix, slot))
    probe = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": "probe", "log_level": 0})

    def published() -> int:
        if first.poll() is not None:
            raise AssertionError(f"cdc-source exited:\n{first.stderr_text()}")
        try:
            return int(probe.get_watermark_offsets(TopicPartition(topic, 0), timeout=2)[1])
        except Exception:
            return 0

    wait_until(lambda: published() > 0, timeout=120, interval=0.05, message="no snapshot row published")
    first.send_signal(signal.SIGKILL)
    probe.close()
    first.wait(30)
    execute(dbs.source_dsn, "DELETE FROM public.big WHERE id <= 500")
    again = start_source(dbs, topic_prefix, slot, streaming=True)
    events = reader.wait_then_stop([topic], count(topic, 100000 - 500), "the second snapshot", again, timeout=240)
    reads = [e for e in events if e.op == "r"]
    assert len(reads) > 100000 - 500, (
        f"the first snapshot did not publish anything before the kill ({len(reads)} reads)"
    )
    assert any(e.op == "t" for e in events), (
        f"the restarted snapshot did not begin with a truncate ({len(reads)} reads):\n{again.stderr_text()}"
    )
    replayed = replay(events)
    assert len(replayed) == 100000 - 500
    assert "1" not in replayed and "500" not in replayed and "501" in replayed
    reader.assert_valid()
