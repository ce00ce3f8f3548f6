"""cdc-source against the real stack: exact values of every common type, on the snapshot and the
stream path, and NaN in NOT NULL columns.
(The `reader` fixture keeps the envelopes a test read: see tests/source_events.py.)"""

import re
from typing import Any

from tests.conftest import Databases
from tests.helpers import psql_rows
from tests.pipeline import (
    execute,
    start_source,
)
from tests.source_events import (
    EventReader,
    count,
    describe,
    new_slot,
    source_text_rows,
    topic_of,
)

# --- 7. exact values -----------------------------------------------------------------------

VALUE_COLUMNS = """
    id int PRIMARY KEY,
    n numeric(38,10), n30 numeric, bi bigint, si smallint, i int, o oid,
    r real, d double precision,
    b bytea, t text, vc varchar(20), ch char(4),
    j json, jb jsonb, ia int[], ta text[],
    ts timestamptz, tsn timestamp, dt date, tm time, iv interval,
    u uuid, ip inet, m mood, flag boolean
"""

VALUE_ROWS = r"""
INSERT INTO vals VALUES
(1, 12345678901234567890.0123456789, 123456789012345678901234567890, 9223372036854775807, 32767,
 2147483647, 4294967295, '3.4028235e+38', '1.7976931348623157e+308',
 '\x00ff10'::bytea, E'quote " apostrophe '' backslash \\ newline \n tab \t unicode \u00e9 \u2713 \U0001F389',
 'abc', 'ab', '{"a" : 1,  "a": [1, 2 ]  ,"b":"x\ty"}', '{"b": [1, 2.50, "x"], "a": null}',
 '{1,NULL,-3}', '{"a b","c,d","e\"f",NULL,"\\\\"}',
 '2024-02-29 23:59:59.999999+05:30', '2024-02-29 23:59:59.999999', '2024-02-29', '23:59:59.5',
 '1 year 2 months 3 days 04:05:06.789', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '192.168.0.1/24', 'happy', true),
(2, -0.0000000001, -123456789012345678901234567890, -9223372036854775808, -32768,
 -2147483648, 0, '1.4e-45', '5e-324',
 ''::bytea, '', '', '', '[]', '{}', '{}', '{}',
 '-infinity', 'infinity', '0001-01-01 BC', '00:00', '-1 days +02:00:00', '00000000-0000-0000-0000-000000000000',
 '::1', 'sad', false),
(3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
 NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
(4, 0, 0.000000000000000000000000000001, 0, 0, 0, 1, '-0', '-0',
 '\x'::bytea, ' ', ' ', ' ', 'null', '"str"', '{{1,2},{3,4}}', '{""}',
 '1970-01-01 00:00:00+00', '1970-01-01', '1970-01-01', '24:00', '0', 'ffffffff-ffff-ffff-ffff-ffffffffffff',
 '2001:db8::/32', 'ok', NULL)
"""

INTEGER_TYPES = {"smallint", "integer", "bigint", "oid"}


def expected_value(type_name: str, text: str | None) -> Any:
    """The envelope form of PostgreSQL's text: integers and booleans as JSON, the rest as the text."""
    if text is None:
        return None
    if type_name in INTEGER_TYPES:
        return int(text)
    if type_name == "boolean":
        return {"true": True, "false": False}[text]
    return text


def test_exact_values(dbs: Databases, topic_prefix: str, reader: EventReader) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
        f"CREATE TABLE vals ({VALUE_COLUMNS})",
        VALUE_ROWS,  # rows 1-4 exist before the start: the snapshot path (`r`)
        separately=True,
    )
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    names = [
        str(n)
        for (n,) in psql_rows(
            dbs.source_dsn,
            "SELECT attname FROM pg_attribute WHERE attrelid = 'vals'::regclass AND attnum > 1 ORDER BY attnum",
        )
    ]
    # The same values again, written while streaming: the wal2json path (`c`).
    execute(
        dbs.source_dsn,
        f"INSERT INTO vals SELECT id + 10, {', '.join(names)} FROM vals ORDER BY id",
    )
    vals = topic_of(topic_prefix, "vals")
    events = reader.wait_then_stop([vals], count(vals, 8), "the rows", process)

    rows = source_text_rows(dbs, "vals")
    cast_rows = source_text_rows(dbs, "vals", cast=True)
    # `col::text` is the text output, as the envelope carries it, except for two types whose cast to
    # text is a function of its own: character(n) trims the padding, inet adds a host mask.
    for ident, row in rows.items():
        differs = {c for c in row if row[c] != cast_rows[ident][c]}
        assert differs <= {"ch", "ip"}, (ident, differs)
    assert (rows["1"]["ch"], cast_rows["1"]["ch"]) == ("ab  ", "ab")
    assert (rows["2"]["ip"], cast_rows["2"]["ip"]) == ("::1", "::1/128")
    types = dict(
        psql_rows(
            dbs.source_dsn,
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'vals'::regclass AND attnum > 0 ORDER BY attnum",
        )
    )
    assert [(e.op, e.key) for e in events] == [
        *(("r", f'{{"id":{i}}}'.encode()) for i in (1, 2, 3, 4)),
        *(("c", f'{{"id":{i}}}'.encode()) for i in (11, 12, 13, 14)),
    ], describe(events)
    for e in events:
        assert e.env["columns"] == types, "`columns` is the catalog's format_type of every column"
        after = e.after
        assert after is not None
        source_row = rows[str(after["id"])]
        assert list(after) == list(source_row), "every column, in column order"
        for column, text in source_row.items():
            want = expected_value(types[column], text)
            got = after[column]
            assert got == want and type(got) is type(want), (
                f"{e.op} id={after['id']} column {column} ({types[column]}): got {got!r}, PostgreSQL prints {text!r}"
            )

    # The snapshot (`r`) and the stream (`c`) give the same value the same text.
    by_id = {e.env["after"]["id"]: e.env["after"] for e in events}
    for base in (1, 2, 3, 4):
        assert {**by_id[base], "id": 0} == {**by_id[base + 10], "id": 0}, f"rows {base} and {base + 10} differ"
    # The same facts, spelled out, for the values that are easiest to get wrong.
    for base in (1, 11):
        row = by_id[base]
        assert row["n"] == "12345678901234567890.0123456789"
        assert row["n30"] == "123456789012345678901234567890"
        assert row["bi"] == 9223372036854775807 and row["o"] == 4294967295
        assert row["r"] == "3.4028235e+38" and row["d"] == "1.7976931348623157e+308"
        assert row["b"] == "\\x00ff10"
        assert row["t"] == "quote \" apostrophe ' backslash \\ newline \n tab \t unicode \u00e9 \u2713 \U0001f389"
        assert row["j"] == r'{"a" : 1,  "a": [1, 2 ]  ,"b":"x\ty"}', "json keeps its exact text"
        assert row["jb"] == '{"a": null, "b": [1, 2.50, "x"]}'
        assert row["ts"] == "2024-02-29 18:29:59.999999+00"
        assert row["iv"] == "P1Y2M3DT4H5M6.789S"
        assert row["ch"] == "ab  " and row["ip"] == "192.168.0.1/24"
        assert row["flag"] is True
    for base in (2, 12):
        row = by_id[base]
        assert row["n"] == "-0.0000000001"
        assert row["bi"] == -9223372036854775808 and row["si"] == -32768
        assert row["r"] == "1e-45" and row["d"] == "5e-324"
        assert row["b"] == "\\x" and row["flag"] is False
        assert row["ip"] == "::1" and row["iv"] == "P-1DT2H"
    for base in (3, 13):
        assert all(v is None for k, v in by_id[base].items() if k != "id")
    for base in (4, 14):
        assert by_id[base]["r"] == "-0" and by_id[base]["d"] == "-0"
        assert by_id[base]["n30"] == "0.000000000000000000000000000001"
    # Integers really are JSON integers in the bytes on the wire, not strings or floats.
    raw = next(e.raw for e in events if e.op == "c" and e.key == b'{"id":11}')
    assert raw is not None and b'"bi":9223372036854775807,' in raw and b'"si":32767,' in raw
    reader.assert_valid()


# --- 8. NaN --------------------------------------------------------------------------------


def test_nan_in_not_null_column_arrives_as_null_with_one_warning(
    dbs: Databases, topic_prefix: str, reader: EventReader
) -> None:
    execute(
        dbs.source_dsn,
        "CREATE TABLE nums (id int PRIMARY KEY, n numeric NOT NULL, d double precision NOT NULL, label text)",
        "INSERT INTO nums VALUES (0, 'NaN', 'Infinity', 'before')",  # read by the snapshot, as text
        separately=True,
    )
    process = start_source(dbs, topic_prefix, new_slot(), streaming=True)
    execute(
        dbs.source_dsn,
        "INSERT INTO nums VALUES (1, 'NaN', 1.5, 'a')",
        "INSERT INTO nums VALUES (2, 'NaN', 'Infinity', 'b')",
        "INSERT INTO nums VALUES (3, 2.5, '-Infinity', 'c')",
        "INSERT INTO nums VALUES (4, 4.25, 4.25, 'd')",
        separately=True,
    )
    nums = topic_of(topic_prefix, "nums")
    events = reader.wait_then_stop([nums], count(nums, 5), "the rows", process)
    stderr = process.stderr_text()

    assert [e.after for e in events] == [
        {"id": 0, "n": "NaN", "d": "Infinity", "label": "before"},  # the snapshot reads the text: kept
        {"id": 1, "n": None, "d": "1.5", "label": "a"},  # wal2json 2.5 prints NaN as null: lost
        {"id": 2, "n": None, "d": None, "label": "b"},
        {"id": 3, "n": "2.5", "d": None, "label": "c"},
        {"id": 4, "n": "4.25", "d": "4.25", "label": "d"},
    ], describe(events)
    assert re.search(r"INFO .* wal2json (sends every number as a string|here is older than 2\.6)", stderr), (
        f"the start-up log must say whether NaN survives the stream:\n{stderr}"
    )
    warnings = [line for line in stderr.splitlines() if "NOT NULL but arrived as null" in line]
    assert len(warnings) == 2, f"one warning per table and column:\n{stderr}"
    for column, line in zip(("n", "d"), warnings, strict=True):
        assert " WARNING " in line and f"column {column} of public.nums " in line, line
    reader.assert_valid()
