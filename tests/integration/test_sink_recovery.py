"""cdc-sink end to end: kill -9 in the middle of applying loses and repeats nothing; `cdc-sink
rebuild` restores the target from the topics alone."""

import dataclasses
import random
import signal
import time

from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, stop_process
from tests.pipeline import (
    WRITER_TABLES,
    assert_same_rows,
    clone_table,
    execute,
    partition_ends,
    run_sink,
    run_writer,
    start_sink,
    start_source,
    start_writer,
    stop_cleanly,
    stored_offsets,
    tables_option,
    verify,
    wait_for_output,
    wait_identical,
    wait_while_running,
)
from tests.sink_runs import applied_offsets, names_of, topic_of

# An AFTER INSERT trigger per row counting the inserts of every key, in a schema nothing replicates.
# ENABLE ALWAYS: the sink applies as a replica (session_replication_role), where ordinary triggers
# do not fire.
INSERT_COUNTER = (
    "CREATE SCHEMA audit",
    "CREATE TABLE audit.inserts (tbl text NOT NULL, key text NOT NULL, n integer NOT NULL, PRIMARY KEY (tbl, key))",
    """CREATE FUNCTION audit.count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO audit.inserts VALUES (TG_TABLE_NAME, NEW.id::text, 1)
        ON CONFLICT (tbl, key) DO UPDATE SET n = audit.inserts.n + 1;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER count_insert AFTER INSERT ON public.person FOR EACH ROW EXECUTE FUNCTION audit.count_insert()",
    "CREATE TRIGGER count_insert AFTER INSERT ON public.orders FOR EACH ROW EXECUTE FUNCTION audit.count_insert()",
    "ALTER TABLE public.person ENABLE ALWAYS TRIGGER count_insert",
    "ALTER TABLE public.orders ENABLE ALWAYS TRIGGER count_insert",
)


def insert_counts(dsn: str) -> dict[tuple[str, str], int]:
    return {(t, k): n for t, k, n in psql_rows(dsn, "SELECT tbl, key, n FROM audit.inserts")}


def test_kill_9_mid_apply_loses_and_repeats_nothing(dbs: Databases, stack: Stack, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    run_writer(dbs, "--count", "0")  # creates the writer's tables
    execute(dbs.source_dsn, *INSERT_COUNTER)
    for table in WRITER_TABLES:  # empty tables of the same definition: the bulk copy accepts them
        clone_table(dbs.source_dsn, dbs.target_dsn, table)
    execute(dbs.target_dsn, *INSERT_COUNTER)
    run_writer(dbs, "--count", "2000", "--rate", "0", "--batch", "10")  # rows for the bulk copy

    source = start_source(dbs, topic_prefix, slot, "--exclude-tables", "audit.*")  # the counter stays out
    writer = start_writer(dbs, "--count", "40000", "--rate", "0", "--batch", "10")  # a backlog
    topics = [topic_of(topic_prefix, t) for t in WRITER_TABLES]

    def caught_up() -> bool:  # nothing left to apply (only once the writer is done)
        if writer.poll() is None:
            return False
        stored = stored_offsets(dbs, group)
        return all(
            (stored.get(tp) or 0) >= end for tp, end in partition_ends(stack.bootstrap_servers, topics).items()
        )

    rng = random.Random()
    for _ in range(3):
        sink = start_sink(dbs, topic_prefix, slot, group, "--batch-size", "200")
        before = applied_offsets(dbs, group)
        wait_while_running(
            lambda: applied_offsets(dbs, group) > before or caught_up(),  # noqa: B023
            (source, sink),
            timeout=60,
            message="the restarted sink applied nothing",
        )
        time.sleep(rng.uniform(0.05, 1.0))  # a random moment of the apply loop
        assert stop_process(sink, signal.SIGKILL) == -signal.SIGKILL
    sink = start_sink(dbs, topic_prefix, slot, group, "--batch-size", "200")
    assert writer.wait(timeout=300) == 0, writer.stderr_text()
    wait_identical(dbs, WRITER_TABLES, timeout=180, processes=(source, sink))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(sink, source)

    source_counts, target_counts = insert_counts(dbs.source_dsn), insert_counts(dbs.target_dsn)
    assert target_counts, "the target counted no insert at all"
    unknown = sorted(k for k in target_counts if k not in source_counts)
    assert not unknown, f"the target inserted keys the source never inserted: {unknown[:10]}"
    repeated = sorted((k, n, source_counts[k]) for k, n in target_counts.items() if n > source_counts[k])
    assert not repeated, (
        f"rows inserted more often on the target than on the source (key, target, source): {repeated[:10]}"
    )


def test_rebuild_restores_the_target_from_the_topics_alone(dbs: Databases, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    run_writer(dbs, "--count", "500", "--rate", "0", "--batch", "10")  # for the initial snapshot's `r` events
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group)
    wait_for_output(sink, "assigned", timeout=90)  # copy done: what follows reaches the target through Kafka
    run_writer(dbs, "--count", "1000", "--rate", "0", "--batch", "10", "--big-ratio", "0.1")  # streamed changes
    wait_identical(dbs, WRITER_TABLES, processes=(source, sink))
    stop_cleanly(sink, source)

    once = run_sink(dbs, topic_prefix, slot, group, "--once", timeout=60)
    assert once.returncode == 0, f"cdc-sink --once when caught up: exit {once.returncode}\n{once.stderr}"
    assert "caught up" in once.stderr, once.stderr

    execute(dbs.target_dsn, "DELETE FROM public.orders", "DELETE FROM public.person")
    assert verify(dbs, WRITER_TABLES).returncode == 1, "cdc-verify did not notice the emptied target"
    # from Kafka alone: the rebuild is not even given a reachable source database
    no_source = dataclasses.replace(dbs, source_dsn="postgresql://nobody:none@127.0.0.1:1/none")
    rebuilt = run_sink(
        no_source,
        topic_prefix,
        slot,
        group,
        "rebuild",
        "--tables",
        tables_option(WRITER_TABLES),
        "--once",
        timeout=180,
    )
    assert rebuilt.returncode == 0, f"cdc-sink rebuild exit {rebuilt.returncode}:\n{rebuilt.stderr}"
    result = verify(dbs, WRITER_TABLES)
    assert result.returncode == 0, f"not identical after the rebuild:\n{result.stdout}"
    assert_same_rows(dbs, WRITER_TABLES)

    again = run_sink(dbs, topic_prefix, slot, group, "--once", timeout=60)
    assert again.returncode == 0, f"cdc-sink --once after the rebuild: exit {again.returncode}\n{again.stderr}"
    assert_same_rows(dbs, WRITER_TABLES)
