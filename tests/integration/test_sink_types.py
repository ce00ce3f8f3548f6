"""cdc-sink end to end: every common type round trips (through the bulk copy and through the
topic); cdc-verify itself names the differing keys of a deliberately broken target."""

import re

import orjson
import pytest

from tests.conftest import Databases
from tests.helpers import psql_rows
from tests.pipeline import (
    assert_same_rows,
    execute,
    start_sink,
    start_source,
    stop_cleanly,
    verify,
    wait_identical,
)
from tests.sink_runs import names_of

TYPES_PREREQUISITES = [
    """CREATE TYPE public.mood AS ENUM ('happy', 'sad', 'it''s "ok"')""",
    "CREATE DOMAIN public.posint AS integer CHECK (VALUE > 0)",
]

TYPE_COLUMNS = {
    "c_numeric": "numeric(38,10)",
    "c_numeric_free": "numeric",
    "c_real": "real",
    "c_double": "double precision",
    "c_smallint": "smallint",
    "c_integer": "integer",
    "c_bigint": "bigint",
    "c_bytea": "bytea",
    "c_text": "text",
    "c_char": "char(5)",
    "c_varchar": "varchar(10)",
    "c_json": "json",
    "c_jsonb": "jsonb",
    "c_int_array": "integer[]",
    "c_text_array": "text[]",
    "c_timestamp": "timestamp",
    "c_timestamptz": "timestamptz",
    "c_date": "date",
    "c_time": "time",
    "c_timetz": "timetz",
    "c_interval": "interval",
    "c_uuid": "uuid",
    "c_inet": "inet",
    "c_cidr": "cidr",
    "c_macaddr": "macaddr",
    "c_enum": "public.mood",
    "c_enum_array": "public.mood[]",
    "c_bool": "boolean",
    "c_money": "money",
    "c_bit": "bit(8)",
    "c_varbit": "varbit",
    "c_tsvector": "tsvector",
    "c_point": "point",
    "c_int4range": "int4range",
    "c_domain": "public.posint",
    "c_xml": "xml",
}

# Row values as SQL literals, in TYPE_COLUMNS order: extremes, other extremes, odd corners, NULLs.
TYPE_ROWS = [
    [
        "1234567890123456789012345678.1234567890",
        "1234567890123456789012345678901234567890",
        "3.4028235e+38",
        "1.7976931348623157e+308",
        "32767",
        "2147483647",
        "9223372036854775807",
        r"'\x00ff00de5c27'::bytea",
        r"""E'unicode \u2713 \u00fcn\u00efc\u00f6d\u00e9 \U0001F600 "double" ''single'' back\\slash\ttab\nnew\r\nline'""",
        "'ab'",
        "'abcdefghij'",
        """'{ "a" : 1,  "a":2 , "b" :[1 ,2 ],"c":"\\u00e9\\"" }'""",
        """'{"x": [1, "two", null, {"y": true}], "z": "\u00e9 \\\\ \\""}'""",
        "'{1,NULL,3}'",
        r"""'{"a\"b",NULL,"c,d","NULL","back\\slash","", " sp "}'""",
        "'2024-02-29 23:59:59.999999'",
        "'2024-06-01 12:00:00.123456+05:30'",
        "'2024-02-29'",
        "'23:59:59.999999'",
        "'12:34:56.789+05:30'",
        "'1 year 2 mons 3 days 04:05:06.789'",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "'192.168.0.1/24'",
        "'10.0.0.0/8'",
        "'08:00:2b:01:02:03'",
        """'it''s "ok"'""",
        """'{happy,NULL,"it''s \\"ok\\""}'""",
        "true",
        "'92233720368547758.07'",
        "B'10101010'",
        "B'101'",
        """'a fat:1 cat:2A ''it''''s'':3'""",
        "'(1.5,-2.25)'",
        "'[1,10)'",
        "2147483647",
        """'<a b="c">d &amp; e<!-- x --></a>'""",
    ],
    [
        "-9999999999999999999999999999.9999999999",
        "-0.0000000000000000000000000000000000000001",
        "-0",
        "5e-324",
        "-32768",
        "-2147483648",
        "-9223372036854775808",
        r"'\x'::bytea",
        "''",
        "''",
        "''",
        "'[]'",
        "'null'",
        "'{}'",
        "'{}'",
        "'infinity'",
        "'-infinity'",
        "'4713-01-01 BC'",
        "'00:00'",
        "'00:00:00+14'",
        "'-1 days +02:03:04'",
        "'00000000-0000-0000-0000-000000000000'",
        "'::1'",
        "'2001:db8::/32'",
        "'ff:ff:ff:ff:ff:ff'",
        "'happy'",
        "'{}'",
        "false",
        "'-92233720368547758.08'",
        "B'00000000'",
        "B''",
        "''",
        "'(0,0)'",
        "'empty'",
        "1",
        "''",
    ],
    [
        "0",
        "0.5",
        "1.17549435e-38",
        "-0",
        "0",
        "0",
        "0",
        r"'\x00'::bytea",
        "' leading and trailing  '",
        "'a b'",
        "' '",
        "'\"just a string\"'",
        "'[{}, [], 0.1e1, -0, 1e400]'",
        "'{{1,2},{3,NULL}}'",
        '\'{{"a","b"},{NULL,"}"}}\'',
        "'2000-01-01 00:00:00'",
        "'1999-12-31 23:59:59.5-08'",
        "'infinity'",
        "'24:00:00'",
        "'23:59:59-15:59'",
        "'-178000000 years -11 mons -2000000000 days -2562047788:00:54.775807'",
        "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
        "'2001:db8::1/64'",
        "'0.0.0.0/0'",
        "'00:00:00:00:00:00'",
        "'sad'",
        "'{sad,sad}'",
        "true",
        "'0'",
        "B'11111111'",
        "B'0000000000000000000000000000000000000000000000000000000000000000001'",
        "'x:1,2,3 y:4B'",
        "'(-1e+300,1e-300)'",
        "'(,5]'",
        "42",
        "'<?xml version=\"1.0\"?><r/>'",
    ],
    ["NULL"] * len(TYPE_COLUMNS),
]


def insert_type_rows(dsn: str, first_id: int) -> None:
    columns = ", ".join(TYPE_COLUMNS)
    execute(
        dsn,
        *(
            f"INSERT INTO public.types (id, {columns}) VALUES ({first_id + i}, {', '.join(row)})"
            for i, row in enumerate(TYPE_ROWS)
        ),
    )


@pytest.mark.parametrize("snapshot", ["copy", "topic"])
def test_every_common_type_round_trips(dbs: Databases, topic_prefix: str, snapshot: str) -> None:
    slot, group = names_of(dbs, topic_prefix)
    table = "public.types"
    columns = ", ".join(f"{name} {type_name}" for name, type_name in TYPE_COLUMNS.items())
    execute(dbs.source_dsn, *TYPES_PREREQUISITES, f"CREATE TABLE {table} (id integer PRIMARY KEY, {columns})")
    # A domain must exist on the target beforehand; so must an enum when the table is created from
    # its events (--snapshot topic). The bulk copy creates the enum from the source catalog itself.
    execute(dbs.target_dsn, *(TYPES_PREREQUISITES if snapshot == "topic" else TYPES_PREREQUISITES[1:]))
    insert_type_rows(dbs.source_dsn, 1)  # before the slot: bulk copy, or snapshot `r` events
    source = start_source(dbs, topic_prefix, slot)
    sink = start_sink(dbs, topic_prefix, slot, group, "--snapshot", snapshot)
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])

    insert_type_rows(dbs.source_dsn, 11)  # streamed
    names = ", ".join(TYPE_COLUMNS)
    execute(
        dbs.source_dsn,
        # every column from another row, both ways round
        f"UPDATE {table} AS t SET ({names}) = (SELECT {names} FROM {table} WHERE id = 2) WHERE t.id IN (1, 14)",
        f"UPDATE {table} AS t SET ({names}) = (SELECT {names} FROM {table} WHERE id = 11) WHERE t.id IN (4, 12)",
        f"UPDATE {table} SET c_text = c_text || E'\\n+', c_numeric = -c_numeric, c_jsonb = NULL WHERE id IN (3, 13)",
        f"DELETE FROM {table} WHERE id IN (2, 11)",
    )
    wait_identical(dbs, [table], processes=(source, sink))
    assert_same_rows(dbs, [table])
    stop_cleanly(sink, source)
    [(count,)] = psql_rows(dbs.target_dsn, f"SELECT count(*) FROM {table}")
    assert count == 6


def test_verify_names_the_differing_keys(dbs: Databases) -> None:
    table = "public.v"
    for dsn in (dbs.source_dsn, dbs.target_dsn):
        execute(
            dsn,
            f"CREATE TABLE {table} (id integer PRIMARY KEY, name text, amount numeric(12,2))",
            f"INSERT INTO {table} SELECT g, 'name ' || g, g * 1.5 FROM generate_series(1, 3000) g",
        )
    same = verify(dbs, [table])
    assert same.returncode == 0, same.stdout + same.stderr

    execute(
        dbs.target_dsn,
        f"DELETE FROM {table} WHERE id = 17",
        f"UPDATE {table} SET amount = amount + 0.01 WHERE id = 2500",
        f"INSERT INTO {table} VALUES (9001, 'extra', 0)",
    )
    result = verify(dbs, [table])
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout
    for kind, key in (("missing in target", "(17)"), ("changed", "(2500)"), ("extra in target", "(9001)")):
        assert re.search(rf"^\s+1 {kind}: {re.escape(key)}$", report, re.MULTILINE), f"{kind} {key}:\n{report}"
    assert "DIFFERENT" in report

    as_json = verify(dbs, [table], "--json")
    assert as_json.returncode == 1, as_json.stdout + as_json.stderr
    [found] = orjson.loads(as_json.stdout)
    assert found["identical"] is False
    assert found["counts"] == {"missing": 1, "extra": 1, "changed": 1}
    assert (found["source_rows"], found["target_rows"]) == (3000, 3000)
    assert (found["missing"], found["changed"], found["extra"]) == (["(17)"], ["(2500)"], ["(9001)"])
