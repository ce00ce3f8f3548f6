"""cdc-status: the whole pipeline on one screen (or as JSON); exit 1 when something needs attention,
so it serves as a health check."""

import sys
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from pg_kafka_cdc.common.cli import program
from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.pg import connect_source, connect_target
from pg_kafka_cdc.common.settings import common_options
from pg_kafka_cdc.status.report import Status, gather

EXIT_ATTENTION = 1
EXIT_ERROR = 2
_UNITS = {"": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}


def parse_size(text: str) -> int:
    """`512MB`, `1GB`, `1048576` -> bytes."""
    number = text.strip().lower().rstrip("ib").rstrip()
    unit = ""
    while number and not number[-1].isdigit():
        unit = number[-1] + unit
        number = number[:-1]
    if not number or unit not in _UNITS:
        raise ConfigError(f"--max-slot-lag takes a size like 512MB or 1GB; got {text!r}")
    return int(float(number) * _UNITS[unit])


def render(status: Status) -> None:
    console = Console() if sys.stdout.isatty() else Console(width=160)
    slot = status.slot
    if slot.exists:
        console.print(
            f"[bold]source slot[/] {slot.name}: {'active (pid ' + str(slot.active_pid) + ')' if slot.active else 'INACTIVE'}"
            f", {slot.plugin}, confirmed {slot.confirmed_flush_lsn}, holds {(slot.retained_wal_bytes or 0) / 2**20:.1f} MiB"
            f" of WAL, wal_status {slot.wal_status}"
            + (f", safe_wal_size {slot.safe_wal_size / 2**20:.0f} MiB" if slot.safe_wal_size is not None else "")
        )
    else:
        console.print(f"[bold]source slot[/] {slot.name}: does not exist")
    table = Table(title=f"sink group {status.group}", title_justify="left")
    for column in ("table", "topic", "parts", "end", "applied", "lag", "lag s", "last applied commit"):
        table.add_column(
            column, justify="right" if column in ("parts", "end", "applied", "lag", "lag s") else "left"
        )
    for t in status.tables:
        applied = [p.applied_offset for p in t.partitions]
        table.add_row(
            t.table,
            t.topic,
            str(len(t.partitions)),
            str(sum(p.end_offset for p in t.partitions)),
            "-" if all(a is None for a in applied) else str(sum(a or 0 for a in applied)),
            str(t.lag_messages),
            f"{t.lag_seconds:.1f}",
            t.last_applied_commit or "-",
        )
    console.print(table)
    if status.consistency is not None:
        style = "green" if status.consistency.reached else "yellow"
        console.print(f"[bold]sink group {status.group}[/] [{style}]{status.consistency.line()}[/]")
    if status.ok:
        console.print("[green]status: OK[/]")
    else:
        for problem in status.problems:
            console.print(f"[red]attention:[/] {problem}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@common_options
@click.option("--slot", envvar="SOURCE_SLOT", default="cdc_slot", help="The source connector's slot.")
@click.option("--group", envvar="SINK_GROUP", default="cdc-sink", help="The sink's consumer group.")
@click.option(
    "--state-schema", envvar="SINK_STATE_SCHEMA", default="cdc_sink", help="The sink's schema on the target."
)
@click.option("--max-slot-lag", default="1GB", help="Attention when an inactive slot holds more WAL than this.")
@click.option(
    "--max-lag-seconds",
    type=click.FloatRange(min=0),
    default=300.0,
    help="Attention when the oldest change not applied is older than this.",
)
@click.option(
    "--max-lag-messages",
    type=click.IntRange(min=0),
    default=1_000_000,
    help="Attention when more messages than this wait to be applied.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def main(**kwargs: Any) -> None:
    """Show the slot, the topics and the sink's lag; exit 1 when something needs attention."""
    own = {
        k: kwargs.pop(k)
        for k in (
            "slot",
            "group",
            "state_schema",
            "max_slot_lag",
            "max_lag_seconds",
            "max_lag_messages",
            "as_json",
        )
    }
    with program("cdc-status", kwargs, error_exit=EXIT_ERROR) as settings:
        quotas = {
            "max_slot_lag": float(parse_size(own["max_slot_lag"])),
            "max_lag_seconds": own["max_lag_seconds"],
            "max_lag_messages": float(own["max_lag_messages"]),
        }
        source = connect_source(settings.source_dsn, application_name="cdc-status")
        target = connect_target(settings.target_dsn, application_name="cdc-status")
        status = gather(settings, source, target, own["slot"], own["group"], own["state_schema"], quotas)
        if own["as_json"]:
            click.echo(orjson.dumps(status.as_dict()).decode())
        else:
            render(status)
        sys.exit(0 if status.ok else EXIT_ATTENTION)
