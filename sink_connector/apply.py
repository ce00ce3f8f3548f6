"""Applying a batch's net effect to one target table with set-based statements: one statement for
the deletes, one per column set for the upserts, whatever the number of rows.

The deleted keys travel as one JSON array; `json_to_recordset` hands PostgreSQL every value as text
and the cast to the column's own type turns it back into the value it was on the source
(PostgreSQL's input function reads its own output), so every type arrives equal. The upserted rows
go the same way through COPY, whose text format hands each value to the column type's input
function too: into a temporary staging table of the written columns and their types (emptied by
the statement that applies them), which one INSERT ... ON CONFLICT then applies. The server reads
rows from COPY in about half the time it takes to read them from json_to_recordset. A session that
may not create temporary tables upserts from JSON.
"""

import hashlib
import io
from operator import itemgetter
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


def _conflict(target: TargetTable, columns: tuple[str, ...], only_changed: bool) -> sql.Composable:
    """ON CONFLICT's action; `only_changed`: a row equal (as text) to the one the target has is left
    alone, not written again."""
    updates = [c for c in columns if c not in target.key]
    if not updates:
        return sql.SQL("DO NOTHING")
    conflict = sql.SQL("DO UPDATE SET {}").format(
        sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in updates)
    )
    if only_changed:
        conflict = sql.SQL("{} WHERE ({}) IS DISTINCT FROM ({})").format(
            conflict,
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("t", c)) for c in updates),
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("excluded", c)) for c in updates),
        )
    return conflict


def upsert_statement(target: TargetTable, columns: tuple[str, ...], only_changed: bool = False) -> sql.Composed:
    """INSERT ... ON CONFLICT DO UPDATE of rows with these columns, read from one JSON array (a
    session that may not create the staging table)."""
    cached = target.statements.get(("upsert", columns, only_changed))
    if cached is not None:
        return cached
    statement = sql.SQL(
        "INSERT INTO {table} AS t ({columns}) SELECT {values} FROM json_to_recordset(%s::json) AS x({record}) "
        "ON CONFLICT ({key}) {conflict}"
    ).format(
        table=target.ident,
        columns=sql.SQL(", ").join(map(sql.Identifier, columns)),
        values=sql.SQL(", ").join(_cast(target, c) for c in columns),
        record=_record_columns(columns),
        key=sql.SQL(", ").join(map(sql.Identifier, target.key)),
        conflict=_conflict(target, columns, only_changed),
    )
    target.statements[("upsert", columns, only_changed)] = statement
    return statement


class Staging:
    """The statements that upsert rows with one set of columns through a staging table, named after
    the table, the columns and their types (a retyped column gets a new one)."""

    def __init__(self, target: TargetTable, columns: tuple[str, ...]) -> None:
        types = [target.columns[c] for c in columns]
        digest = hashlib.sha256(repr((target.name, columns, types)).encode()).hexdigest()[:24]
        name = sql.Identifier("pg_temp", f"cdc_staging_{digest}")
        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        self.create = sql.SQL("CREATE TEMPORARY TABLE IF NOT EXISTS {} ({})").format(
            name,
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), target.type_sql(c)) for c in columns),
        )
        self.copy = sql.SQL("COPY {} ({}) FROM STDIN").format(name, names)
        self.upserts = {
            only_changed: sql.SQL(
                "INSERT INTO {} AS t ({}) SELECT {} FROM {} AS x ON CONFLICT ({}) {}; TRUNCATE {}"
            ).format(
                target.ident,
                names,
                sql.SQL(", ").join(sql.Identifier("x", c) for c in columns),
                name,
                sql.SQL(", ").join(map(sql.Identifier, target.key)),
                _conflict(target, columns, only_changed),
                name,
            )
            for only_changed in (False, True)
        }


def staging(target: TargetTable, columns: tuple[str, ...]) -> Staging:
    cached = target.staging.get(columns)
    if cached is None:
        cached = target.staging[columns] = Staging(target, columns)
    return cached


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


_NONE = type(None)
_TEXTS = frozenset({str, _NONE})
_INTEGERS = frozenset({int, _NONE})
_BOOLEANS = frozenset({bool, _NONE})
_BOOLEAN_TEXT = {True: "t", False: "f", None: "\\N"}


def copy_text(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """The rows in COPY's text format: a value as the text its JSON value stands for (integers as
    digits, booleans as t and f), backslash, tab, newline and carriage return escaped, NULL as \\N.
    Built column by column: a column's values mostly have one type, and its texts are searched for
    what needs escaping all at once."""
    if not rows:
        return ""
    values = map(itemgetter(*columns), rows) if len(columns) > 1 else ((row[columns[0]],) for row in rows)
    fields = [_column_text(list(column)) for column in zip(*values, strict=True)]
    lines = list(map("\t".join, zip(*fields, strict=True)))
    lines.append("")
    return "\n".join(lines)


def _column_text(values: list[Any]) -> list[str]:
    kinds = set(map(type, values))
    if kinds <= _TEXTS:
        nulls = _NONE in kinds
        texts = [v for v in values if v is not None] if nulls else values
        if any(_special(texts[i : i + CHECKED_AT_ONCE]) for i in range(0, len(texts), CHECKED_AT_ONCE)):
            values = [v if v is None else v.translate(_COPY_ESCAPES) for v in values]
        return ["\\N" if v is None else v for v in values] if nulls else values
    if kinds <= _INTEGERS:
        return ["\\N" if v is None else str(v) for v in values] if _NONE in kinds else list(map(str, values))
    if kinds <= _BOOLEANS:
        return [_BOOLEAN_TEXT[v] for v in values]
    return [_field_text(v) for v in values]


CHECKED_AT_ONCE = 256  # texts joined to be searched for what needs escaping (bounded: rows may be large)


def _special(texts: list[str]) -> bool:
    joined = "".join(texts)
    return "\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined


def _field_text(value: Any) -> str:
    if type(value) is str:
        return value.translate(_COPY_ESCAPES)
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    return str(value)


# Bytes handed to the server at a time: psycopg2's default, 8 KiB, takes the GIL back 128 times as
# often, each time waiting behind the decoding thread.
COPY_CHUNK = 1 << 20


def upsert_rows(
    cur: Any, target: TargetTable, columns: tuple[str, ...], rows: list[dict[str, Any]], only_changed: bool
) -> None:
    """INSERT ... ON CONFLICT DO UPDATE of rows with these columns, read through COPY into the
    staging table, which the same statement empties again (a transaction may upsert rows of the
    same columns more than once)."""
    stage = staging(target, columns)
    cur.execute(stage.create)
    cur.copy_expert(stage.copy, io.BytesIO(copy_text(rows, columns).encode()), size=COPY_CHUNK)
    cur.execute(stage.upserts[only_changed])


# Fewer rows go in one statement from JSON: three round trips (create, COPY, upsert) cost more than
# PostgreSQL's parsing of a few rows' JSON, which only shows in bulk (77,000 against 72,000 events/s)
STAGED_FROM = 256


def can_stage(conn: Any) -> bool:
    """Whether the session may create temporary tables (the TEMPORARY privilege on the database,
    which PostgreSQL grants to everyone by default); without it rows are upserted from JSON."""
    with conn.cursor() as cur:
        cur.execute("SELECT has_database_privilege(current_database(), 'TEMPORARY')")
        allowed = bool(cur.fetchone()[0])
    conn.commit()
    return allowed


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


def apply_table(cur: Any, target: TargetTable, batch: TableBatch, staged: bool = True) -> None:
    """The batch's truncates, then deletes, then upserts (each key has one net change); `staged`:
    the upserts through COPY and the staging table (can_stage), else from JSON."""
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
                if staged and len(rows) >= STAGED_FROM:
                    upsert_rows(cur, target, columns, rows, snapshot)
                else:
                    cur.execute(upsert_statement(target, columns, snapshot), (_json(rows),))
