"""Which tables the source replicates, and as which table a change is published. Pure.

--tables names tables exactly or by pattern (`sales.*`, `public.order_*`); without it every table of
every schema but PostgreSQL's own and the sink's bookkeeping schema is in scope (as `CREATE
PUBLICATION ... FOR ALL TABLES`); --exclude-tables takes tables out. A table created later that a
pattern (or the default) reaches is replicated from its first change on.

A partitioned table is replicated as its root, as a publication with `publish_via_partition_root`
does: one topic, key and target table, the snapshot read from the root (which returns every
partition's rows), and the changes wal2json reports under a leaf partition's name published as the
root's. A pattern reaches roots only: a partition is replicated as a table of its own only when
named exactly. UNLOGGED and temporary tables are refused: their changes never reach the WAL.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from pg_kafka_cdc.common.catalog import Relation
from pg_kafka_cdc.common.tables import NamePattern, TableName, TablePattern, TableSelection
from source_connector.wal2json import escape_table_pattern

ALL_TABLES = "*.*"  # wal2json's add-tables entry for every table of every schema


@dataclass(frozen=True)
class Scope:
    """The tables of --tables and --exclude-tables (`selection`), but those `left_out` at start-up
    (reached by a pattern or the default, and refused: UNLOGGED)."""

    selection: TableSelection = field(default_factory=TableSelection)
    left_out: frozenset[TableName] = frozenset()

    def replicated_as(self, chain: Sequence[TableName]) -> TableName | None:
        """The table a relation's changes are published as. `chain`: the relation, then the table it
        is a partition of, up to the root. The highest of them in scope wins, so a leaf goes to its
        root (or to the partition named in --tables when its root is not); None when none is in scope."""
        root = chain[-1]
        if self.by_pattern(root):
            return root
        named = self.selection.names
        return next((t for t in reversed(chain) if t in named), None)

    def by_pattern(self, table: TableName) -> bool:
        """A pattern of --tables (or the default) reaches `table`, which is not excluded or left out."""
        return table not in self.left_out and self.selection.by_pattern(table)


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
    and for each pattern its wal2json form (wal2json's `*` stands for a whole part only, so
    `public.order_*` lets `public.*` through, and the catalog keeps the tables the pattern matches);
    the exclusions are the catalog's to apply too. `tables`: those in scope at start-up (the patterns
    cover those they reached)."""
    if partitioned or scope.selection.default:
        return [ALL_TABLES]
    named = [t for t in tables if not scope.by_pattern(t)]
    entries = [f"{escape_table_pattern(t.schema)}.{escape_table_pattern(t.name)}" for t in named]
    entries += [_wal2json_pattern(p) for p in scope.selection.patterns]
    unique = list(dict.fromkeys(entries))
    return [ALL_TABLES] if ALL_TABLES in unique else unique


def _wal2json_pattern(pattern: TablePattern) -> str:
    return f"{_wal2json_part(pattern.schema)}.{_wal2json_part(pattern.name)}"


def _wal2json_part(part: NamePattern) -> str:
    return escape_table_pattern(part.pieces[0]) if part.exact else "*"


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


def overlap_problem(table: TableName, chain: Sequence[TableName], selection: TableSelection) -> str | None:
    """A partition named in --tables together with a table above it (named, or its root reached by
    a pattern): its rows would be published twice, as its own and as the root's."""
    above = [t for t in chain[1:] if t in selection.names]
    if not above and len(chain) > 1 and selection.by_pattern(chain[-1]):
        return (
            f"table {table} is a partition of {chain[-1]}, which a pattern of --tables (or the default scope) "
            f"includes, and its rows are replicated as {chain[-1]}'s: remove {table} from --tables / TABLES, "
            f"or add {chain[-1]} to --exclude-tables / EXCLUDE_TABLES"
        )
    if not above:
        return None
    return (
        f"table {table} is a partition of {above[-1]}, which --tables names too, and its rows are replicated "
        f"as {above[-1]}'s: remove {table} from --tables / TABLES"
    )
