"""cdc-sink end to end (source PostgreSQL -> cdc-source -> Kafka -> cdc-sink -> target PostgreSQL)
under the writer's load: started in either order, two sinks sharing a group through rebalances, a
static member back after kill -9. The target is compared with the source by cdc-verify and row by row
as PostgreSQL text."""

import signal

import pytest

from tests.conftest import Databases, Stack, admin_client
from tests.helpers import stop_process
from tests.pipeline import (
    WRITER_TABLES,
    assert_same_rows,
    start_sink,
    start_source,
    start_writer,
    stop_cleanly,
    wait_for_output,
    wait_identical,
    wait_while_running,
)
from tests.sink_runs import applied_offsets, names_of, target_count


@pytest.mark.parametrize("first", ["source", "sink"])
def test_writer_load_reaches_identical_target(dbs: Databases, topic_prefix: str, first: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    writer = start_writer(dbs, "--rate", "200", "--batch", "5")
    if first == "source":
        source = start_source(dbs, topic_prefix, slot)
        wait_for_output(source, "created slot")
        sink = start_sink(dbs, topic_prefix, slot, group)
    else:
        sink = start_sink(dbs, topic_prefix, slot, group)
        wait_for_output(sink, "consuming")
        source = start_source(dbs, topic_prefix, slot)
    # the sink applies while the writer is still writing
    wait_while_running(
        lambda: target_count(dbs, "public.person") >= 200,
        (source, sink, writer),
        timeout=90,
        message="the sink applied nothing",
    )
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, sink))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(sink, source)


def test_two_sinks_share_a_group_through_rebalances(dbs: Databases, topic_prefix: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    writer = start_writer(dbs, "--rate", "300", "--batch", "5")
    source = start_source(dbs, topic_prefix, slot, "--partitions", "4")
    first = start_sink(dbs, topic_prefix, slot, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > 0,
        (source, first, writer),
        timeout=90,
        message="the first sink applied nothing",
    )
    second = start_sink(dbs, topic_prefix, slot, group)
    wait_for_output(second, "assigned")  # the group rebalanced over both members
    applied = applied_offsets(dbs, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > applied + 500,
        (source, first, second, writer),
        timeout=60,
        message="the two sinks applied nothing together",
    )
    reassigned = [line for line in first.stderr_text().splitlines() if " assigned " in line]
    assert len(reassigned) >= 2, "the first sink kept all its partitions when the second one joined"
    stop_cleanly(first)  # the second sink takes over every partition
    wait_while_running(
        lambda: second.stderr_text().count("assigned") >= 2,
        (second,),
        timeout=60,
        message="the second sink was never given the first one's partitions",
    )
    applied = applied_offsets(dbs, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > applied + 500,
        (source, second, writer),
        timeout=60,
        message="the remaining sink applied nothing",
    )
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, second))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(second, source)


def test_static_member_comes_back_after_kill_9_and_a_duplicate_id_is_refused(
    dbs: Databases, stack: Stack, topic_prefix: str
) -> None:
    slot, group = names_of(dbs, topic_prefix)
    writer = start_writer(dbs, "--rate", "300", "--batch", "5")
    source = start_source(dbs, topic_prefix, slot, "--partitions", "2")
    first = start_sink(dbs, topic_prefix, slot, group, "--instance-id", "sink-1")
    wait_while_running(
        lambda: applied_offsets(dbs, group) > 0, (source, first, writer), timeout=90, message="nothing applied"
    )
    assert stop_process(first, signal.SIGKILL) == -signal.SIGKILL
    again = start_sink(dbs, topic_prefix, slot, group, "--instance-id", "sink-1")
    wait_for_output(again, "assigned")
    applied = applied_offsets(dbs, group)
    wait_while_running(
        lambda: applied_offsets(dbs, group) > applied + 300,
        (source, again, writer),
        timeout=60,
        message="the restarted static member applied nothing",
    )
    admin = admin_client(stack.bootstrap_servers)  # kept referenced until its future resolves
    [described] = admin.describe_consumer_groups([group], request_timeout=30)[group].result(timeout=60).members
    assert described.group_instance_id == "sink-1"

    # a second sink with the same id takes the membership over; the older one stops with one clear line
    duplicate = start_sink(dbs, topic_prefix, slot, group, "--instance-id", "sink-1")
    assert again.wait(timeout=60) != 0
    text = again.stderr_text()
    assert "with --instance-id sink-1, so Kafka stopped this one: give each sink its own id" in text, text
    assert "Traceback" not in text, text
    stop_cleanly(writer)
    wait_identical(dbs, WRITER_TABLES, processes=(source, duplicate))
    assert_same_rows(dbs, WRITER_TABLES)
    stop_cleanly(duplicate, source)
