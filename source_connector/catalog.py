"""The tables the source replicates, read from its catalog (columns, types, key, replica identity)."""

import logging
from typing import Any

from pg_kafka_cdc.common.catalog import read_table, table_exists, tables_in_schema
from pg_kafka_cdc.common.errors import ConfigError, SourceError
from pg_kafka_cdc.common.tables import TableName
from schemas.topics import topic_for
from source_connector.table_info import TableInfo, key_problem

log = logging.getLogger("source.catalog")


class Catalog:
    def __init__(self, conn: Any, prefix: str) -> None:
        self.conn = conn
        self.prefix = prefix
        self.cache: dict[tuple[str, str], TableInfo | None] = {}

    def tables(self, requested: tuple[TableName, ...]) -> list[TableName]:
        """The tables to replicate: those requested (each must exist), or every table of `public`."""
        if not requested:
            return tables_in_schema(self.conn, "public")
        missing = [str(t) for t in requested if not table_exists(self.conn, t)]
        if missing:
            raise ConfigError(
                f"table{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                f"{'do' if len(missing) > 1 else 'does'} not exist on the source (check --tables / TABLES; "
                'names are case-sensitive when quoted, e.g. public."Order")'
            )
        return list(requested)

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
        )

    def lookup(self, schema: str, name: str, refresh: bool) -> TableInfo | None:
        """For the stream: cached definitions; a table that cannot be replicated is reported once
        and its changes skipped (at start-up such a table is refused instead)."""
        ident = (schema, name)
        if refresh or ident not in self.cache:
            try:
                self.cache[ident] = self.read(TableName(schema, name))
            except SourceError as exc:
                log.error("%s; its changes are NOT replicated", exc, extra={"table": str(TableName(schema, name))})
                self.cache[ident] = None
        return self.cache[ident]
