"""Applying to a target with its own schema (refusals.py, replica_role.py, the generated columns of
target.py and bulk_copy.py): constraint and trigger errors named with their table and fix, the
warning of a role that may not apply as a replica, generated columns never written."""

from types import SimpleNamespace
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

from pg_kafka_cdc.common.catalog import Column, TableDef
from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import TableName
from sink_connector.bookkeeping import Bookkeeping
from sink_connector.bulk_copy import copy_statements
from sink_connector.poison import ErrorPolicy
from sink_connector.refusals import Refusal, explain, explain_error, refusal_of, replica_grant
from sink_connector.replica_role import fallback_warning
from sink_connector.session import TargetSession
from sink_connector.target import TargetTable
from tests.unit.test_sink_batch import PERSON, PERSON_0, Loop

PERSON_TABLE = TableName("public", "person")
GRANT = "GRANT SET ON PARAMETER session_replication_role TO cdc_sink"


def unique(**fields: str) -> Refusal:
    base = {
        "sqlstate": "23505",
        "message": 'duplicate key value violates unique constraint "person_email_key"',
        "detail": "Key (email)=(a@example.org) already exists.",
        "constraint": "person_email_key",
        "schema": "public",
        "table": "person",
    }
    return Refusal(**{**base, **fields})


# --- constraints ---------------------------------------------------------------------------------


def test_a_unique_violation_names_the_constraint_the_table_and_the_fix() -> None:
    line = explain(unique(), replica=True, role="cdc_sink")
    assert line is not None
    assert 'unique constraint "person_email_key"' in line
    assert "Key (email)=(a@example.org) already exists" in line
    assert "on target table public.person" in line
    assert "ALTER TABLE public.person DROP CONSTRAINT person_email_key" in line
    assert "DROP INDEX public.person_email_key" in line
    assert "\n" not in line


def test_names_that_need_quotes_are_quoted_in_the_fix() -> None:
    line = explain(unique(schema="Sales", table="Order Items", constraint="Uniq"), replica=True, role="r")
    assert line is not None
    assert 'on target table "Sales"."Order Items"' in line
    assert 'DROP CONSTRAINT "Uniq"' in line and 'DROP INDEX "Sales"."Uniq"' in line


def test_a_foreign_key_without_the_replica_role_gives_the_grant() -> None:
    refusal = Refusal(
        "23503",
        'insert or update on table "orders" violates foreign key constraint "orders_person_id_fkey"',
        'Key (person_id)=(5) is not present in table "person".',
        "orders_person_id_fkey",
        "public",
        "orders",
    )
    line = explain(refusal, replica=False, role="cdc_sink")
    assert line is not None
    assert '"orders_person_id_fkey"' in line and "public.orders" in line
    assert GRANT in line
    assert "ALTER TABLE public.orders DROP CONSTRAINT orders_person_id_fkey" in line
    # as a replica a foreign key does not fire; should one still refuse, the fix is the constraint
    line = explain(refusal, replica=True, role="cdc_sink")
    assert line is not None and GRANT not in line and "DROP CONSTRAINT orders_person_id_fkey" in line


def test_a_check_and_a_not_null_name_their_fix() -> None:
    check = Refusal("23514", 'new row for relation "person" violates check constraint "positive"', "", "positive")
    line = explain(check, replica=True, role="r", table=PERSON_TABLE)
    assert line is not None and "ALTER TABLE public.person DROP CONSTRAINT positive" in line
    not_null = Refusal(
        "23502", 'null value in column "phone" of relation "person" violates not-null constraint', column="phone"
    )
    line = explain(not_null, replica=True, role="r", table=PERSON_TABLE)
    assert line is not None and "ALTER TABLE public.person ALTER COLUMN phone DROP NOT NULL" in line


# --- triggers ------------------------------------------------------------------------------------

CONTEXT = "PL/pgSQL function audit.helper() line 2 at RAISE\nPL/pgSQL function audit.refuse() line 3 at PERFORM"


def test_an_error_raised_in_a_trigger_names_the_function_and_the_table() -> None:
    refusal = Refusal("P0001", "no writes here", context=CONTEXT)
    assert refusal.function == "audit.refuse"
    as_replica = explain(refusal, replica=True, role="cdc_sink", table=PERSON_TABLE)
    assert as_replica is not None
    assert "no writes here" in as_replica and "function audit.refuse" in as_replica
    assert "public.person" in as_replica and "ALWAYS" in as_replica
    ordinary = explain(refusal, replica=False, role="cdc_sink", table=PERSON_TABLE)
    assert ordinary is not None and GRANT in ordinary and "DISABLE TRIGGER" in ordinary


def test_other_errors_are_not_explained() -> None:
    bad_value = Refusal("22P02", 'invalid input syntax for type integer: "abc"')
    assert explain(bad_value, replica=True, role="r") is None


# --- from psycopg2 errors ------------------------------------------------------------------------


def diag(**fields: str | None) -> SimpleNamespace:
    names = ("message_primary", "message_detail", "constraint_name", "schema_name", "table_name")
    return SimpleNamespace(**{n: None for n in (*names, "column_name", "context")} | fields)


def test_refusal_of_reads_the_error_fields() -> None:
    exc: Any = SimpleNamespace(
        pgcode="23505",
        diag=diag(message_primary="duplicate key", constraint_name="k", schema_name="public", table_name="t"),
    )
    assert refusal_of(exc) == Refusal("23505", "duplicate key", "", "k", "public", "t")
    line = explain_error(exc, replica=True, role="r")
    assert line is not None and "ALTER TABLE public.t DROP CONSTRAINT k" in line


def test_an_error_without_a_sqlstate_is_no_refusal() -> None:
    assert refusal_of(psycopg2.OperationalError("server closed the connection")) is None
    assert refusal_of(ValueError("x")) is None


# --- the role ------------------------------------------------------------------------------------


def test_the_fallback_warning_names_the_consequence_and_the_grant() -> None:
    line = fallback_warning('"Sink Role"')
    assert "foreign keys and triggers fire" in line
    assert "before the row it references" in line
    assert replica_grant('"Sink Role"') in line
    assert line.endswith('GRANT SET ON PARAMETER session_replication_role TO "Sink Role"')


def test_a_session_that_cannot_apply_as_a_replica_warns_once_as_it_starts_writing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session = TargetSession("postgresql://unused", Bookkeeping("cdc_sink", "g"), {})
    session.replica, session.role = False, "cdc_sink"
    session.writing()
    session.writing()
    assert [r.getMessage() for r in caplog.records] == [fallback_warning("cdc_sink")]
    replica = TargetSession("postgresql://unused", Bookkeeping("cdc_sink", "g"), {})
    replica.replica = True
    caplog.clear()
    replica.writing()
    assert caplog.records == []


# --- generated columns ---------------------------------------------------------------------------


def test_generated_columns_are_never_written() -> None:
    target = TargetTable(
        PERSON_TABLE, {"id": "bigint", "n": "text", "full": "text"}, ("id",), generated=frozenset({"full"})
    )
    assert target.written(("id", "n", "full", "gone")) == ("id", "n")
    assert TargetTable(PERSON_TABLE, {"id": "bigint"}, ("id",)).written(("id",)) == ("id",)


def identifiers(composed: sql.Composable) -> list[str]:
    """Every identifier part in a composed statement."""
    if isinstance(composed, sql.Identifier):
        return list(composed.strings)
    if isinstance(composed, sql.Composed):
        return [name for part in composed.seq for name in identifiers(part)]
    return []


def column(name: str) -> Column:
    return Column(name, "text", False, 25, "b", "pg_catalog", "text", 0, "", "", "")


def test_the_bulk_copy_leaves_the_targets_generated_columns_out() -> None:
    definition = TableDef(PERSON_TABLE, 1, (column("id"), column("n"), column("full")), ("id",), True, "d")
    copy_out, copy_in = copy_statements(definition, True, frozenset({"full"}))
    assert identifiers(copy_out) == ["id", "n", "public", "person"]
    assert identifiers(copy_in) == ["public", "person", "id", "n"]
    assert identifiers(copy_statements(definition, True, frozenset())[1]) == [
        "public",
        "person",
        "id",
        "n",
        "full",
    ]


# --- the batch loop ------------------------------------------------------------------------------


def test_a_batch_no_single_change_of_which_fails_names_the_constraint() -> None:
    loop = Loop()
    loop.assign(PERSON_0)
    explained = "duplicate key value violates unique constraint x, on target table public.person: drop it"
    loop.processor.policy = ErrorPolicy("fail", set(), lambda exc: explained)
    loop.target.reject_batches = True
    with pytest.raises(SinkError, match="no single change of it does") as raised:
        loop.processor.run([loop.stream.upsert("person", 2, "b")], StopFlag())
    assert explained in str(raised.value)
    assert loop.rows(PERSON) == {}


def test_without_an_explanation_the_servers_words_remain() -> None:
    policy = ErrorPolicy("fail", set())
    assert policy.reason(psycopg2.DataError("ERROR:  bad value")) == "bad value"
