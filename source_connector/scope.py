"""Which tables the source replicates, and as which table a change is published. Pure.

A partitioned table is replicated as its root, as a publication with `publish_via_partition_root`
does: one topic, key and target table, the snapshot read from the root (which returns every
partition's rows), and the changes wal2json reports under a leaf partition's name published as the
root's. UNLOGGED and temporary tables are refused: their changes never reach the WAL.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from pg_kafka_cdc.common.catalog import Relation
from pg_kafka_cdc.common.tables import TableName
from source_connector.wal2json import escape_table_pattern

DEFAULT_SCHEMA = "public"  # the scope without --tables: every table of this schema

ALL_TABLES = "*.*"  # wal2json's add-tables entry for every table of every schema


@dataclass(frozen=True)
class Scope:
    """The tables named in --tables, or (`named` None) every table of schema public but those
    `left_out` at start-up."""

    named: frozenset[TableName] | None = None
    left_out: frozenset[TableName] = frozenset()

    def replicated_as(self, chain: Sequence[TableName]) -> TableName | None:
        """The table a relation's changes are published as. `chain`: the relation, then the table it
        is a partition of, up to the root. The highest of them in scope wins, so a leaf goes to its
        root (or to the partition named in --tables when its root is not); None when none is in scope."""
        if self.named is None:
            root = chain[-1]
            return root if root.schema == DEFAULT_SCHEMA and root not in self.left_out else None
        return next((t for t in reversed(chain) if t in self.named), None)


def wal2json_filter(scope: Scope, tables: Sequence[TableName], partitioned: bool) -> list[str]:
    """wal2json's add-tables entries.

    wal2json filters by the name of the table a row is stored in, which for a partitioned table is
    one of its leaf partitions. Listing today's leaves would not do: a partition created or attached
    later would be filtered out by wal2json itself before the connector could learn of it, and a
    stream restarted once the connector notices cannot go back before the position it confirmed.
    Schema wildcards would miss a partition living in another schema than its root. So with a
    partitioned table in scope the filter lets every table through and the connector's catalog
    decides (Catalog.lookup: a leaf is published as its root, a table out of scope is skipped); the
    price is decoding the changes of tables that are not replicated. Without one: the named tables,
    or every table of public."""
    if partitioned:
        return [ALL_TABLES]
    if scope.named is None:
        return [f"{escape_table_pattern(DEFAULT_SCHEMA)}.*"]
    return [f"{escape_table_pattern(t.schema)}.{escape_table_pattern(t.name)}" for t in tables]


def persistence_problem(rel: Relation, root: TableName | None = None) -> str | None:
    """Why the changes of `rel` (a partition of `root`, when given) cannot be streamed, with the fix;
    None when they can."""
    if rel.persistence == "u":
        what = f"table {rel.name} is" if root is None else f"table {root} has a partition {rel.name} that is"
        return (
            f"{what} UNLOGGED: its changes never reach the WAL, so they cannot be streamed. "
            f"Fix: ALTER TABLE {rel.name} SET LOGGED"
        )
    if rel.persistence == "t":
        return (
            f"table {rel.name} is a temporary table: its changes never reach the WAL and only its own session "
            "sees it. Replicate a permanent table instead (CREATE TABLE without TEMPORARY)"
        )
    return None


def overlap_problem(table: TableName, chain: Sequence[TableName], named: frozenset[TableName]) -> str | None:
    """A partition named in --tables together with a table above it: its rows would be published
    twice, as its own and as the root's."""
    above = [t for t in chain[1:] if t in named]
    if not above:
        return None
    return (
        f"table {table} is a partition of {above[-1]}, which --tables names too, and its rows are replicated "
        f"as {above[-1]}'s: remove {table} from --tables / TABLES"
    )
