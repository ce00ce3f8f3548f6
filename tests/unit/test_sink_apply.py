"""sink_connector.apply: the rows an upsert hands to COPY, and the statements of the staging table."""

from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.tables import TableName
from sink_connector.apply import Staging, copy_text
from sink_connector.target import TargetTable

VALUES = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()


def read_copy_text(text: str) -> list[list[str | None]]:
    """COPY's text format read back, as PostgreSQL reads it (the escapes copy_text writes)."""
    unescape = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    rows = []
    for line in text.split("\n")[:-1]:
        fields: list[str | None] = []
        for field in line.split("\t"):
            if field == "\\N":
                fields.append(None)
                continue
            out, i = [], 0
            while i < len(field):
                if field[i] == "\\":
                    out.append(unescape[field[i + 1]])
                    i += 2
                else:
                    out.append(field[i])
                    i += 1
            fields.append("".join(out))
        rows.append(fields)
    return rows


def as_text(value: object) -> str | None:
    """The text PostgreSQL's input function is to read for a JSON value of an event."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


@given(st.lists(st.fixed_dictionaries({"id": st.integers(0, 2**31), "a": VALUES, "b": VALUES}), max_size=5))
def test_copy_text_reads_back_as_the_rows_values(rows: list[dict[str, object]]) -> None:
    columns = ("id", "a", "b")
    assert read_copy_text(copy_text(rows, columns)) == [[as_text(row[c]) for c in columns] for row in rows]


def test_copy_text_escapes_what_copy_reads_as_separators() -> None:
    rows = [
        {"id": 1, "t": "back\\slash\ttab\nnew\r\nline", "n": None, "b": True},
        {"id": 2, "t": "\\.", "n": "x", "b": False},
    ]
    assert copy_text(rows, ("id", "t", "n", "b")) == (
        "1\tback\\\\slash\\ttab\\nnew\\r\\nline\t\\N\tt\n2\t\\\\.\tx\tf\n"
    )


def test_only_the_columns_written_and_in_their_order() -> None:
    assert copy_text([{"b": "2", "a": "1", "gone": "x"}], ("a", "b")) == "1\t2\n"


def test_each_column_set_and_each_retyping_has_its_own_staging_table() -> None:
    table = TargetTable(TableName("public", "t"), {"id": "bigint", "n": "integer", "s": "text"}, ("id",))
    retyped = TargetTable(TableName("public", "t"), {"id": "bigint", "n": "bigint", "s": "text"}, ("id",))
    names = {
        repr(Staging(t, columns).copy)
        for t, columns in ((table, ("id", "n")), (table, ("id", "s")), (retyped, ("id", "n")))
    }
    assert len(names) == 3
    # the upsert empties the staging table again in the same statement
    assert "TRUNCATE" in repr(Staging(table, ("id", "n")).upserts[False])
