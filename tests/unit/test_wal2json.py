"""Decoder.decode on wal2json format-version 2 messages written exactly as the plugin writes them;
commit-timestamp helper; the add-tables escaping."""

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.errors import SourceError
from source_connector.wal2json import (
    NUMBERS_AS_STRING_OPTION,
    WAL2JSON_OPTIONS,
    Decoder,
    escape_table_pattern,
    quote_decimals,
    timestamp_to_us,
    unquote_integers,
)
from tests.unit.wal2json_messages import (
    Column,
    bare,
    begin,
    boolean,
    bytea,
    change,
    commit,
    text,
    truncate,
)

# The probe insert, byte for byte as wal2json 2.5 printed it (format-version 2, include-pk, include-lsn,
# include-column-positions: `position` after `value`...).
PROBE = (
    b'{"action":"I","xid":729,"timestamp":"2026-11-25 14:43:17.816235+00","lsn":"0/19276D8",'
    b'"schema":"public","table":"probe","columns":['
    b'{"name":"id","type":"bigint","value":9223372036854775807,"position":1},'
    b'{"name":"n","type":"numeric(38,10)","value":12345678901234567890.0123456789,"position":2},'
    b'{"name":"r","type":"real","value":null,"position":3},'
    b'{"name":"j","type":"json","value":"{\\"a\\":  1}","position":4},'
    b'{"name":"b","type":"bytea","value":"00ff","position":5},'
    b'{"name":"ok","type":"boolean","value":true,"position":6},'
    b'{"name":"no","type":"boolean","value":false,"position":7},'
    b'{"name":"i","type":"integer","value":-2147483648,"position":8},'
    b'{"name":"s","type":"smallint","value":-7,"position":9},'
    b'{"name":"o","type":"oid","value":4294967295,"position":10},'
    b'{"name":"d","type":"double precision","value":1.7976931348623157e+308,"position":11},'
    b'{"name":"tz","type":"timestamp with time zone","value":"2026-11-25 14:43:17.816235+00","position":12},'
    b'{"name":"txt","type":"text","value":"line1\\nline2\\t\\"quoted\\" back\\\\slash \\u0001","position":13},'
    b'{"name":"arr","type":"numeric[]","value":"{1.5,2.25}","position":14},'
    b'{"name":"nb","type":"bytea","value":null,"position":15}'
    b'],"pk":[{"name":"id","type":"bigint"}]}'
)


def values(doc: dict[str, Any], key: str = "columns") -> dict[str, Any]:
    return {c["name"]: c["value"] for c in doc[key]}


def decode(payload: bytes, numbers_as_strings: bool = False) -> dict[str, Any]:
    return Decoder(numbers_as_strings).decode(payload)


# --- the probe message --------------------------------------------------------------------------


def test_probe_message_decodes_to_exact_values() -> None:
    doc = decode(PROBE)
    assert doc["action"] == "I"
    assert doc["xid"] == 729
    assert doc["lsn"] == "0/19276D8"
    assert doc["schema"] == "public"
    assert doc["table"] == "probe"
    assert doc["pk"] == [{"name": "id", "type": "bigint"}]
    assert values(doc) == {
        "id": 9223372036854775807,
        "n": "12345678901234567890.0123456789",
        "r": None,
        "j": '{"a":  1}',
        "b": "\\x00ff",
        "ok": True,
        "no": False,
        "i": -2147483648,
        "s": -7,
        "o": 4294967295,
        "d": "1.7976931348623157e+308",
        "tz": "2026-11-25 14:43:17.816235+00",
        "txt": 'line1\nline2\t"quoted" back\\slash \x01',
        "arr": "{1.5,2.25}",
        "nb": None,
    }


def test_integers_stay_python_ints() -> None:
    got = values(decode(PROBE))
    for name in ("id", "i", "s", "o"):
        assert type(got[name]) is int, name
    assert type(got["ok"]) is bool


def test_numeric_digits_kept_exactly() -> None:
    got = values(decode(PROBE))["n"]
    assert got == "12345678901234567890.0123456789"
    assert Decimal(got) == Decimal("12345678901234567890.0123456789")


def test_json_value_is_the_text_postgresql_printed() -> None:
    # the inner document is not parsed, and its spacing is kept
    assert values(decode(PROBE))["j"] == '{"a":  1}'


def test_bytea_gets_its_prefix_back() -> None:
    assert values(decode(PROBE))["b"] == "\\x00ff"


def test_empty_bytea() -> None:
    doc = decode(change("I", columns=[("id", "bigint", bare(1)), ("b", "bytea", bytea(""))]))
    assert values(doc)["b"] == "\\x"


@pytest.mark.parametrize(
    ("type_", "printed"),
    [
        ("numeric", "0"),
        ("numeric", "-0.5"),
        ("numeric", "-12345678901234567890123456789012345678"),
        ("numeric", "123456789012345678901234567890"),
        ("numeric(12,2)", "-123.45"),
        ("numeric(3,5)", "0.00123"),  # PostgreSQL 15: scale may exceed precision
        ("numeric(1000,0)", "9" * 1000),
        ("real", "3.4028235e+38"),
        ("real", "-1.1754944e-38"),
        ("real", "1.5"),
        ("double precision", "1.7976931348623157e+308"),
        ("double precision", "-1.7976931348623157e+308"),
        ("double precision", "5e-324"),
        ("double precision", "-0"),
        ("double precision", "1e+16"),
        ("double precision", "0.1"),
        ("double precision", "-2.5E-10"),
    ],
)
def test_decimal_types_arrive_as_their_exact_text(type_: str, printed: str) -> None:
    doc = decode(change("I", columns=[("id", "bigint", bare(1)), ("x", type_, bare(printed))]))
    assert values(doc)["x"] == printed


@pytest.mark.parametrize("type_", ["numeric", "numeric(10,2)", "real", "double precision"])
def test_nan_and_infinity_arrive_as_null(type_: str) -> None:
    # wal2json 2.5 prints NaN, Infinity and -Infinity as null (notes, trap 2)
    doc = decode(change("I", columns=[("id", "bigint", bare(1)), ("x", type_, b"null")]))
    assert values(doc)["x"] is None


@pytest.mark.parametrize(
    ("type_", "printed", "expected"),
    [
        ("bigint", "-9223372036854775808", -9223372036854775808),
        ("bigint", "9223372036854775807", 9223372036854775807),
        ("integer", "0", 0),
        ("smallint", "32767", 32767),
        ("oid", "0", 0),
    ],
)
def test_integer_types_arrive_as_ints(type_: str, printed: str, expected: int) -> None:
    doc = decode(change("I", columns=[("x", type_, bare(printed))], pk=[]))
    got = values(doc)["x"]
    assert got == expected
    assert type(got) is int


def test_text_that_looks_like_a_numeric_column_is_untouched() -> None:
    tricky = [
        '"type":"numeric","value":5',
        '"type":"numeric(12,2)","value":5.25}',
        '"type":"double precision","value":-1e5',
        '"type":"bytea","value":"',
        '{"name":"x","type":"bytea","value":"00"}',
        '"type":"integer","value":"7"',
        "\\",
        '\\"type\\":\\"numeric\\",\\"value\\":5',
        "ends with a backslash \\",
    ]
    cols: list[Column] = [("id", "bigint", bare(1))]
    cols += [(f"t{i}", "text", text(v)) for i, v in enumerate(tricky)]
    cols.append(("after", "numeric", bare("1.10")))
    for mode in (False, True):
        got = values(decode(change("I", columns=cols), numbers_as_strings=mode))
        assert [got[f"t{i}"] for i in range(len(tricky))] == tricky
    assert values(decode(change("I", columns=cols)))["after"] == "1.10"


def test_column_names_that_look_like_keys_are_untouched() -> None:
    name = '","type":"numeric","value":1.5,"x":"'
    doc = decode(change("I", columns=[(name, "numeric", bare("2.50")), ("b", "bytea", bytea("ab"))]))
    assert values(doc) == {name: "2.50", "b": "\\xab"}


def test_quoted_type_name_as_wal2json_prints_it() -> None:
    # format_type gives `"Mood"`; wal2json writes it without escaping, so the JSON string is `Mood`
    payload = change("I", columns=[("id", "bigint", bare(1))]).replace(
        b"]",
        b',{"name":"m","type":"Mood","value":"happy"},{"name":"ms","type":"\\"Mood\\"[]","value":"{happy}"}]',
        1,
    )
    doc = decode(payload)
    assert [c["type"] for c in doc["columns"]] == ["bigint", "Mood", '"Mood"[]']
    assert values(doc) == {"id": 1, "m": "happy", "ms": "{happy}"}


def test_update_carries_columns_and_identity() -> None:
    payload = change(
        "U",
        columns=[
            ("id", "bigint", bare(2)),
            ("n", "numeric(38,10)", bare("1.0000000001")),
            ("b", "bytea", bytea("01")),
        ],
        identity=[("id", "bigint", bare(1)), ("n", "numeric(38,10)", bare("99999999999999999999.9999999999"))],
    )
    doc = decode(payload)
    assert doc["action"] == "U"
    assert values(doc) == {"id": 2, "n": "1.0000000001", "b": "\\x01"}
    assert values(doc, "identity") == {"id": 1, "n": "99999999999999999999.9999999999"}


def test_delete_carries_identity_only() -> None:
    doc = decode(change("D", identity=[("id", "bigint", bare(-1)), ("b", "bytea", bytea("ff"))]))
    assert doc["action"] == "D"
    assert "columns" not in doc
    assert values(doc, "identity") == {"id": -1, "b": "\\xff"}


def test_begin_commit_and_truncate() -> None:
    b = decode(begin())
    assert b == {
        "action": "B",
        "xid": 730,
        "timestamp": "2026-11-25 14:43:17.816235+00",
        "lsn": "0/1927B78",
        "nextlsn": "0/1927BA8",
    }
    assert decode(commit())["action"] == "C"
    t = decode(truncate(schema="Sales", table="Order Items"))
    assert (t["action"], t["schema"], t["table"]) == ("T", "Sales", "Order Items")


def test_numeric_with_negative_scale_is_kept_as_text() -> None:
    doc = decode(
        change(
            "I",
            columns=[
                ("id", "bigint", bare(1)),
                ("h", "numeric(5,-2)", bare("12300")),
                ("big", "numeric(40,-5)", bare("123456789012345678901234567890123400000")),
            ],
        )
    )
    assert values(doc)["h"] == "12300"
    assert values(doc)["big"] == "123456789012345678901234567890123400000"


# --- numeric-data-types-as-string (wal2json 2.6) -----------------------------------------------


def test_numbers_as_strings_mode() -> None:
    payload = change(
        "I",
        columns=[
            ("id", "bigint", text("9223372036854775807")),
            ("i", "integer", text("-5")),
            ("s", "smallint", text("0")),
            ("o", "oid", text("16384")),
            ("n", "numeric(38,10)", text("12345678901234567890.0123456789")),
            ("nan", "numeric", text("NaN")),
            ("inf", "double precision", text("-Infinity")),
            ("r", "real", text("1.5")),
            ("b", "bytea", bytea("00ff")),
            ("t", "text", text("42")),
            ("nul", "integer", b"null"),
        ],
    )
    got = values(decode(payload, numbers_as_strings=True))
    assert got == {
        "id": 9223372036854775807,
        "i": -5,
        "s": 0,
        "o": 16384,
        "n": "12345678901234567890.0123456789",
        "nan": "NaN",
        "inf": "-Infinity",
        "r": "1.5",
        "b": "\\x00ff",
        "t": "42",
        "nul": None,
    }
    for name in ("id", "i", "s", "o"):
        assert type(got[name]) is int


def test_options() -> None:
    assert WAL2JSON_OPTIONS["format-version"] == "2"
    assert WAL2JSON_OPTIONS["include-pk"] == "1"
    assert WAL2JSON_OPTIONS["include-lsn"] == "1"
    assert WAL2JSON_OPTIONS["include-types"] == "1"
    assert WAL2JSON_OPTIONS["include-typmod"] == "1"
    # wal2json 2.5 refuses unknown options: the 2.6 option is probed, never always on
    assert NUMBERS_AS_STRING_OPTION not in WAL2JSON_OPTIONS
    assert "include-type-oids" not in WAL2JSON_OPTIONS  # would put "typeoid" between "type" and "value"
    # `"position": attnum` after the value: how shape changes are told (source_connector/shapes.py)
    assert WAL2JSON_OPTIONS["include-column-positions"] == "1"


def test_positions_follow_the_values() -> None:
    doc = decode(PROBE)
    assert [c["position"] for c in doc["columns"]] == list(range(1, 16))
    assert [type(c["position"]) for c in doc["columns"]] == [int] * 15
    # a column dropped earlier leaves a gap; the decimal right before `,"position"` keeps its digits
    payload = change("I", columns=[("id", "bigint", bare(1), 1), ("n", "numeric", bare("-1.5e+3"), 7)])
    assert decode(payload)["columns"] == [
        {"name": "id", "type": "bigint", "value": 1, "position": 1},
        {"name": "n", "type": "numeric", "value": "-1.5e+3", "position": 7},
    ]
    quoted = change("I", columns=[("i", "integer", text("-5"), 3)], pk=[])
    assert decode(quoted, numbers_as_strings=True)["columns"] == [
        {"name": "i", "type": "integer", "value": -5, "position": 3}
    ]


# --- property: whatever the values, they come back exactly ---------------------------------------

INT_TYPES = {"smallint": 16, "integer": 32, "bigint": 64}

numeric_texts = st.decimals(allow_nan=False, allow_infinity=False).map(lambda d: format(d, "f"))
double_texts = st.floats(allow_nan=False, allow_infinity=False).map(repr)
value_columns = st.one_of(
    st.tuples(st.just("text"), st.text()),
    st.tuples(st.just("character varying(20)"), st.text(max_size=20)),
    st.tuples(st.just("jsonb"), st.text()),
    st.tuples(st.sampled_from(["numeric", "numeric(38,10)", "numeric(1000,500)"]), numeric_texts),
    st.tuples(st.sampled_from(["real", "double precision"]), double_texts),
    st.tuples(st.just("bigint"), st.integers(-(2**63), 2**63 - 1)),
    st.tuples(st.just("integer"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("smallint"), st.integers(-(2**15), 2**15 - 1)),
    st.tuples(st.just("oid"), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("boolean"), st.booleans()),
    st.tuples(st.just("bytea"), st.binary().map(bytes.hex)),
    st.tuples(st.sampled_from(["text", "numeric", "bigint", "bytea", "boolean"]), st.none()),
)


def printed(type_: str, value: Any, numbers_as_strings: bool) -> bytes:
    """The value as wal2json writes it."""
    if value is None:
        return b"null"
    if type_ == "boolean":
        return boolean(value)
    if type_ == "bytea":
        return bytea(value)
    if (
        type_ in INT_TYPES
        or type_ == "oid"
        or type_.startswith("numeric")
        or type_ in ("real", "double precision")
    ):
        return text(str(value)) if numbers_as_strings else bare(value)
    return text(value)


def expected(type_: str, value: Any) -> Any:
    if value is None:
        return None
    if type_ == "bytea":
        return "\\x" + value
    return value


@given(
    st.lists(st.tuples(st.text(), value_columns), min_size=1, max_size=12, unique_by=lambda c: c[0]),
    st.booleans(),
)
def test_any_values_round_trip(cols: list[tuple[str, tuple[str, Any]]], numbers_as_strings: bool) -> None:
    payload = change("I", columns=[(name, t, printed(t, v, numbers_as_strings)) for name, (t, v) in cols], pk=[])
    got = values(decode(payload, numbers_as_strings))
    assert got == {name: expected(t, v) for name, (t, v) in cols}
    for name, (t, v) in cols:
        if v is not None and (t in INT_TYPES or t == "oid"):
            assert type(got[name]) is int
        if v is not None and (t.startswith("numeric") or t in ("real", "double precision")):
            assert isinstance(got[name], str)
            assert Decimal(got[name]) == Decimal(v)


@given(st.text(), numeric_texts, st.integers(-(2**63), 2**63 - 1))
def test_update_identity_round_trips(s: str, n: str, i: int) -> None:
    payload = change(
        "U",
        columns=[("id", "bigint", bare(i)), ("t", "text", text(s)), ("n", "numeric", bare(n))],
        identity=[("id", "bigint", bare(i)), ("t", "text", text(s)), ("n", "numeric", bare(n))],
    )
    doc = decode(payload)
    assert values(doc) == values(doc, "identity") == {"id": i, "t": s, "n": n}


@pytest.mark.parametrize(("printed_zero", "other"), [("-0", "0"), ("0", "-0"), ("-0", "-0.5")])
def test_minus_zero_keeps_its_sign_beside_other_decimals(printed_zero: str, other: str) -> None:
    doc = decode(
        change(
            "I",
            columns=[
                ("id", "bigint", bare(0)),
                ("d", "double precision", bare(printed_zero)),
                ("n", "numeric", bare(other)),
                ("i", "integer", bare(-0)),
            ],
        )
    )
    assert values(doc) == {"id": 0, "d": printed_zero, "n": other, "i": 0}


def test_an_integer_numeric_key_in_the_identity_arrives_as_its_digits() -> None:
    doc = decode(change("D", identity=[("k", "numeric", bare("123456789012345678901234567890"))]))
    assert values(doc, "identity") == {"k": "123456789012345678901234567890"}


# --- commit timestamps ---------------------------------------------------------------------------

BASE_US = int(dt.datetime(2026, 11, 25, 14, 43, 17, tzinfo=dt.UTC).timestamp()) * 1_000_000


@pytest.mark.parametrize("digits", range(7))
def test_timestamp_fraction_of_any_length(digits: int) -> None:
    fraction = "816235"[:digits]
    stamp = "2026-11-25 14:43:17" + ("." + fraction if digits else "") + "+00"
    assert timestamp_to_us(stamp) == BASE_US + int(fraction.ljust(6, "0"))


@pytest.mark.parametrize(
    ("stamp", "offset_us"),
    [
        ("2026-11-25 20:13:17.5+05:30", 500_000),
        ("2026-11-25 11:43:17-03", 0),
        ("2026-11-25 14:43:17.000001+00:00", 1),
    ],
)
def test_timestamp_with_other_zones(stamp: str, offset_us: int) -> None:
    assert timestamp_to_us(stamp) == BASE_US + offset_us


def test_timestamp_epoch_and_before() -> None:
    assert timestamp_to_us("1970-01-01 00:00:00+00") == 0
    assert timestamp_to_us("1969-12-31 23:59:59.999999+00") == -1


@given(st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)))
def test_timestamp_matches_datetime(when: dt.datetime) -> None:
    stamp = f"{when.year:04d}-{when.month:02d}-{when.day:02d} {when.hour:02d}:{when.minute:02d}:{when.second:02d}"
    if when.microsecond:
        stamp += f".{when.microsecond:06d}".rstrip("0")
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    assert timestamp_to_us(stamp + "+00") == (when.replace(tzinfo=dt.UTC) - epoch) // dt.timedelta(microseconds=1)


# --- add-tables escaping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ident", "escaped"),
    [
        ("person", "person"),
        ("Order_Items2", "Order_Items2"),
        ("a,b", "a\\,b"),
        ("a.b", "a\\.b"),
        ("*", "\\*"),
        ("my table", "my\\ table"),
        ("back\\slash", "back\\\\slash"),
        ("Bücher", "Bücher"),
        ("日本語", "日本語"),
        ('say "hi"', 'say\\ \\"hi\\"'),
        ("tab\there", "tab\\\there"),
    ],
)
def test_escape_table_pattern(ident: str, escaped: str) -> None:
    assert escape_table_pattern(ident) == escaped


_C_SPACE = b" \t\n\v\f\r"


def wal2json_add_tables(option: str) -> list[tuple[str, str]]:
    """wal2json's own parsing of add-tables (string_to_SelectTable + parse_table_identifier), on bytes."""
    raw = option.encode()
    names: list[bytes] = []
    i = 0
    while i < len(raw) and raw[i] in _C_SPACE:
        i += 1
    while i < len(raw):
        start = i
        while i < len(raw) and raw[i] != ord(",") and raw[i] not in _C_SPACE:
            i += 2 if raw[i] == ord("\\") else 1
        assert i > start, "empty name"
        names.append(raw[start:i])
        while i < len(raw) and raw[i] in _C_SPACE:
            i += 1
        if i < len(raw):
            assert raw[i] == ord(","), "invalid syntax"
            i += 1
            while i < len(raw) and raw[i] in _C_SPACE:
                i += 1
    tables = []
    for name in names:
        assert not (name[:2] == b"*." or name.endswith(b".*")), "wildcard"
        parts: list[bytearray] = [bytearray()]
        j = 0
        while j < len(name):
            if name[j] == ord("\\"):
                parts[-1].append(name[j + 1])
                j += 2
            elif name[j] == ord(".") and len(parts) == 1:
                parts.append(bytearray())
                j += 1
            else:
                parts[-1].append(name[j])
                j += 1
        assert len(parts) == 2, "no schema"
        tables.append((parts[0].decode(), parts[1].decode()))
    return tables


identifiers = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30)


@given(st.lists(st.tuples(identifiers, identifiers), min_size=1, max_size=5))
def test_escaped_tables_parse_back_in_wal2json(tables: list[tuple[str, str]]) -> None:
    option = ",".join(f"{escape_table_pattern(s)}.{escape_table_pattern(t)}" for s, t in tables)
    assert wal2json_add_tables(option) == tables


@given(identifiers)
def test_escape_only_ascii_punctuation_and_spaces(ident: str) -> None:
    escaped = escape_table_pattern(ident)
    out: list[str] = []
    i = 0
    while i < len(escaped):
        if escaped[i] == "\\":
            c = escaped[i + 1]
            assert c.isascii() and not (c.isalnum() or c == "_"), repr(c)
            i += 2
        else:
            c = escaped[i]
            assert not c.isascii() or c.isalnum() or c == "_", repr(c)
            i += 1
        out.append(c)
    assert "".join(out) == ident


def test_a_message_that_is_not_json_names_the_table_and_the_fix() -> None:
    # wal2json 2.5 prints a quoted type name without escaping its quotes
    payload = (
        b'{"action":"I","schema":"public","table":"odd","columns":[{"name":"o","type":"Odd Schema"."Mood",'
        b'"value":"A","position":1}]}'
    )
    with pytest.raises(SourceError) as raised:
        Decoder().decode(payload)
    line = str(raised.value)
    assert "of table public.odd that is not valid JSON" in line and "ALTER TYPE" in line, line


def test_bare_decimals_are_quoted_and_nothing_else_changes() -> None:
    plain = b'{"columns":[{"name":"id","type":"bigint","value":1},{"name":"e","type":"text","value":"12.5"}]}'
    assert quote_decimals(plain) is plain
    payload = (
        b'[{"type":"numeric(10,2)","value":-123.45},{"type":"real","value":1e-07},'
        b'{"type":"double precision","value":71.5},{"type":"numeric","value":"NaN"},{"type":"numeric(5,-2)","value":12300}]'
    )
    assert quote_decimals(payload) == (
        b'[{"type":"numeric(10,2)","value":"-123.45"},{"type":"real","value":"1e-07"},'
        b'{"type":"double precision","value":"71.5"},{"type":"numeric","value":"NaN"},'
        b'{"type":"numeric(5,-2)","value":"12300"}]'
    )


def test_quoted_integers_lose_their_quotes_and_nothing_else_changes() -> None:
    payload = b'[{"type":"bigint","value":"-12"},{"type":"text","value":"7"},{"type":"integer","value":"3"}]'
    assert (
        unquote_integers(payload)
        == b'[{"type":"bigint","value":-12},{"type":"text","value":"7"},{"type":"integer","value":3}]'
    )
    assert unquote_integers(b'{"type":"text","value":"7"}') == b'{"type":"text","value":"7"}'
