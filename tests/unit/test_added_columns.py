"""Columns the source added while streaming: reading PostgreSQL's missing value out of its array
text, choosing how the sink adds the column, the operator's lines, the source access of the command."""

import pytest

from pg_kafka_cdc.common.catalog import ColumnFill, array_element
from pg_kafka_cdc.common.tables import TableName
from sink_connector.added_columns import (
    Fill,
    SourceAccess,
    asked_line,
    fill_for,
    refused_line,
    snapshot_command,
    unknown_line,
)
from sink_connector.target import fill_note

PERSON = TableName("public", "person")


@pytest.mark.parametrize(
    ("text", "element"),
    [
        ("{5}", "5"),
        ("{1234.50}", "1234.50"),
        ('{"2026-12-01 16:15:06.162897+00"}', "2026-12-01 16:15:06.162897+00"),
        ('{"a,b \\"q\\" \\\\ {x}"}', 'a,b "q" \\ {x}'),
        ('{""}', ""),
        ('{"NULL"}', "NULL"),  # the text NULL is quoted; a bare NULL is no value
        ("{NULL}", None),
        ("{(1,1),(0,0)}", "(1,1),(0,0)"),  # a box: its delimiter is `;`, so the commas are its own
        ('{"{1,2}"}', "{1,2}"),  # an integer[] column: its value is an array
        ('{"{\\"a,b\\",NULL}"}', '{"a,b",NULL}'),
        ('{"ab  "}', "ab  "),  # character(4) keeps its padding
        ('{"\\\\x00ff"}', "\\x00ff"),
        ("[0:0]={7}", "7"),
        ('{"{\\"a\\": [1, \\"x,y\\"]}"}', '{"a": [1, "x,y"]}'),
    ],
)
def test_the_element_of_a_missing_value_is_its_exact_output_text(text: str, element: str | None) -> None:
    assert array_element(text) == element


@pytest.mark.parametrize("text", ["", "5", "{5", '{"5}', "{"])
def test_what_is_not_a_one_element_array_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        array_element(text)


def fill(missing: str | None = None, default: str | None = None, not_null: bool = False) -> ColumnFill:
    return ColumnFill("score", "integer", not_null, missing, default)


@pytest.mark.parametrize(
    ("column", "how"),
    [
        (fill("5", "5", not_null=True), Fill.VALUE),  # NOT NULL DEFAULT 5 on a table with rows
        (fill("2026-12-01 16:15:06.162897+00", "now()"), Fill.VALUE),  # now(): once, at the ALTER
        (fill(None, "gen_random_uuid()"), Fill.SNAPSHOT),  # volatile: a value per row, table rewritten
        (fill(None, "5"), Fill.SNAPSHOT),  # the table was rewritten since (VACUUM FULL, ALTER TYPE...)
        (fill(None, None, not_null=True), Fill.SNAPSHOT),  # NOT NULL without a default: filled somehow
        (fill(None, None), Fill.PLAIN),  # NULL on the source too
        (None, Fill.PLAIN),  # no longer on the source
    ],
)
def test_how_a_column_is_added_follows_what_the_source_says_of_it(column: ColumnFill | None, how: Fill) -> None:
    assert fill_for(column) is how


def test_the_log_line_says_when_the_rows_got_the_sources_value() -> None:
    assert fill_note(Fill.PLAIN, None) == ""
    assert fill_note(Fill.SNAPSHOT, fill(None, "random()")) == ""
    assert "NOT NULL" in fill_note(Fill.VALUE, fill("5", "5", not_null=True))
    assert "NOT NULL" not in fill_note(Fill.VALUE, fill("5", "5"))
    assert "as its default" in fill_note(Fill.VALUE, fill("5", "5"))


def test_the_commands_given_are_ready_for_a_shell() -> None:
    assert snapshot_command("cdc_slot", PERSON) == "cdc-source snapshot --slot cdc_slot --tables public.person"
    assert snapshot_command(None, PERSON) == "cdc-source snapshot --tables public.person"
    assert (
        snapshot_command("s", TableName("public", "Order Items"))
        == "cdc-source snapshot --slot s --tables 'public.\"Order Items\"'"
    )


def test_each_problem_is_one_line_naming_the_table_the_column_and_the_fix() -> None:
    asked = asked_line("cdc_slot", PERSON, ["token"])
    assert asked == (
        "asked cdc-source (slot cdc_slot) to re-read public.person: column token was added with a default "
        "whose values the stream does not carry"
    )
    refused = refused_line("cdc_slot", PERSON, ["token"], "permission denied for function pg_logical_emit_message")
    assert (
        "permission denied" in refused
        and "`cdc-source snapshot --slot cdc_slot --tables public.person`" in refused
    )
    unknown = unknown_line(None, PERSON, ["score", "noted"], "cannot connect to the source database")
    assert "score, noted" in unknown and "read NULL" in unknown
    assert "`cdc-source snapshot --tables public.person`" in unknown
    for line in (asked, refused, unknown):
        assert "\n" not in line


def test_the_source_access_never_shows_the_password() -> None:
    access = SourceAccess("postgresql://u:secret@db:5432/d", "other")
    assert (access.dsn, access.slot) == ("postgresql://u:secret@db:5432/d", "other")
    assert "secret" not in repr(access)


def test_an_unreachable_source_is_left_alone_for_a_while() -> None:
    access = SourceAccess("postgresql://postgres:secret@127.0.0.1:1/testdb", "cdc_slot")
    assert access.fills(PERSON, ["score"]) is None
    assert "cannot connect to the source database" in access.reason
    assert "secret" not in access.reason
    assert access.down_until > 0
    assert access.ask_for_snapshot(PERSON, ["token"]) is not None  # not tried again: the same reason
    assert access.asked == set()
