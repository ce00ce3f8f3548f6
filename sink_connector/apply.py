"""Applying a batch's net effect to one target table with set-based statements: one statement for
the deletes, one per column set for the upserts, whatever the number of rows.

The rows travel as one JSON array; `json_to_recordset` hands PostgreSQL every value as text and the
cast to the column's own type turns it back into the value it was on the source (PostgreSQL's
input function reads its own output), so every type arrives equal.
"""

from typing import Any

import orjson
from psycopg2 import sql

from schemas.partitioner import partition_for
from schemas.values import json_row, output_text, typed_columns
from sink_connector.net_effect import TableBatch
from sink_connector.target import TargetTable


def _record_columns(columns: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in columns)


def _cast(target: TargetTable, column: str, alias: str = "x") -> sql.Composable:
    return sql.SQL("{}::{}").format(sql.Identifier(alias, column), target.type_sql(column))


def upsert_statement(target: TargetTable, columns: tuple[str, ...], only_changed: bool = False) -> sql.Composed:
    """INSERT ... ON CONFLICT DO UPDATE of rows with these columns; `only_changed`: a row equal (as
    text) to the one the target has is left alone, not written again."""
    cached = target.statements.get(("upsert", columns, only_changed))
    if cached is not None:
        return cached
    updates = [c for c in columns if c not in target.key]
    conflict = (
        sql.SQL("DO UPDATE SET {}").format(
            sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
        )
        if updates
        else sql.SQL("DO NOTHING")
    )
    if updates and only_changed:
        conflict = sql.SQL("{} WHERE ({}) IS DISTINCT FROM ({})").format(
            conflict,
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in updates),
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("excluded", c)) for c in updates),
        )
    statement = sql.SQL(
        "INSERT INTO {table} AS t ({columns}) SELECT {values} FROM json_to_recordset(%s::json) AS x({record}) "
        "ON CONFLICT ({key}) {conflict}"
    ).format(
        table=target.ident,
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        values=sql.SQL(", ").join(_cast(target, c) for c in columns),
        record=_record_columns(columns),
        key=sql.SQL(", ").join(map(sql.Identifier, target.key)),
        conflict=conflict,
    )
    target.statements[("upsert", columns, only_changed)] = statement
    return statement


def delete_statement(target: TargetTable) -> sql.Composed:
    cached = target.statements.get("delete")
    if cached is not None:
        return cached
    statement = sql.SQL(
        "DELETE FROM {table} AS t USING json_to_recordset(%s::json) AS x({record}) WHERE {match}"
    ).format(
        table=target.ident,
        record=_record_columns(target.key),
        match=sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier("t", k), _cast(target, k)) for k in target.key
        ),
    )
    target.statements["delete"] = statement
    return statement


def check_statement(target: TargetTable, columns: tuple[str, ...]) -> sql.Composed:
    """Casts rows to the column types without writing them: raises on a value the column rejects."""
    cached = target.statements.get(("check", columns))
    if cached is not None:
        return cached
    # count(ROW(...)) makes PostgreSQL evaluate every cast; a bare count(*) would skip them.
    statement = sql.SQL("SELECT count(ROW({values})) FROM json_to_recordset(%s::json) AS x({record})").format(
        values=sql.SQL(", ").join(_cast(target, c) for c in columns),
        record=_record_columns(columns),
    )
    target.statements[("check", columns)] = statement
    return statement


def _json(rows: list[dict[str, Any]]) -> str:
    return orjson.dumps(rows).decode()


def key_bytes(target: TargetTable, texts: tuple[str, ...]) -> bytes:
    """The Kafka key the source gives the row whose key columns read (as text) `texts`."""
    integers, booleans = typed_columns({k: target.columns[k] for k in target.key})
    return orjson.dumps(json_row(target.key, texts, integers, booleans))


def truncate(cur: Any, target: TargetTable, partitions: dict[int, int]) -> None:
    """Empty what TRUNCATE events of these partitions cover: the whole table when the topic has one
    partition, else the rows whose key the Kafka partitioner sends to a truncated partition."""
    counts = set(partitions.values())
    if counts == {1}:
        cur.execute(sql.SQL("TRUNCATE {}").format(target.ident))
        return
    # The key columns read as the source reads them, so key_bytes gives the key wal2json put in Kafka.
    cur.execute(
        sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(output_text(k, target.columns[k]) for k in target.key), target.ident
        )
    )
    doomed = []
    for texts in cur.fetchall():
        encoded = key_bytes(target, texts)
        for partition, count in partitions.items():
            if partition_for(encoded, count) == partition:
                doomed.append(dict(zip(target.key, texts, strict=True)))
                break
    if doomed:
        cur.execute(delete_statement(target), (_json(doomed),))


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Rows grouped by their columns (one statement per group)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        shape = tuple(row)
        group = groups.get(shape)
        if group is None:
            groups[shape] = group = []
        group.append(row)
    return groups


def apply_table(cur: Any, target: TargetTable, batch: TableBatch) -> None:
    """The batch's truncates, then deletes, then upserts (each key has one net change)."""
    for shape, rows in _groups(batch.replaced).items():
        columns = target.written(shape)
        if columns:
            cur.execute(check_statement(target, columns), (_json(rows),))
    if batch.truncated:
        truncate(cur, target, batch.truncated)
    if batch.deletes:
        cur.execute(delete_statement(target), (_json([row for row, _ in batch.deletes.values()]),))
    if batch.upserts:
        for snapshot in (False, True):
            upserts = [u.row for u in batch.upserts.values() if u.snapshot is snapshot]
            for shape, rows in _groups(upserts).items():
                columns = target.written(shape)
                cur.execute(upsert_statement(target, columns, snapshot), (_json(rows),))
