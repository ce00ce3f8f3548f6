"""cdc-sink end to end: a poison message stops the sink at its offset (--on-error fail) or goes to
the dead-letter topic (--on-error dlq)."""

import dataclasses
from typing import Any

import orjson
import pytest

from tests.conftest import Databases, Stack
from tests.helpers import CliProcess, psql_rows
from tests.pipeline import (
    error_lines,
    execute,
    partition_ends,
    produce,
    read_all,
    rows_as_text,
    run_sink,
    start_source,
    stop_cleanly,
    stored_offsets,
    verify,
    wait_high_watermark,
)
from tests.sink_runs import names_of, topic_of

POISON_KEY = b'{"id":3}'  # a key as the source writes it (compact JSON of the key columns)
POISON_REASON = {"not-json": "not JSON", "bad-value": 'invalid input syntax for type integer: "abc"'}


@dataclasses.dataclass
class Poisoned:
    """A topic holding: the table's snapshot, changes A, the poison message at `offset`, changes B."""

    topic: str
    offset: int
    value: bytes
    before: list[dict[str, str | None]]  # the source's rows when the poison was produced


def without_position(envelope: dict[str, Any]) -> None:
    """Another producer's message: a copy keeping the real change's source position would be one the
    target already has, and skipped as such (applied.py)."""
    del envelope["source"]["seq"], envelope["source"]["stream"]


def poison_topic(dbs: Databases, stack: Stack, prefix: str, kind: str) -> Poisoned:
    """With cdc-source running and a first sink run done: changes A, the poison, changes B (none of
    them to the poison's key)."""
    table = "public.p"
    topic = topic_of(prefix, table)
    execute(
        dbs.source_dsn,
        "INSERT INTO public.p SELECT g, g, 't' || g FROM generate_series(11, 15) g",
        "UPDATE public.p SET n = 100 WHERE id = 1",
        "DELETE FROM public.p WHERE id = 2",
    )
    wait_high_watermark(stack.bootstrap_servers, topic, 10 + 8)  # 5 inserts, 1 update, delete + tombstone
    before = rows_as_text(dbs.source_dsn, table)
    if kind == "not-json":
        value = b'{"op": "u", "after": {"id": 3, "n": 3} this is not JSON'
    else:  # a real envelope (of the insert of 15) turned into an update of key 3 with a bad integer
        [real] = [m for m in read_all(stack.bootstrap_servers, topic) if m.key() == b'{"id":15}']
        envelope = orjson.loads(real.value())
        envelope.update(op="u", before=None, after={"id": 3, "n": "abc", "t": "poison"})
        without_position(envelope)
        value = orjson.dumps(envelope)
    assert produce(stack.bootstrap_servers, topic, POISON_KEY, value) == (0, 18)
    execute(
        dbs.source_dsn,
        "INSERT INTO public.p SELECT g, g, 't' || g FROM generate_series(16, 17) g",
        "UPDATE public.p SET n = 400 WHERE id = 4",
        "DELETE FROM public.p WHERE id = 5",
    )
    wait_high_watermark(stack.bootstrap_servers, topic, 19 + 5)
    return Poisoned(topic, 18, value, before)


def start_with_table_p(dbs: Databases, stack: Stack, prefix: str, group: str, *mode: str) -> CliProcess:
    """Table p with 10 rows, cdc-source running, and a first sink run (bulk copy) to the end."""
    slot, _ = names_of(dbs, prefix)
    execute(
        dbs.source_dsn,
        "CREATE TABLE public.p (id integer PRIMARY KEY, n integer, t text)",
        "INSERT INTO public.p SELECT g, g, 't' || g FROM generate_series(1, 10) g",
    )
    source = start_source(dbs, prefix, slot)
    wait_high_watermark(stack.bootstrap_servers, topic_of(prefix, "public.p"), 10)
    first = run_sink(dbs, prefix, slot, group, *mode, "--once")
    assert first.returncode == 0, first.stderr
    return source


def dead_letters(stack: Stack, topic: str) -> list[Any]:
    dlq = topic + ".dlq"
    if not partition_ends(stack.bootstrap_servers, [dlq]):
        return []
    return read_all(stack.bootstrap_servers, dlq)


@pytest.mark.parametrize("kind", ["not-json", "bad-value"])
def test_poison_message_stops_the_sink_at_its_offset(
    dbs: Databases, stack: Stack, topic_prefix: str, kind: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    source = start_with_table_p(dbs, stack, topic_prefix, group)
    poisoned = poison_topic(dbs, stack, topic_prefix, kind)
    for _ in range(2):  # and again at the same place when restarted
        result = run_sink(dbs, topic_prefix, slot, group, "--once", timeout=60)
        assert result.returncode == 1, f"exit {result.returncode}:\n{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        [line] = error_lines(result.stderr)
        for part in (f"{poisoned.topic}[0]", f"offset {poisoned.offset}", POISON_REASON[kind]):
            assert part in line, f"{part!r} is not in the error line: {line}"
        assert stored_offsets(dbs, group) == {(poisoned.topic, 0): poisoned.offset}
        assert rows_as_text(dbs.target_dsn, "public.p") == poisoned.before, (
            "not exactly what came before the poison"
        )
    stop_cleanly(source)


@pytest.mark.parametrize("kind", ["not-json", "bad-value"])
def test_poison_message_goes_to_the_dead_letter_topic(
    dbs: Databases, stack: Stack, topic_prefix: str, kind: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    source = start_with_table_p(dbs, stack, topic_prefix, group, "--on-error", "dlq")
    poisoned = poison_topic(dbs, stack, topic_prefix, kind)
    result = run_sink(dbs, topic_prefix, slot, group, "--on-error", "dlq", "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert verify(dbs, ["public.p"]).returncode == 0, "the changes around the poison were not all applied"
    [letter] = dead_letters(stack, poisoned.topic)
    assert (letter.key(), letter.value()) == (POISON_KEY, poisoned.value), "not the original bytes"
    headers = {k: v.decode() for k, v in letter.headers()}
    assert POISON_REASON[kind] in headers["cdc.reason"], headers
    assert headers["cdc.origin.topic"] == poisoned.topic
    assert headers["cdc.origin.partition"] == "0"
    assert headers["cdc.origin.offset"] == str(poisoned.offset)

    # later changes of the poison's key are parked in the dead-letter topic too, the others applied
    execute(
        dbs.source_dsn,
        "UPDATE public.p SET n = 300 WHERE id = 3",
        "UPDATE public.p SET n = 600 WHERE id = 6",
        "INSERT INTO public.p VALUES (18, 18, 't18')",
    )
    wait_high_watermark(stack.bootstrap_servers, poisoned.topic, 24 + 3)
    result = run_sink(dbs, topic_prefix, slot, group, "--on-error", "dlq", "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    stop_cleanly(source)
    expected = [
        next(r for r in poisoned.before if r["id"] == "3") if row["id"] == "3" else row
        for row in rows_as_text(dbs.source_dsn, "public.p")
    ]
    assert rows_as_text(dbs.target_dsn, "public.p") == expected
    first, parked = dead_letters(stack, poisoned.topic)
    assert first.offset() == letter.offset()
    headers = {k: v.decode() for k, v in parked.headers()}
    assert parked.key() == POISON_KEY
    assert orjson.loads(parked.value())["after"]["n"] == 300, "not the original bytes"
    assert "parked" in headers["cdc.reason"], headers
    assert (headers["cdc.origin.partition"], headers["cdc.origin.offset"]) == ("0", "24")
    assert stored_offsets(dbs, group) == {(poisoned.topic, 0): 27}
    parked_keys = psql_rows(
        dbs.target_dsn,
        "SELECT topic, convert_from(key, 'UTF8'), first_offset FROM cdc_sink.parked WHERE group_id = %s",
        (group,),
    )
    assert parked_keys == [(poisoned.topic, POISON_KEY.decode(), poisoned.offset)]


@pytest.mark.parametrize("on_error", ["fail", "dlq"])
def test_poison_followed_by_a_change_of_its_key_in_one_batch(
    dbs: Databases, stack: Stack, topic_prefix: str, on_error: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    mode = ("--on-error", on_error)
    source = start_with_table_p(dbs, stack, topic_prefix, group, *mode)
    topic = topic_of(topic_prefix, "public.p")
    [real] = [m for m in read_all(stack.bootstrap_servers, topic) if m.key() == POISON_KEY]
    envelope = orjson.loads(real.value())
    envelope.update(op="u", before=None, after={"id": 3, "n": "abc", "t": "poison"})
    without_position(envelope)
    assert produce(stack.bootstrap_servers, topic, POISON_KEY, orjson.dumps(envelope)) == (0, 10)
    execute(dbs.source_dsn, "UPDATE public.p SET n = 300 WHERE id = 3")
    wait_high_watermark(stack.bootstrap_servers, topic, 12)
    result = run_sink(dbs, topic_prefix, slot, group, *mode, "--once", timeout=60)
    stop_cleanly(source)
    assert psql_rows(dbs.target_dsn, "SELECT n FROM public.p WHERE id = 3") == [(3,)], "applied past the poison"
    if on_error == "fail":
        assert result.returncode == 1, f"exit {result.returncode}: the poison went unnoticed"
    else:
        assert len(dead_letters(stack, topic)) == 2, "the poison and the change behind it were not dead-lettered"
