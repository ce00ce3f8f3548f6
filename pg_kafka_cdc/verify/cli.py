"""cdc-verify: is the target equal to the source? Row counts and per-bucket checksums computed by
each database, then the differing keys. Exit 0 when identical, 1 when not, 2 when it cannot tell."""

import sys
from dataclasses import asdict
from typing import Any

import click
import orjson

from pg_kafka_cdc.common.catalog import read_table, tables_in_schema
from pg_kafka_cdc.common.cli import program
from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.pg import connect_source, connect_target
from pg_kafka_cdc.common.settings import Settings, common_options
from pg_kafka_cdc.common.tables import TableName
from pg_kafka_cdc.verify.compare import TableReport, compare_table
from sink_connector.bookkeeping import initialized_tables, installed

EXIT_DIFFERENT = 1
EXIT_ERROR = 2


def replicated_tables(target: Any, state_schema: str) -> list[TableName]:
    """The tables the sink has filled (its bookkeeping), when it has run against this target."""
    with target.cursor() as cur:
        found = initialized_tables(cur, state_schema) if installed(cur, state_schema) else []
    target.rollback()
    return found


def verify(settings: Settings, state_schema: str, limit: int) -> list[TableReport]:
    source = connect_source(
        settings.source_dsn,
        application_name="cdc-verify",
        autocommit=False,
    )
    target = connect_target(
        settings.target_dsn,
        application_name="cdc-verify",
        autocommit=False,
    )
    for conn in (source, target):
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
    tables = list(settings.tables) or replicated_tables(target, state_schema) or tables_in_schema(source, "public")
    reports = []
    for table in tables:
        definition = read_table(source, table)
        if definition is None:
            raise ConfigError(f"table {table} does not exist on the source (check --tables)")
        target_def = read_table(target, table)
        if target_def is None:
            reports.append(TableReport(str(table), problem="the table does not exist on the target"))
            continue
        if not definition.key:
            reports.append(TableReport(str(table), problem="the table has no key on the source"))
            continue
        reports.append(compare_table(source, target, definition, {c.name for c in target_def.columns}, limit))
    source.close()
    target.close()
    return reports


def describe(report: TableReport) -> str:
    if report.identical:
        return f"{report.table}: identical ({report.source_rows} rows)"
    if report.problem:
        return f"{report.table}: DIFFERENT: {report.problem}"
    parts = [f"{report.table}: DIFFERENT: source {report.source_rows} rows, target {report.target_rows}"]
    for kind, keys in (
        ("missing in target", report.missing),
        ("extra in target", report.extra),
        ("changed", report.changed),
    ):
        count = report.counts[kind.split()[0]]
        if count:
            parts.append(f"  {count} {kind}: {', '.join(keys)}{' ...' if count > len(keys) else ''}")
    return "\n".join(parts)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@common_options
@click.option(
    "--state-schema",
    envvar="SINK_STATE_SCHEMA",
    default="cdc_sink",
    help="The sink's schema on the target (to find the replicated tables).",
)
@click.option("--limit", type=click.IntRange(min=1), default=10, help="Differing keys listed per table.")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
def main(**kwargs: Any) -> None:
    """Compare source and target tables (default: every table the sink replicates)."""
    as_json, limit, state_schema = kwargs.pop("as_json"), kwargs.pop("limit"), kwargs.pop("state_schema")
    with program("cdc-verify", kwargs, error_exit=EXIT_ERROR) as settings:
        reports = verify(settings, state_schema, limit)
        if as_json:
            click.echo(orjson.dumps([{**asdict(r), "identical": r.identical} for r in reports]).decode())
        else:
            for report in reports:
                click.echo(describe(report))
            same = sum(r.identical for r in reports)
            click.echo(
                f"{'identical' if same == len(reports) else 'DIFFERENT'}: {same} of {len(reports)} tables match"
            )
        sys.exit(0 if all(r.identical for r in reports) else EXIT_DIFFERENT)
