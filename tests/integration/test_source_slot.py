"""cdc-source against the real stack: crash safety (kill -9 under load), its own connection lost,
drop-slot, and slots dropped or recreated behind its back.
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import signal

import psycopg2
from psycopg2 import sql

from pg_kafka_cdc.common.lsn import lsn_to_int
from schemas.topics import state_topic
from tests.conftest import Databases, Stack
from tests.helpers import psql_rows, run_cli, stop_process, wait_until
from tests.pipeline import (
    error_line,
    execute,
    partition_ends,
    read_all,
    source_args,
    start_source,
    start_writer,
)
from tests.source_events import (
    Event,
    EventReader,
    as_text,
    count,
    describe,
    key_text,
    new_slot,
    on,
    slot_row,
    source_text_rows,
    state_records,
    stop_source,
    topic_of,
)

# --- 11. crash safety ------------------------------------------------------------------------


def differences(reader: EventReader, dbs: Databases, prefix: str) -> list[str]:
    """What the topics miss or have wrong compared with the source tables (empty: none)."""
    problems: list[str] = []
    topics = {table: topic_of(prefix, table) for table in ("person", "orders")}
    events = reader.read(topics.values())
    for table, topic in topics.items():
        rows = source_text_rows(dbs, table)
        last: dict[str, Event] = {}
        for e in on(events, topic):  # one partition: offsets order every key's events
            last[key_text(e.key)] = e
        for key, row in rows.items():
            found = last.get(key)
            if found is None:
                problems.append(f"{table} id={key}: in the source, never in {topic}")
            elif found.op not in ("c", "u", "r"):
                problems.append(
                    f"{table} id={key}: in the source, but its last event is {found.op or 'a tombstone'}"
                )
            elif {k: as_text(v) for k, v in (found.after or {}).items()} != row:
                problems.append(
                    f"{table} id={key}: last event {found.op}@{found.offset} {found.after} != source {row}"
                )
        for key, e in last.items():
            if e.op in ("c", "u", "r") and key not in rows:
                problems.append(f"{table} id={key}: deleted in the source, last event {e.op}@{e.offset}")
    return problems


def total(stack: Stack, topics: list[str]) -> int:
    """Messages in `topics` so far (the sum of their high watermarks: nothing is ever deleted)."""
    return sum(partition_ends(stack.bootstrap_servers, topics).values())


def people(dbs: Databases) -> int:
    """Rows in the writer's person table (0 before the writer created it)."""
    found = psql_rows(dbs.source_dsn, "SELECT to_regclass('public.person') IS NOT NULL")
    return int(psql_rows(dbs.source_dsn, "SELECT count(*) FROM person")[0][0]) if found[0][0] else 0


def test_crash_safety_kill_9_loses_nothing(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    writer = start_writer(dbs, "--rate", "0", "--batch", "20")
    wait_until(
        lambda: writer.poll() is not None or people(dbs) >= 200,
        timeout=120,
        message="the writer never wrote 200 people",
    )
    assert writer.poll() is None, f"the writer exited:\n{writer.stderr_text()}"
    slot = new_slot()
    topics = [topic_of(topic_prefix, "person"), topic_of(topic_prefix, "orders")]

    # First kill: shortly after streaming began, with changes in flight.
    first = start_source(dbs, topic_prefix, slot, streaming=True)
    seen = total(stack, topics)
    wait_until(lambda: total(stack, topics) > seen + 200, timeout=120, message="no changes streamed")
    assert stop_process(first, signal.SIGKILL) == -signal.SIGKILL

    # Second kill: later in a run, once it has confirmed positions of its own to the slot.
    before = slot_row(dbs, slot)
    assert before is not None
    second = start_source(dbs, topic_prefix, slot, streaming=True)
    seen = total(stack, topics)

    def well_under_way() -> bool:
        assert second.poll() is None, f"the restarted connector exited:\n{second.stderr_text()}"
        row = slot_row(dbs, slot)
        assert row is not None
        return lsn_to_int(row[1]) > lsn_to_int(before[1]) and total(stack, topics) > seen + 3000

    wait_until(well_under_way, timeout=240, message="the restarted connector never confirmed a position")
    assert stop_process(second, signal.SIGKILL) == -signal.SIGKILL

    third = start_source(dbs, topic_prefix, slot, streaming=True)
    seen = total(stack, topics)
    wait_until(lambda: total(stack, topics) > seen + 500, timeout=120, message="no changes after the last restart")
    # Under sustained writes the slot's confirmed position keeps moving (it must not wait for an
    # idle moment: the source keeps all WAL since the last confirmed position).
    positions: set[int] = set()

    def slot_moves() -> bool:
        assert writer.poll() is None, f"the writer exited:\n{writer.stderr_text()}"
        row = slot_row(dbs, slot)
        assert row is not None
        positions.add(lsn_to_int(row[1]))
        return len(positions) >= 4

    wait_until(slot_moves, timeout=120, interval=0.5, message="the slot's confirmed_flush_lsn did not advance")
    assert stop_process(writer) == 0, f"the writer did not stop cleanly:\n{writer.stderr_text()}"

    problems: list[str] = []

    def caught_up() -> bool:
        assert third.poll() is None, f"cdc-source exited:\n{third.stderr_text()}"
        problems[:] = differences(reader, dbs, topic_prefix)
        return not problems

    try:
        wait_until(caught_up, timeout=300, interval=1, message="the topics never matched the source")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: {len(problems)} differences, first ones:\n" + "\n".join(problems[:20])
        ) from None
    stop_source(third)
    assert differences(reader, dbs, topic_prefix) == []

    # The slot never ran ahead of what the state topic says was confirmed.
    row = slot_row(dbs, slot)
    assert row is not None and row[0] is False, row
    confirmed = lsn_to_int(row[1])
    states = state_records(stack.bootstrap_servers, topic_prefix, slot)
    assert states and states[-1] is not None, states
    assert confirmed <= states[-1]["bound_lsn"], (row, states[-1])
    reader.assert_valid()


# --- 12. drop-slot, and slots that changed behind the connector's back -----------------------


def test_own_connection_lost_mid_transaction_releases_the_slot_and_confirms_again(
    stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    """The connector's own connection is gone and cannot come back (the database refuses
    connections) when a transaction needs a table lookup: the replication connection is closed at
    once (its walsender would hold the slot, and a server shutdown, until wal_sender_timeout), and
    once connections are allowed again the cut transaction is streamed and confirmed."""
    execute(
        dbs.source_dsn,
        "CREATE TABLE item (id int PRIMARY KEY, label text)",
        "INSERT INTO item VALUES (1, 'a')",
        separately=True,
    )
    slot = new_slot()
    items = topic_of(topic_prefix, "item")
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    admin = stack.source_admin_dsn
    writer = psycopg2.connect(dbs.source_dsn, connect_timeout=10)  # opened while connections are allowed
    try:
        psql_rows(
            admin,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = 'cdc-source' AND backend_type = 'client backend'",
            (dbs.name,),
        )
        psql_rows(admin, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(dbs.name)))
        try:
            with writer, writer.cursor() as cur:  # a new column: the source looks the table up again
                cur.execute("ALTER TABLE item ADD COLUMN extra integer")
                cur.execute("INSERT INTO item VALUES (2, 'b', 7)")
            wait_until(
                lambda: "cannot connect to the source database" in process.stderr_text(),
                timeout=30,
                message=f"the table lookup did not fail:\n{process.stderr_text()}",
            )
            wait_until(
                lambda: (
                    psql_rows(admin, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
                    == [(False,)]
                ),
                timeout=10,
                message="the slot stays active: the replication connection was not closed",
            )
        finally:
            psql_rows(admin, sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(dbs.name)))
    finally:
        writer.close()
    [(now,)] = psql_rows(admin, "SELECT pg_current_wal_lsn()::text")
    wait_until(
        lambda: (row := slot_row(dbs, slot)) is not None and lsn_to_int(row[1]) >= lsn_to_int(now),
        timeout=60,
        message=f"the slot never confirmed {now} after the cut transaction",
    )
    events = reader.wait_then_stop([items], count(items, 2), "the cut transaction", process)
    assert [(e.op, e.key) for e in events][-1] == ("c", b'{"id":2}'), describe(events)
    reader.assert_valid()


def test_drop_slot_then_new_snapshot(stack: Stack, dbs: Databases, topic_prefix: str, reader: EventReader) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE item (id int PRIMARY KEY, label text)",
        "INSERT INTO item VALUES (1, 'a'), (2, 'b')",
        separately=True,
    )
    slot = new_slot()
    items = topic_of(topic_prefix, "item")
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    execute(dbs.source_dsn, "INSERT INTO item VALUES (3, 'c')")
    reader.wait_for([items], count(items, 3), "snapshot and insert", process)
    stop_source(process)

    result = run_cli(source_args(dbs, topic_prefix, slot, "drop-slot"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"slot {slot} dropped; connector state cleared" in result.stdout
    assert slot_row(dbs, slot) is None, "drop-slot left the slot"
    assert state_records(stack.bootstrap_servers, topic_prefix, slot)[-1] is None, (
        "the state record is cleared by a tombstone"
    )
    shape_records = [
        r for r in read_all(stack.bootstrap_servers, state_topic(topic_prefix)) if b'"shape"' in (r.key() or b"")
    ]
    assert [r.value() is None for r in shape_records] == [False, True], "item's shape record, then its tombstone"

    process = start_source(dbs, topic_prefix, slot, streaming=True)
    events = reader.wait_then_stop([items], count(items, 7), "the new snapshot", process)
    # the new slot's snapshot starts with a truncate: a consumer replaying the topic drops the old stream
    assert [(e.op, e.key) for e in events] == [
        ("r", b'{"id":1}'),
        ("r", b'{"id":2}'),
        ("c", b'{"id":3}'),
        ("t", None),
        ("r", b'{"id":1}'),
        ("r", b'{"id":2}'),
        ("r", b'{"id":3}'),
    ], describe(events)
    assert events[4].source["lsn"] > events[0].source["lsn"], "the new snapshot is at the new slot's point"
    assert events[4].source["stream"] != events[0].source["stream"], "a new slot is a new stream"
    assert slot_row(dbs, slot) is not None

    result = run_cli(source_args(dbs, topic_prefix, slot + "_none", "drop-slot"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "did not exist" in result.stdout
    reader.assert_valid()


def one_insert_streamed(reader: EventReader, dbs: Databases, prefix: str, slot: str) -> str:
    """Table item, one insert streamed by cdc-source from `slot`, and cdc-source stopped; its topic."""
    execute(dbs.source_dsn, "CREATE TABLE item (id int PRIMARY KEY)")
    process = start_source(dbs, prefix, slot, streaming=True)
    execute(dbs.source_dsn, "INSERT INTO item VALUES (1)")
    items = topic_of(prefix, "item")
    reader.wait_for([items], count(items, 1), "the insert", process)
    stop_source(process)
    return items


def test_slot_dropped_while_stopped_is_refused(dbs: Databases, topic_prefix: str, reader: EventReader) -> None:
    slot = new_slot()
    items = one_insert_streamed(reader, dbs, topic_prefix, slot)

    psql_rows(dbs.source_dsn, "SELECT pg_drop_replication_slot(%s)", (slot,))
    result = run_cli(source_args(dbs, topic_prefix, slot), timeout=120)
    line = error_line("cdc-source", result, alone=False)
    assert f"slot {slot} is gone" in line and f"cdc-source drop-slot --slot {slot}" in line, line
    assert slot_row(dbs, slot) is None, "a refused start must not create the slot"

    # The way out the message names works.
    result = run_cli(source_args(dbs, topic_prefix, slot, "drop-slot"), timeout=120)
    assert result.returncode == 0 and "did not exist" in result.stdout, result.stderr
    process = start_source(dbs, topic_prefix, slot, streaming=True)
    events = reader.wait_then_stop([items], count(items, 3), "the new snapshot", process)
    assert [(e.op, e.key) for e in events] == [("c", b'{"id":1}'), ("t", None), ("r", b'{"id":1}')]
    reader.assert_valid()


def test_slot_recreated_while_stopped_is_refused(dbs: Databases, topic_prefix: str, reader: EventReader) -> None:
    slot = new_slot()
    one_insert_streamed(reader, dbs, topic_prefix, slot)

    execute(dbs.source_dsn, "INSERT INTO item VALUES (2)")  # a change the recreated slot will never show
    psql_rows(dbs.source_dsn, "SELECT pg_drop_replication_slot(%s)", (slot,))
    psql_rows(dbs.source_dsn, "SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
    result = run_cli(source_args(dbs, topic_prefix, slot), timeout=120)
    line = error_line("cdc-source", result, alone=False)
    assert "recreated" in line and "consumed by another client" in line, line
    assert f"cdc-source drop-slot --slot {slot}" in line, line
    reader.assert_valid()
