"""cdc-source: streams a source database's changes (wal2json) to Kafka topics, one per table."""

from typing import Any

import click

from pg_kafka_cdc.common.cli import DefaultGroup, program
from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.lsn import int_to_lsn
from pg_kafka_cdc.common.options import KAFKA_TIMEOUT, METRICS_PORT, option, with_options
from pg_kafka_cdc.common.settings import common_options
from pg_kafka_cdc.common.signals import StopFlag
from source_connector.connector import SourceConnector, SourceOptions, drop
from source_connector.incremental import ask_for_snapshot

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


def parse_topic_config(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in (part for value in values for part in value.split(",") if part.strip()):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--topic-config takes key=value (a Kafka topic setting); got {item!r}")
        pairs.append((key.strip(), val.strip()))
    return tuple(pairs)


SLOT = option("--slot", "SOURCE_SLOT", "cdc_slot", "Logical replication slot (created with wal2json if missing).")
RUN_OPTIONS = [
    SLOT,
    KAFKA_TIMEOUT,
    option(
        "--snapshot",
        "SOURCE_SNAPSHOT",
        "initial",
        "When the slot is created, publish the existing rows as `r` events first.",
        click.Choice(["initial", "never"]),
    ),
    option(
        "--partitions",
        "SOURCE_PARTITIONS",
        1,
        "Partitions of the topics this connector creates.",
        click.IntRange(min=1),
    ),
    option(
        "--replication-factor",
        "SOURCE_REPLICATION_FACTOR",
        1,
        "Replication factor of the topics this connector creates.",
        click.IntRange(min=1),
    ),
    option(
        "--topic-config",
        "SOURCE_TOPIC_CONFIG",
        None,
        "Extra Kafka topic settings for created topics, key=value (repeat, or comma-separate).",
        multiple=True,
    ),
    option(
        "--heartbeat-interval",
        "SOURCE_HEARTBEAT_INTERVAL",
        0.0,
        "Seconds between heartbeat messages written to the source's WAL (0: off).",
        click.FloatRange(min=0),
    ),
    option(
        "--max-in-flight",
        "SOURCE_MAX_IN_FLIGHT",
        100_000,
        "Messages waiting for Kafka before WAL reading pauses.",
        click.IntRange(min=1000),
    ),
    option(
        "--transaction-metadata",
        "SOURCE_TRANSACTION_METADATA",
        False,
        "Publish a BEGIN and an END record (its messages per topic) for every source transaction, on "
        "<prefix>.transaction (one partition), so a consumer can tell when it holds all of one.",
        is_flag=True,
    ),
    METRICS_PORT,
]


@click.group(cls=DefaultGroup, context_settings=CONTEXT)
def main() -> None:
    """Stream the source database's changes to Kafka, one topic per table (default command: run)."""


@main.command(context_settings=CONTEXT)
@common_options
@with_options(RUN_OPTIONS)
def run(**kwargs: Any) -> None:
    """Stream changes until stopped (SIGTERM/SIGINT: finish, confirm, exit 0)."""
    with program("cdc-source", kwargs) as settings:
        options = SourceOptions(
            slot=kwargs["slot"],
            snapshot=kwargs["snapshot"],
            partitions=kwargs["partitions"],
            replication_factor=kwargs["replication_factor"],
            topic_config=parse_topic_config(kwargs["topic_config"]),
            kafka_timeout=kwargs["kafka_timeout"],
            heartbeat_interval=kwargs["heartbeat_interval"],
            max_in_flight=kwargs["max_in_flight"],
            metrics_port=kwargs["metrics_port"],
            transaction_metadata=kwargs["transaction_metadata"],
        )
        SourceConnector(settings, options, StopFlag().install()).run()


@main.command("drop-slot", context_settings=CONTEXT)
@common_options
@with_options([SLOT, KAFKA_TIMEOUT])
def drop_slot(**kwargs: Any) -> None:
    """Drop the replication slot and forget this connector's state for it.

    The next start creates a new slot and takes a new initial snapshot.
    """
    with program("cdc-source", kwargs) as settings:
        options = SourceOptions(slot=kwargs["slot"], kafka_timeout=kwargs["kafka_timeout"])
        dropped = drop(settings, options, StopFlag())
        click.echo(f"slot {options.slot} {'dropped' if dropped else 'did not exist'}; connector state cleared")


@main.command("snapshot", context_settings=CONTEXT)
@common_options
@with_options([SLOT])
def snapshot(**kwargs: Any) -> None:
    """Read the --tables again while streaming goes on, into their topics (an incremental snapshot).

    The request is written to the source's WAL, so the cdc-source streaming from --slot acts on it
    when it reads that far, also when it is started later. Rows that the target has already are not
    written again by cdc-sink.
    """
    with program("cdc-source", kwargs) as settings:
        if not settings.tables:
            raise ConfigError("snapshot needs --tables (or TABLES): the tables to read again")
        lsn = ask_for_snapshot(settings.source_dsn, kwargs["slot"], settings.tables)
        click.echo(
            f"asked the cdc-source of slot {kwargs['slot']} to snapshot {', '.join(map(str, settings.tables))} "
            f"(request at {int_to_lsn(lsn)}); its log says when each table is done"
        )
