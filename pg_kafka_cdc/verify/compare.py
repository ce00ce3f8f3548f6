"""Comparing a table on the source and the target inside each database: rows are hashed by key into
buckets, each side sums up its buckets (row count and an XOR of row hashes, the row as PostgreSQL
prints it as text), and only the buckets that differ are read row by row to name the keys."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from psycopg2 import sql

from pg_kafka_cdc.common.catalog import TableDef

BUCKETS = 1024


@dataclass
class TableReport:
    table: str
    source_rows: int = 0
    target_rows: int = 0
    missing: list[str] = field(default_factory=list)  # first keys in the source only
    extra: list[str] = field(default_factory=list)  # first keys in the target only
    changed: list[str] = field(default_factory=list)  # first keys with different values
    counts: dict[str, int] = field(default_factory=lambda: {"missing": 0, "extra": 0, "changed": 0})
    problem: str | None = None

    @property
    def identical(self) -> bool:
        return self.problem is None and not any(self.counts.values()) and self.source_rows == self.target_rows


def _row_expr(definition: TableDef) -> sql.Composable:
    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(sql.Identifier(c.name) for c in definition.columns))


def _key_expr(definition: TableDef) -> sql.Composable:
    return sql.SQL("ROW({})::text").format(sql.SQL(", ").join(map(sql.Identifier, definition.key)))


def _table_query(template: str, definition: TableDef) -> sql.Composed:
    """`template` with the table's {key} and {row} text, the bucket {mask} and the {table}."""
    return sql.SQL(template).format(
        key=_key_expr(definition),
        row=_row_expr(definition),
        mask=sql.Literal(BUCKETS - 1),
        table=sql.Identifier(definition.name.schema, definition.name.name),
    )


def bucket_query(definition: TableDef) -> sql.Composed:
    return _table_query(
        "SELECT (hashtextextended({key}, 0) & {mask})::int AS b, count(*), bit_xor(hashtextextended({row}, 1)) "
        "FROM {table} GROUP BY 1",
        definition,
    )


def rows_query(definition: TableDef) -> sql.Composed:
    return _table_query(
        "SELECT {key}, hashtextextended({row}, 1) FROM {table} WHERE (hashtextextended({key}, 0) & {mask})::int = ANY(%s)",
        definition,
    )


def _fetch(conn: Any, query: sql.Composed, params: Any = None) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(query, params)
        rows: list[tuple[Any, ...]] = cur.fetchall()
    conn.rollback()
    return rows


def compare_table(
    source: Any, target: Any, definition: TableDef, target_columns: set[str], limit: int
) -> TableReport:
    report = TableReport(str(definition.name))
    absent = [c.name for c in definition.columns if c.name not in target_columns]
    if absent:
        report.problem = f"the target lacks column{'s' if len(absent) > 1 else ''} {', '.join(absent)}"
        return report
    query = bucket_query(definition)
    with ThreadPoolExecutor(2) as pool:
        src_future = pool.submit(_fetch, source, query)
        tgt_future = pool.submit(_fetch, target, query)
        src = {b: (n, h) for b, n, h in src_future.result()}
        tgt = {b: (n, h) for b, n, h in tgt_future.result()}
    report.source_rows = sum(n for n, _ in src.values())
    report.target_rows = sum(n for n, _ in tgt.values())
    differing = sorted(b for b in src.keys() | tgt.keys() if src.get(b) != tgt.get(b))
    if not differing:
        return report
    query = rows_query(definition)
    with ThreadPoolExecutor(2) as pool:
        src_rows = dict(pool.submit(_fetch, source, query, (differing,)).result())
        tgt_rows = dict(pool.submit(_fetch, target, query, (differing,)).result())
    missing = sorted(src_rows.keys() - tgt_rows.keys())
    extra = sorted(tgt_rows.keys() - src_rows.keys())
    changed = sorted(k for k in src_rows.keys() & tgt_rows.keys() if src_rows[k] != tgt_rows[k])
    report.counts = {"missing": len(missing), "extra": len(extra), "changed": len(changed)}
    report.missing, report.extra, report.changed = missing[:limit], extra[:limit], changed[:limit]
    if report.identical:
        # Buckets differed but no row does: rows changed between the two reads (a pipeline still
        # applying), or, far less likely, a collision of the bucket sums. Not identical either way.
        report.problem = "rows changed while they were compared (is the pipeline still applying?); run again"
    return report
