"""Helpers of the cdc-sink end-to-end tests (tests/integration/test_sink_*.py): each test's slot and
consumer group, the topic of a table, and how far the sink got."""

from schemas.topics import topic_for
from tests.conftest import Databases
from tests.helpers import psql_rows
from tests.pipeline import table_name


def names_of(dbs: Databases, prefix: str) -> tuple[str, str]:
    """A replication slot and a consumer group of this test only."""
    return f"slot_{dbs.name}", f"group_{prefix}"


def topic_of(prefix: str, table: str) -> str:
    return topic_for(prefix, table_name(table))


def target_count(dbs: Databases, table: str) -> int:
    found = psql_rows(dbs.target_dsn, "SELECT to_regclass(%s) IS NOT NULL", (table,))
    if not found[0][0]:
        return 0
    [(n,)] = psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {table}")
    return int(n)


def applied_offsets(dbs: Databases, group: str) -> int:
    """The sum of the next offsets the sink has stored for its group (0 before it stored any)."""
    found = psql_rows(dbs.target_dsn, "SELECT to_regclass('cdc_sink.offsets') IS NOT NULL")
    if not found[0][0]:
        return 0
    [(total,)] = psql_rows(
        dbs.target_dsn, "SELECT coalesce(sum(next_offset), 0) FROM cdc_sink.offsets WHERE group_id = %s", (group,)
    )
    return int(total)
