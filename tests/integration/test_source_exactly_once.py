"""cdc-source publishes every change once: `kill -9` under load (key changes, deletes, three
partitions), five times, and the topics hold no two messages with the same source position, each
partition's positions strictly increase, and the topics still match the source table by table.
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import json
import signal
from collections import Counter
from typing import Any

from tests.conftest import Databases, Stack
from tests.helpers import stop_process, wait_until
from tests.integration.test_source_slot import differences, people, total
from tests.pipeline import read_all, start_source, start_writer, stop_cleanly
from tests.source_events import EventReader, new_slot, stop_source, topic_of

# The order of the messages one change gives (a key change: delete, tombstone, create).
RANK = {"d": 0, "c": 2, "u": 2, "r": 2, "t": 2}
TOMBSTONE = 1
KILLS = 5


def position(message: Any) -> tuple[int, int, int]:
    """(commit LSN, seq, rank) of a message, read from its envelope or its tombstone header."""
    if message.value() is None:
        header = json.loads(dict(message.headers())["cdc.source"])
        return header["commit_lsn"], header["seq"], TOMBSTONE
    envelope = json.loads(message.value())
    return envelope["source"]["commit_lsn"], envelope["source"]["seq"], RANK[envelope["op"]]


def publishing_problems(stack: Stack, topics: list[str]) -> list[str]:
    problems = []
    for topic in topics:
        messages = read_all(stack.bootstrap_servers, topic)
        positions = Counter(position(m) for m in messages)
        twice = {p: n for p, n in positions.items() if n > 1}
        if twice:
            problems.append(f"{topic}: {len(twice)} positions published more than once, e.g. {list(twice)[:5]}")
        last: dict[int, tuple[int, int, int]] = {}
        for m in messages:
            p, here = m.partition(), position(m)
            if p in last and here <= last[p]:
                problems.append(f"{topic}[{p}]@{m.offset()}: position {here} after {last[p]}")
            last[p] = here
    return problems


def test_kill_9_five_times_under_load_publishes_every_change_once(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    writer = start_writer(dbs, "--rate", "0", "--batch", "20", "--key-change-ratio", "0.1")
    wait_until(lambda: writer.poll() is not None or people(dbs) >= 200, timeout=120, message="no writes")
    slot = new_slot()
    topics = [topic_of(topic_prefix, "person"), topic_of(topic_prefix, "orders")]
    for kill in range(KILLS):
        source = start_source(dbs, topic_prefix, slot, "--partitions", "3", streaming=True)
        wanted = total(stack, topics) + 300 * (kill + 1)

        def streamed(source: Any = source, wanted: int = wanted) -> bool:
            return source.poll() is not None or total(stack, topics) > wanted

        wait_until(streamed, timeout=180, message=f"no changes streamed before kill {kill + 1}")
        assert source.poll() is None, f"cdc-source exited:\n{source.stderr_text()}"
        assert stop_process(source, signal.SIGKILL) == -signal.SIGKILL
    last = start_source(dbs, topic_prefix, slot, "--partitions", "3", streaming=True)
    stop_cleanly(writer)
    problems: list[str] = []

    def caught_up() -> bool:
        assert last.poll() is None, f"cdc-source exited:\n{last.stderr_text()}"
        problems[:] = differences(reader, dbs, topic_prefix)
        return not problems

    try:
        wait_until(caught_up, timeout=300, interval=1, message="the topics never matched the source")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {len(problems)} differences:\n" + "\n".join(problems[:20])) from None
    log = stop_source(last)
    assert publishing_problems(stack, topics) == []
    assert "not published twice" in log, log[-3000:]
    reader.assert_valid()
