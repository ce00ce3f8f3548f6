"""Why the target refused a write of the sink, and what fixes it: a constraint or a trigger the target
table has that the source's rows are not held to (a target made with `pg_dump --schema-only` of
another database, a unique index added on the target only, a trigger that raises). The error's own
fields (psycopg2's `exc.diag`) name the constraint and the table; nothing here touches a database."""

import re
from dataclasses import dataclass

from pg_kafka_cdc.common.tables import TableName, quote_if_needed

UNIQUE, EXCLUSION, FOREIGN_KEY, CHECK, NOT_NULL, RESTRICT = "23505", "23P01", "23503", "23514", "23502", "23001"
CONSTRAINTS = {UNIQUE, EXCLUSION, FOREIGN_KEY, CHECK, NOT_NULL, RESTRICT}

# A function in an error's context, outermost last: `PL/pgSQL function audit.refuse() line 3 at RAISE`.
_FUNCTION = re.compile(r"^(?:PL/\S+|SQL) function (\S+?)\(", re.MULTILINE)


def replica_grant(role: str) -> str:
    """The statement that lets `role` (as SQL: quoted where needed) apply as a replica."""
    return f"GRANT SET ON PARAMETER session_replication_role TO {role}"


@dataclass(frozen=True)
class Refusal:
    """The fields of a server error that say what refused the write."""

    sqlstate: str
    message: str  # the primary message, without DETAIL
    detail: str = ""
    constraint: str = ""
    schema: str = ""
    table: str = ""
    column: str = ""
    context: str = ""

    @property
    def function(self) -> str:
        """The outermost function the error was raised in (a trigger's), or ''."""
        found = _FUNCTION.findall(self.context)
        return found[-1] if found else ""


def refusal_of(exc: BaseException) -> Refusal | None:
    """The error's fields, when the server sent them."""
    diag = getattr(exc, "diag", None)
    sqlstate = getattr(exc, "pgcode", None)
    if diag is None or not sqlstate:
        return None
    return Refusal(
        sqlstate=sqlstate,
        message=diag.message_primary or "",
        detail=diag.message_detail or "",
        constraint=diag.constraint_name or "",
        schema=diag.schema_name or "",
        table=diag.table_name or "",
        column=diag.column_name or "",
        context=diag.context or "",
    )


def _table(refusal: Refusal, table: TableName | None) -> str:
    if refusal.table:
        return str(TableName(refusal.schema or (table.schema if table else "public"), refusal.table))
    return str(table) if table else "the target table"


def _what(refusal: Refusal, table: str) -> str:
    detail = f" ({refusal.detail.rstrip('.')})" if refusal.detail else ""
    return f"{refusal.message}{detail}, on target table {table}"


def _constraint_fix(refusal: Refusal, table: str, replica: bool, role: str) -> str:
    name = quote_if_needed(refusal.constraint)
    if refusal.sqlstate == NOT_NULL:
        column = quote_if_needed(refusal.column)
        return (
            f"the source lets column {refusal.column} be null: make the target's column like the source's "
            f"(ALTER TABLE {table} ALTER COLUMN {column} DROP NOT NULL)"
        )
    drop = f"ALTER TABLE {table} DROP CONSTRAINT {name}"
    if refusal.sqlstate in (UNIQUE, EXCLUSION):
        drop += f", or DROP INDEX {quote_if_needed(refusal.schema or 'public')}.{name} for a unique index"
    if refusal.sqlstate in (FOREIGN_KEY, RESTRICT) and not replica:
        return (
            f"the sink checks the target's foreign keys because its role may not set session_replication_role, "
            f"and each table has its own topic, so a row may come before the row it references: as an "
            f"administrator on the target, {replica_grant(role)}, then restart the sink (or drop the "
            f"constraint on the target: {drop})"
        )
    return (
        f"the target has constraint {refusal.constraint}, which the source's rows are not held to: drop it "
        f"on the target or make it the same as the source's ({drop})"
    )


def _trigger_fix(refusal: Refusal, table: str, replica: bool, role: str) -> str:
    where = f"function {refusal.function} (a trigger of {table} on the target)"
    if replica:
        return (
            f"raised in {where}, which fires although the sink applies as a replica because it is enabled "
            f"ALWAYS or REPLICA: fix it, or make it an ordinary trigger (ALTER TABLE {table} ENABLE TRIGGER ...)"
        )
    return (
        f"raised in {where}; the target's triggers fire because the sink's role may not set "
        f"session_replication_role: as an administrator on the target, {replica_grant(role)}, then restart "
        f"the sink (or ALTER TABLE {table} DISABLE TRIGGER ...)"
    )


def explain(refusal: Refusal, replica: bool, role: str, table: TableName | None = None) -> str | None:
    """One line naming what refused the write, the table and the fix; None for an error that is
    neither a constraint's nor a trigger's. `replica`: the session applies as a replica; `role`: the
    sink's role, as SQL; `table`: the table written, when the error does not name it."""
    where = _table(refusal, table)
    if refusal.sqlstate in CONSTRAINTS:
        return f"{_what(refusal, where)}: {_constraint_fix(refusal, where, replica, role)}"
    if refusal.function:
        return f"{_what(refusal, where)}: {_trigger_fix(refusal, where, replica, role)}"
    return None


def explain_error(exc: BaseException, replica: bool, role: str, table: TableName | None = None) -> str | None:
    """explain() for a psycopg2 error."""
    refusal = refusal_of(exc)
    return None if refusal is None else explain(refusal, replica, role, table)
