"""cdc-sink: applies the change topics to the target database, exactly once in effect."""

from typing import Any

import click

from pg_kafka_cdc.common.cli import DefaultGroup, program
from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.options import KAFKA_TIMEOUT, METRICS_PORT, option, with_options
from pg_kafka_cdc.common.pg import connect_target
from pg_kafka_cdc.common.settings import Settings, common_options
from pg_kafka_cdc.common.signals import StopFlag
from sink_connector.bookkeeping import Bookkeeping
from sink_connector.rebuild import reset_tables
from sink_connector.replica_role import apply_as_replica
from sink_connector.sink import Sink, SinkOptions

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
        "How long to wait for a batch to fill.",
        click.IntRange(min=0),
    ),
    option(
        "--instance-id",
        "SINK_INSTANCE_ID",
        None,
        "Static group membership (Kafka's group.instance.id), unique per sink: restarted within the "
        "session timeout (10 s), the sink gets its partitions back at once, without a rebalance.",
    ),
    click.option("--once", is_flag=True, help="Exit 0 once the end offsets seen at start-up are applied."),
    KAFKA_TIMEOUT,
    METRICS_PORT,
]


sink_options = with_options(SINK_OPTIONS)


def build_options(kwargs: dict[str, Any], snapshot: str, rebuild: tuple[Any, ...] = ()) -> SinkOptions:
    return SinkOptions(
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
def run(**kwargs: Any) -> None:
    """Consume and apply until stopped (SIGTERM/SIGINT: finish the batch, exit 0)."""
    with program("cdc-sink", kwargs) as settings:
        Sink(settings, build_options(kwargs, kwargs["snapshot"]), StopFlag().install()).run()


@main.command(context_settings=CONTEXT)
@common_options
@sink_options
def rebuild(**kwargs: Any) -> None:
    """Empty the --tables on the target and replay their topics from the start.

    Together with the source's initial snapshot events this rebuilds them from Kafka alone.
    """
    with program("cdc-sink", kwargs) as settings:
        if not settings.tables:
            raise ConfigError("rebuild needs --tables (or TABLES): the tables to empty and replay")
        options = build_options(kwargs, "topic", settings.tables)
        reset(settings, options)
        Sink(settings, options, StopFlag().install()).run()


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
