"""The tables the source replicates, read from its catalog (columns, types, key, replica identity),
and the table each change wal2json reports is published as (a leaf partition: its root; a table
created later that a pattern of --tables, or the default scope, reaches: itself)."""

import logging
from collections.abc import Callable
from typing import Any

from pg_kafka_cdc.common.catalog import (
    Relation,
    ancestors,
    partitions,
    read_table,
    relation,
    table_exists,
)
from pg_kafka_cdc.common.errors import ConfigError, SourceError
from pg_kafka_cdc.common.tables import TableName, TableSelection
from schemas.topics import topic_for
from source_connector.scope import Scope, overlap_problem, persistence_problem
from source_connector.table_info import TableInfo, key_problem

log = logging.getLogger("source.catalog")

Ident = tuple[str, str]

# Every table that is no partition, outside PostgreSQL's catalogs: what patterns and the default
# scope choose from (TablePattern.matches leaves the other reserved schemas out).
_EVERY_TABLE = """
SELECT n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
ORDER BY n.nspname, c.relname
"""


def every_table(conn: Any) -> list[TableName]:
    """The tables patterns may reach, in schema and name order."""
    with conn.cursor() as cur:
        cur.execute(_EVERY_TABLE)
        return [TableName(s, t) for s, t in cur.fetchall()]


class Catalog:
    def __init__(self, conn: Any, prefix: str) -> None:
        self.conn = conn
        self.prefix = prefix
        self.scope = Scope()
        self.partitioned = False  # a partitioned table is in scope (see scope.wal2json_filter)
        self.cache: dict[Ident, TableInfo | None] = {}  # by replicated table
        # The name wal2json reports -> the table its changes are published as (None: not replicated).
        self.routes: dict[Ident, TableName | None] = {}
        self.unrouted: set[Ident] = set()  # the names routed to None
        self.gone: set[TableName] = set()  # tables dropped before their changes were read, reported once
        # Called with a table first met in the stream (not read at start-up), once it is read.
        self.on_new: Callable[[TableInfo], None] = lambda info: None

    def tables(self, selection: TableSelection) -> list[TableName]:
        """The tables to replicate: those named in --tables (each must exist and reach the WAL), then
        those a pattern of it (or the default scope: every schema but the reserved ones) reaches, but
        the excluded; a partition is part of its root, not a table of its own, unless named."""
        requested = selection.names
        missing = [str(t) for t in requested if not table_exists(self.conn, t)]
        if missing:
            raise ConfigError(
                f"table{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'do' if len(missing) > 1 else 'does'} not exist on the source (check --tables / TABLES; "
                'names are case-sensitive when quoted, e.g. public."Order")'
            )
        for table in requested:
            rel = self._relation(table)
            parts = partitions(self.conn, rel)
            problem = self._unstreamable(rel, parts) or overlap_problem(
                table, ancestors(self.conn, rel), selection
            )
            if problem:
                raise SourceError(problem)
            self._check_partition_keys(rel, parts)
            self.partitioned = self.partitioned or rel.partitioned
        matched = self._matching(selection, frozenset(requested))
        return [*requested, *matched]

    def _matching(self, selection: TableSelection, named: frozenset[TableName]) -> list[TableName]:
        """The tables the patterns (or the default scope) reach; one whose changes never reach the
        WAL is left out with a warning."""
        kept, left_out = [], []
        patterns = selection.patterns
        for table in every_table(self.conn) if patterns else []:
            rel = None if table in named or not selection.by_pattern(table) else relation(self.conn, table)
            if rel is None:  # named, not reached, or dropped meanwhile
                continue
            parts = partitions(self.conn, rel)
            problem = self._unstreamable(rel, parts)
            if problem:
                log.warning("%s; it is left out of the replicated tables", problem, extra={"table": str(table)})
                left_out.append(table)
                continue
            self._check_partition_keys(rel, parts)
            self.partitioned = self.partitioned or rel.partitioned
            kept.append(table)
        self.scope = Scope(selection, frozenset(left_out))
        return kept

    def _relation(self, table: TableName) -> Relation:
        rel = relation(self.conn, table)
        if rel is None:
            raise ConfigError(f"table {table} does not exist on the source")
        return rel

    @staticmethod
    def _unstreamable(rel: Relation, parts: list[Relation]) -> str | None:
        """Why the changes of the table, or of one of its partitions, never reach the WAL."""
        problems = [persistence_problem(rel)] + [persistence_problem(p, rel.name) for p in parts]
        return next((p for p in problems if p), None)

    def _check_partition_keys(self, rel: Relation, parts: list[Relation]) -> None:
        """Each leaf has its own replica identity, which decides what its updates and deletes carry
        (the table's own key first: without one, the error names the table, not a leaf)."""
        if not parts or self._key_problem(rel.name):
            return
        for part in parts:
            if not part.partitioned:
                problem = self._key_problem(part.name)
                if problem:
                    raise SourceError(problem)

    def _key_problem(self, table: TableName) -> str | None:
        definition = read_table(self.conn, table)
        if definition is None:
            return None
        return key_problem(table, definition.key, definition.has_pk, definition.replica_identity)

    def read(self, table: TableName) -> TableInfo:
        """The table's definition; a SourceError when it cannot be replicated exactly."""
        definition = read_table(self.conn, table)
        if definition is None:
            raise ConfigError(f"table {table} does not exist on the source")
        problem = key_problem(table, definition.key, definition.has_pk, definition.replica_identity)
        if problem:
            raise SourceError(problem)
        return TableInfo(
            name=table,
            topic=topic_for(self.prefix, table),
            columns=tuple(c.name for c in definition.columns),
            types={c.name: c.type for c in definition.columns},
            key=definition.key,
            replica_identity=definition.replica_identity,
            not_null=frozenset(c.name for c in definition.columns if c.not_null),
            key_from_pk=definition.has_pk,
            attnums=tuple(c.attnum for c in definition.columns),
            relfilenode=definition.relfilenode,
        )

    def remember(self, info: TableInfo) -> None:
        """The table's shape as the stream showed it last: what its next changes are compared with."""
        self.cache[(info.name.schema, info.name.name)] = info

    def cached(self, schema: str, name: str) -> TableInfo | None:
        """What `lookup` returns without a refresh, when that needs no catalog read (None otherwise)."""
        target = self.routes.get((schema, name))
        return None if target is None else self.cache.get((target.schema, target.name))

    def lookup(self, schema: str, name: str, refresh: bool) -> TableInfo | None:
        """For the stream: the definition of the table the named one's changes are published as
        (cached); a table that cannot be replicated is reported once and its changes skipped (at
        start-up such a table is refused instead), one out of scope is skipped silently."""
        ident = (schema, name)
        if refresh or ident not in self.routes:
            self.routes[ident] = self._route(TableName(schema, name))
        target = self.routes[ident]
        if target is None:
            self.unrouted.add(ident)
            return None
        key = (target.schema, target.name)
        new = key not in self.cache
        if new:
            log.info(
                "table %s is new and in scope: its changes are replicated from now on",
                target,
                extra={"table": str(target)},
            )
        if refresh or key not in self.cache:
            try:
                self.cache[key] = self.read(target)
            except SourceError as exc:
                log.error("%s; its changes are NOT replicated", exc, extra={"table": str(target)})
                self.cache[key] = None
        info = self.cache[key]
        if new and info is not None:
            self.on_new(info)
        return info

    def _route(self, table: TableName) -> TableName | None:
        """The table `table`'s changes are published as, from the catalog as it is now."""
        rel = relation(self.conn, table)
        if rel is None:
            if table not in self.gone:
                self.gone.add(table)
                log.warning("table %s is gone from the catalog: its changes are skipped", table)
            return None
        target = self.scope.replicated_as(ancestors(self.conn, rel))
        if target is None or target == table:
            return target
        problem = self._key_problem(table)
        if problem:
            log.error("%s; its changes are NOT replicated", problem, extra={"table": str(table)})
            return None
        return target

    def known(self, info: TableInfo) -> None:
        """A table read at start-up: its own changes are published as itself."""
        ident = (info.name.schema, info.name.name)
        self.cache[ident] = info
        self.routes[ident] = info.name

    def forget_unrouted(self) -> None:
        """Forget the tables found out of scope: one may have been attached as a partition since
        (ATTACH PARTITION commits a transaction without row changes, the stream's cue to call this)."""
        for ident in self.unrouted:
            self.routes.pop(ident, None)
        self.unrouted.clear()
