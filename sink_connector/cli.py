"""cdc-sink: applies the change topics to the target database, exactly once in effect."""

import dataclasses
import logging
import sys
from typing import Any

import click

from pg_kafka_cdc.common.cli import DefaultGroup, fail, program
from pg_kafka_cdc.common.errors import ConfigError, SinkError
from pg_kafka_cdc.common.kafka import admin_client, wait_for_kafka
from pg_kafka_cdc.common.logs import use_json
from pg_kafka_cdc.common.options import KAFKA_TIMEOUT, METRICS_PORT, option, with_options
from pg_kafka_cdc.common.pg import connect_target
from pg_kafka_cdc.common.settings import Settings, common_options
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import require_exact
from sink_connector.bookkeeping import Bookkeeping, TopicPartition
from sink_connector.consumer import end_offsets
from sink_connector.rebuild import (
    MEMBER_GRACE,
    RebuildLocks,
    check_topics,
    refuse_while_sinks_run,
    reset_tables,
    sink_groups,
    unfinished,
)
from sink_connector.replica_role import apply_as_replica
from sink_connector.sink import Sink, SinkOptions

log = logging.getLogger("sink.rebuild")

USAGE_EXIT = 2  # as click's own option errors

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


SINK_OPTIONS = [
    option("--group", "SINK_GROUP", "cdc-sink", "Kafka consumer group."),
    option(
        "--on-error",
        "SINK_ON_ERROR",
        "fail",
        "A message that cannot be applied: stop (fail), or send it to <topic>.dlq and park its key.",
        click.Choice(["fail", "dlq"]),
    ),
    option("--slot", "SOURCE_SLOT", "cdc_slot", "The source connector's slot: a bulk copy waits until it exists."),
    option(
        "--state-schema",
        "SINK_STATE_SCHEMA",
        "cdc_sink",
        "Target schema of the sink's own tables (offsets, snapshots...).",
    ),
    option(
        "--batch-size",
        "SINK_BATCH_SIZE",
        10000,
        "Most messages applied in one transaction.",
        click.IntRange(min=1),
    ),
    option(
        "--batch-bytes",
        "SINK_BATCH_BYTES",
        12 << 20,
        "About how many bytes of messages one transaction applies (fewer messages when they are large).",
        click.IntRange(min=1024),
    ),
    option(
        "--batch-wait-ms",
        "SINK_BATCH_WAIT_MS",
        20,
        "How long to wait for a batch to fill once its first message is there.",
        click.IntRange(min=0),
    ),
    option(
        "--instance-id",
        "SINK_INSTANCE_ID",
        None,
        "Static group membership (Kafka's group.instance.id), unique per sink: restarted within the "
        "session timeout (10 s), the sink gets its partitions back at once, without a rebalance.",
    ),
    option(
        "--schema-changes",
        "SCHEMA_CHANGES",
        "keep",
        "The source's schema-change events: applied, a dropped column kept on the target without its NOT "
        "NULL and default (keep) or dropped (drop); or skipped, only the columns events carry added (none).",
        click.Choice(["keep", "drop", "none"]),
    ),
    click.option("--once", is_flag=True, help="Exit 0 once the end offsets seen at start-up are applied."),
    KAFKA_TIMEOUT,
    METRICS_PORT,
]


sink_options = with_options(SINK_OPTIONS)


def build_options(kwargs: dict[str, Any], snapshot: str, rebuild: tuple[Any, ...] = ()) -> SinkOptions:
    return SinkOptions(
        consistency=kwargs.get("consistency") or "row",
        group=kwargs["group"],
        snapshot=snapshot,
        on_error=kwargs["on_error"],
        slot=kwargs["slot"],
        state_schema=kwargs["state_schema"],
        batch_size=kwargs["batch_size"],
        batch_bytes=kwargs["batch_bytes"],
        batch_wait=kwargs["batch_wait_ms"] / 1000,
        once=kwargs["once"],
        kafka_timeout=kwargs["kafka_timeout"],
        rebuild=rebuild,
        metrics_port=kwargs["metrics_port"],
        instance_id=kwargs["instance_id"] or None,
        schema_changes=kwargs["schema_changes"],
    )


@click.group(cls=DefaultGroup, context_settings=CONTEXT)
def main() -> None:
    """Apply the change topics to the target database (default command: run)."""


@main.command(context_settings=CONTEXT)
@common_options
@sink_options
@click.option(
    "--snapshot",
    envvar="SINK_SNAPSHOT",
    type=click.Choice(["copy", "topic", "never"]),
    default="copy",
    help="First fill of a table: bulk COPY from the source, replay of its topic, or nothing.",
)
@click.option(
    "--consistency",
    envvar="SINK_CONSISTENCY",
    type=click.Choice(["row", "transaction"]),
    default="row",
    help="What one target transaction holds: batches of changes (row), or whole source transactions in "
    "commit order, so that readers never see part of one (transaction: needs cdc-source "
    "--transaction-metadata and a single cdc-sink in the group).",
)
def run(**kwargs: Any) -> None:
    """Consume and apply until stopped (SIGTERM/SIGINT: finish the batch, exit 0)."""
    if kwargs["consistency"] == "transaction" and kwargs["on_error"] == "dlq":
        fail(
            "cdc-sink",
            "--on-error dlq cannot be used with --consistency transaction: a dead letter would apply part of a "
            "source transaction; use --on-error fail",
            use_json(kwargs.get("log_format") or "auto"),
        )
        sys.exit(USAGE_EXIT)
    with program("cdc-sink", kwargs) as settings:
        Sink(settings, build_options(kwargs, kwargs["snapshot"]), StopFlag().install()).run()


@main.command(context_settings=CONTEXT)
@common_options
@sink_options
def rebuild(**kwargs: Any) -> None:
    """Empty the --tables on the target and replay their topics from the start.

    Together with the source's initial snapshot events this rebuilds them from Kafka alone. Refused
    while sinks apply the tables; exits 0 with --once only when the replay reached the end offsets
    seen at start.
    """
    with program("cdc-sink", kwargs) as settings:
        require_exact(settings.selection, "cdc-sink rebuild")
        if not settings.tables:
            raise ConfigError("rebuild needs --tables (or TABLES): the tables to empty and replay")
        options = build_options(kwargs, "topic", settings.tables)
        stop = StopFlag().install()
        replay(settings, options, stop)
        if not options.once and not stop:
            Sink(settings, dataclasses.replace(options, rebuild=()), stop).run()


def replay(settings: Settings, options: SinkOptions, stop: StopFlag) -> None:
    """Reset the tables and apply their topics up to the end offsets seen at start, holding the
    rebuild locks, once no other sink applies them."""
    metadata = wait_for_kafka(settings, options.kafka_timeout, stop)
    topics = check_topics(metadata.topics, settings.topic_prefix, settings.tables)
    admin = admin_client(settings)
    locks = RebuildLocks(settings.target_dsn, settings.tables)
    try:
        others = sink_groups(locks.connect(), options.state_schema, options.group, topics)
        refuse_while_sinks_run(admin, options.group, others, settings.tables, topics, MEMBER_GRACE)
        locks.take()
        others = sink_groups(locks.conn, options.state_schema, options.group, topics)
        refuse_while_sinks_run(admin, options.group, others, settings.tables, topics, 0.0)  # with the locks held
        ends = end_offsets(settings, options.group, topics)
        reset(settings, options)
        Sink(settings, dataclasses.replace(options, once=True), stop).run()
        check_complete(Bookkeeping(options.state_schema, options.group), locks, ends)
    finally:
        locks.release()


def check_complete(book: Bookkeeping, locks: RebuildLocks, ends: dict[TopicPartition, int]) -> None:
    """The replay reached every end offset seen at start, with the locks held throughout."""
    names = ", ".join(map(str, locks.tables))
    if not locks.held():
        raise SinkError(
            f"the rebuild of {names} lost its target session (and its locks), so another sink may have "
            "applied them meanwhile: run the rebuild again"
        )
    pending = unfinished(ends, book.all_offsets(locks.conn))
    if pending:
        raise SinkError(
            f"the rebuild of {names} stopped before the end of their topics ({'; '.join(pending)}): the "
            "tables are incomplete; run the rebuild again"
        )
    log.info("rebuilt %s: applied their topics up to the end offsets seen at start", names)


def reset(settings: Settings, options: SinkOptions) -> None:
    conn = connect_target(
        settings.target_dsn,
        application_name="cdc-sink",
        autocommit=False,
    )
    try:
        apply_as_replica(conn)  # the tables' own ON TRUNCATE triggers stay quiet, as in the batches
        book = Bookkeeping(options.state_schema, options.group)
        book.install(conn)
        reset_tables(conn, book, settings.topic_prefix, settings.tables)
    finally:
        conn.close()
