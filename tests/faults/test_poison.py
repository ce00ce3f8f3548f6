"""Scenario 8: a poison message lands in a change topic while the workload runs, for each --on-error
mode. fail: the sink stops with one line naming the topic, partition and offset, having applied
everything before it and nothing after (and an operator can continue with --on-error dlq). dlq: the
message and every later change of its key go to <topic>.dlq with their origin, the rest is applied.

The poison goes to the topic of a small table `p` the writer does not touch (so the writer's tables
end identical and the poisoned key's fate can be stated exactly); the sink's batches mix it with the
writer's topics."""

import random

import orjson

from schemas.topics import dlq_topic, topic_for
from tests.conftest import Databases, Stack
from tests.faults.harness import Pipeline, ScenarioReport, Writer, final_check, prepare_tables, settle
from tests.helpers import CliProcess, wait_until
from tests.pipeline import (
    WRITER_TABLES,
    error_lines,
    execute,
    partition_ends,
    produce,
    read_all,
    rows_as_text,
    stop_cleanly,
    stored_offsets,
    table_name,
    verify,
    wait_for_output,
    while_running,
)

P = "public.p"
REASONS = {"not-json": "value is not JSON", "bad-value": "invalid input syntax for type integer"}


def poison_value(pipeline: Pipeline, key: int, kind: str) -> bytes:
    """Bytes that are not JSON, or a well-formed update event the target rejects (n is an integer)."""
    if kind == "not-json":
        return b'{"op": "u", "after": {"id": ' + str(key).encode() + b", truncated"
    topic = topic_for(pipeline.prefix, table_name(P))
    [real] = [m for m in read_all(pipeline.bootstrap, topic) if m.key() == key_of(key) and m.value()][:1]
    envelope = orjson.loads(real.value())
    envelope.update(op="u", before=None, after={"id": key, "n": "abc", "t": "poison"})
    # no source position: a copy keeping the real change's would be a change the target already has
    del envelope["source"]["seq"], envelope["source"]["stream"]
    return orjson.dumps(envelope)


def key_of(key: int) -> bytes:
    return b'{"id":' + str(key).encode() + b"}"


def start(
    dbs: Databases, stack: Stack, topic_prefix: str, on_error: str
) -> tuple[Pipeline, Writer, CliProcess, CliProcess]:
    pipeline = Pipeline(dbs, stack.bootstrap_servers, topic_prefix)
    prepare_tables(dbs.source_dsn, dbs.target_dsn)
    execute(
        dbs.source_dsn,
        f"CREATE TABLE {P} (id integer PRIMARY KEY, n integer, t text)",
        f"INSERT INTO {P} SELECT g, g, 't' || g FROM generate_series(1, 20) g",
    )
    writer = Writer(dbs.source_dsn, rate=300)
    source = pipeline.start_source()
    wait_for_output(source, "streaming from slot")
    sink = pipeline.start_sink("--on-error", on_error)
    pipeline.wait_applying([source, sink, writer.process], minimum=200)
    return pipeline, writer, source, sink


def test_poison_message_stops_the_sink_in_fail_mode(
    dbs: Databases, stack: Stack, topic_prefix: str, long_run: bool, report: ScenarioReport
) -> None:
    pipeline, writer, source, sink = start(dbs, stack, topic_prefix, "fail")
    topic = topic_for(topic_prefix, table_name(P))
    dead = 0
    for n, kind in enumerate(["not-json", "bad-value"] if long_run else ["not-json"]):
        settle(random.uniform(0.5, 2.0), [source, sink, writer.process])
        key = 1 + n  # never changed on the source afterwards: its row stays as it was
        before = rows_as_text(dbs.target_dsn, P)
        partition, offset = produce(pipeline.bootstrap, topic, key_of(key), poison_value(pipeline, key, kind))
        wait_until(
            while_running([source, writer.process], lambda: sink.poll() is not None),  # noqa: B023
            timeout=60,
            message="the sink did not stop at the poison message",
        )
        stderr = sink.stderr_text()
        assert sink.returncode == 1, f"exit {sink.returncode}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
        [line] = error_lines(stderr)
        for part in (f"{topic}[{partition}]", f"offset {offset}", REASONS[kind]):
            assert part in line, f"{part!r} is not in the error line: {line}"
        # everything before the poison is applied, nothing after it
        assert stored_offsets(dbs, pipeline.group)[(topic, partition)] == offset
        assert rows_as_text(dbs.target_dsn, P) == before
        report.add(f"poison ({kind}) in {P}, --on-error fail", f"stopped at {topic}[{partition}]@{offset}")

        # the operator moves it aside: a run with --on-error dlq sends it to the dead-letter topic
        sink = pipeline.start_sink("--on-error", "dlq")
        wait_until(
            while_running(
                [source, sink, writer.process],
                lambda: (stored_offsets(dbs, pipeline.group).get((topic, partition)) or 0) > offset,  # noqa: B023
            ),
            timeout=60,
            message="the dlq run did not get past the poison",
        )
        dead += 1
        if n + 1 < (2 if long_run else 1):  # back to fail mode for the next one
            stop_cleanly(sink)
            sink = pipeline.start_sink("--on-error", "fail")

    settle(1.0, [source, sink, writer.process])
    report.operations = writer.stop()
    final_check(pipeline, report, [source, sink], tables=[*WRITER_TABLES, P])
    letters = read_all(pipeline.bootstrap, dlq_topic(topic))
    assert len(letters) == dead, f"{len(letters)} dead letters, {dead} expected"
    stop_cleanly(sink, source)


def test_poison_message_and_later_changes_of_its_key_go_to_the_dead_letter_topic(
    dbs: Databases, stack: Stack, topic_prefix: str, long_run: bool, report: ScenarioReport
) -> None:
    pipeline, writer, source, sink = start(dbs, stack, topic_prefix, "dlq")
    processes = [source, sink, writer.process]
    topic = topic_for(topic_prefix, table_name(P))
    kinds = ["bad-value", "not-json"] if long_run else ["bad-value"]
    poisoned: dict[str, dict[str, str | None]] = {}  # key -> its row on the target before the poison
    parked = 0
    for n, kind in enumerate(kinds):
        settle(random.uniform(0.5, 2.0), processes)
        key = 3 + n
        [row] = [r for r in rows_as_text(dbs.target_dsn, P) if r["id"] == str(key)]
        poisoned[str(key)] = row
        partition, offset = produce(pipeline.bootstrap, topic, key_of(key), poison_value(pipeline, key, kind))
        report.add(f"poison ({kind}) in {P}, --on-error dlq", f"{topic}[{partition}]@{offset}")
        # later changes of the same key are parked behind it; other keys go on
        for _ in range(2):
            execute(dbs.source_dsn, f"UPDATE {P} SET n = n + 100 WHERE id = {key}")
            parked += 1
        execute(dbs.source_dsn, f"UPDATE {P} SET n = n + 1000, t = 'moved on' WHERE id = {10 + n}")
        execute(dbs.source_dsn, f"INSERT INTO {P} VALUES ({100 + n}, 1, 'after the poison')")

    settle(1.0, processes)
    report.operations = writer.stop()
    final_check(
        pipeline,
        report,
        [source, sink],
        tables=[*WRITER_TABLES, P],
        exclude={P: set(poisoned)},
        verify_tables=WRITER_TABLES,
    )
    # the poisoned keys kept their row from before the poison; cdc-verify names exactly them
    target = {r["id"]: r for r in rows_as_text(dbs.target_dsn, P)}
    for poisoned_key, row in poisoned.items():
        assert target[poisoned_key] == row, f"key {poisoned_key} changed on the target after its poison"
    result = verify(dbs, [P], "--json")
    [found] = orjson.loads(result.stdout)
    assert sorted(found["changed"]) == sorted(f"({k})" for k in poisoned), found
    assert not found["missing"] and not found["extra"], found
    # the dead-letter topic: each poison with its origin, then the parked changes of its key
    letters = read_all(pipeline.bootstrap, dlq_topic(topic))
    assert len(letters) == len(kinds) + parked, [m.headers() for m in letters]
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers()}
        assert headers["cdc.origin.topic"] == topic
        assert letter.key() in {key_of(int(k)) for k in poisoned}
    reasons = [dict(m.headers())["cdc.reason"].decode() for m in letters]
    assert sum("parked" in r for r in reasons) == parked, reasons
    assert partition_ends(pipeline.bootstrap, [topic])
    stop_cleanly(sink, source)
