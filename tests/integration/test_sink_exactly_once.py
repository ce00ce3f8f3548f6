"""cdc-sink end to end: a change the target already has is never written again, whatever the topics
hold (a change published twice, a new consumer group reading them from the start), and a pipeline
started over on a target another one filled ends identical or is refused with the fix."""

from typing import Any

import pytest
from confluent_kafka import Producer

from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, run_cli
from tests.pipeline import (
    error_line,
    execute,
    partition_ends,
    read_all,
    run_sink,
    source_args,
    start_sink,
    start_source,
    stop_cleanly,
    stored_offsets,
    wait_for_output,
    wait_identical,
    wait_while_running,
)
from tests.sink_runs import topic_of

TABLE = "public.items"
SOURCE_TABLE = "CREATE TABLE public.items (id integer PRIMARY KEY, v text NOT NULL, n integer NOT NULL)"
# Every row write on the target, per key: inserts, updates and deletes. ENABLE ALWAYS: the sink
# applies as a replica (session_replication_role), where ordinary triggers do not fire.
WRITE_COUNTER = (
    "CREATE SCHEMA audit",
    'CREATE TABLE audit.writes (op "char" NOT NULL, key integer NOT NULL)',
    """CREATE FUNCTION audit.count_write() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO audit.writes VALUES ('d', OLD.id);
        ELSE
            INSERT INTO audit.writes VALUES (lower(left(TG_OP, 1)), NEW.id);
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER count_write AFTER INSERT OR UPDATE OR DELETE ON public.items "
    "FOR EACH ROW EXECUTE FUNCTION audit.count_write()",
    "ALTER TABLE public.items ENABLE ALWAYS TRIGGER count_write",
)


def writes(dbs: Databases) -> int:
    return int(psql_rows(dbs.target_dsn, "SELECT count(*) FROM audit.writes")[0][0])


def changes(dbs: Databases, first: int) -> None:
    """Inserts, updates and deletes of ids from `first` on, in a few transactions."""
    execute(
        dbs.source_dsn,
        f"INSERT INTO public.items SELECT g, 'v' || g, 0 FROM generate_series({first}, {first + 199}) g",
        f"UPDATE public.items SET n = n + 1, v = v || '+' WHERE id % 3 = 0 AND id >= {first}",
        f"DELETE FROM public.items WHERE id % 5 = 0 AND id >= {first}",
        f"UPDATE public.items SET n = n + 10 WHERE id % 7 = 0 AND id >= {first}",
        separately=True,
    )


def wait_applied(dbs: Databases, bootstrap: str, group: str, processes: Any) -> None:
    ends = partition_ends(bootstrap, [t for t in {topic for topic, _ in stored_offsets(dbs, group)}])

    def applied() -> bool:
        stored = stored_offsets(dbs, group)
        return all((stored.get(tp) or 0) >= end for tp, end in ends.items())

    wait_while_running(applied, processes, timeout=90, message="the sink never reached the ends of its topics")


def publish_again(bootstrap: str, topic: str) -> int:
    """Every message of `topic` appended to its own partition once more, headers and all: the topic
    then holds each change twice (as an older source that crashed, or a copied topic, leaves it)."""
    producer = Producer({"bootstrap.servers": bootstrap})
    messages = read_all(bootstrap, topic)
    for m in messages:
        producer.produce(topic, m.value(), m.key(), m.partition(), headers=m.headers())
    assert producer.flush(30) == 0
    return len(messages)


def prepare(dbs: Databases) -> None:
    execute(dbs.source_dsn, SOURCE_TABLE)
    execute(dbs.target_dsn, SOURCE_TABLE, *WRITE_COUNTER)


def test_changes_the_topic_holds_twice_and_a_new_group_write_nothing_again(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    slot, group = f"slot_{dbs.name}", f"group_{topic_prefix}"
    prepare(dbs)
    changes(dbs, 1)  # for the initial snapshot's `r` events
    source = start_source(dbs, topic_prefix, slot, "--partitions", "3", streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group, "--snapshot", "topic")
    changes(dbs, 1000)
    wait_identical(dbs, [TABLE], processes=(source, sink))
    wait_applied(dbs, stack.bootstrap_servers, group, (source, sink))
    before = writes(dbs)

    doubled = publish_again(stack.bootstrap_servers, topic_of(topic_prefix, TABLE))
    changes(dbs, 2000)  # and new changes after them
    wait_identical(dbs, [TABLE], processes=(source, sink))
    wait_applied(dbs, stack.bootstrap_servers, group, (source, sink))
    new_writes = writes(dbs) - before
    assert 0 < new_writes <= 200 + 67 + 40 + 29, f"{new_writes} writes for the changes from id 2000 on"
    wait_for_output(sink, "skipped", timeout=30)
    skipped = [line for line in sink.stderr_text().splitlines() if "the target already had" in line]
    assert skipped, sink.stderr_text()[-3000:]
    stop_cleanly(sink)
    assert doubled > 0
    after_doubles = writes(dbs)

    # a new consumer group on the same target reads every topic from the start: nothing is written
    again = run_sink(dbs, topic_prefix, slot, f"{group}_new", "--snapshot", "topic", "--once", timeout=120)
    assert again.returncode == 0, again.stderr
    assert writes(dbs) == after_doubles, "a new group wrote rows the target already had"
    wait_identical(dbs, [TABLE], processes=(source,))
    stop_cleanly(source)


@pytest.mark.parametrize("variant", ["new slot", "new slot and group", "new prefix"])
def test_a_pipeline_started_over_on_a_filled_target(
    dbs: Databases, stack: Stack, topic_prefix: str, variant: str
) -> None:
    """Pipeline A fills the target and is stopped, its slot dropped; the source changes while
    nothing runs (50 rows deleted among others); pipeline B starts. The target ends identical, or
    the sink refuses with the command that starts it over."""
    slot, group = f"slot_{dbs.name}", f"group_{topic_prefix}"
    prepare(dbs)
    changes(dbs, 1)
    source = start_source(dbs, topic_prefix, slot, streaming=True)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_identical(dbs, [TABLE], processes=(source, sink))
    stop_cleanly(sink, source)
    dropped = run_cli(source_args(dbs, topic_prefix, slot, "drop-slot"), timeout=60)
    assert dropped.returncode == 0, dropped.stderr

    execute(
        dbs.source_dsn, "DELETE FROM public.items WHERE id <= 80 AND id % 5 <> 0", separately=True
    )  # 50 rows (5 of 10 were gone)
    changes(dbs, 500)

    prefix_b = f"{topic_prefix}b" if variant == "new prefix" else topic_prefix
    group_b = group if variant == "new slot" else f"{group}_b"
    source_b = start_source(dbs, prefix_b, f"{slot}_b", streaming=True)
    if variant == "new prefix":
        refused = run_sink(dbs, prefix_b, f"{slot}_b", group_b, timeout=120)
        line = error_line("cdc-sink", refused, alone=False)
        assert f"was filled from topic {topic_of(topic_prefix, TABLE)}" in line, refused.stderr
        assert "cdc-sink rebuild --tables public.items" in line, line
        rebuilt = run_sink(
            dbs, prefix_b, f"{slot}_b", group_b, "rebuild", "--tables", TABLE, "--once", timeout=120
        )
        assert rebuilt.returncode == 0, rebuilt.stderr
    sink_b = start_sink(dbs, prefix_b, f"{slot}_b", group_b)
    changes(dbs, 3000)
    wait_identical(dbs, [TABLE], processes=(source_b, sink_b))
    if variant != "new prefix":
        assert "truncate event" in source_b.stderr_text(), source_b.stderr_text()[-2000:]
    stop_cleanly(sink_b, source_b)
