"""schemas.codec: the bytes of a change message, written by the source and read by the sink."""

import contextlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

import schemas
from schemas.codec import (
    RANKS,
    BadMessage,
    _checked,
    _valid,
    decode,
    decode_key,
    decode_row_change,
    decode_tombstone,
    encode,
    encode_key,
    encode_tombstone,
    position,
)
from schemas.envelope import (
    CONNECTOR,
    ENVELOPE_VERSION,
    OPS,
    TOMBSTONE_HEADER,
    Envelope,
    Op,
    Row,
    Source,
    TombstoneSource,
)

VALIDATOR = Draft202012Validator(json.loads((Path(schemas.__file__).parent / "envelope.schema.json").read_text()))
INT64 = st.integers(-(2**63), 2**63 - 1)
POSITIVE = st.integers(0, 2**63 - 1)
OP_NAMES: list[Op] = ["c", "u", "d", "r", "t"]


def pg_float(x: float) -> str:
    """real / double precision as PostgreSQL prints them."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def pg_array(items: list[str | None]) -> str:
    """text[] as PostgreSQL prints it: every element quoted (allowed), NULL bare."""
    quoted = ("NULL" if i is None else '"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return "{" + ",".join(quoted) + "}"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | INT64 | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)

# The types README.md's events section names, each with the values PostgreSQL prints for it.
README_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "smallint": st.integers(-(2**15), 2**15 - 1),
    "integer": st.integers(-(2**31), 2**31 - 1),
    "bigint": INT64,
    "oid": st.integers(0, 2**32 - 1),
    "boolean": st.booleans(),
    "numeric": st.from_regex(r"-?[0-9]{1,40}(\.[0-9]{1,40})?|NaN|-?Infinity", fullmatch=True),
    "numeric(12,2)": st.from_regex(r"-?[0-9]{1,10}\.[0-9]{2}", fullmatch=True),
    "real": st.floats(width=32).map(pg_float),
    "double precision": st.floats().map(pg_float),
    "text[]": st.lists(st.none() | st.text(max_size=5), max_size=4).map(pg_array),
    "jsonb": JSON_VALUES.map(json.dumps),
    "text": st.text(),
}


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    """An envelope as the source writes it, of a table over the README's types."""
    names = draw(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=8, unique=True))
    columns = {n: draw(st.sampled_from(sorted(README_TYPES))) for n in names}
    key = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))

    def row(of: list[str]) -> Row:
        return {
            n: draw(README_TYPES[columns[n]] if n in key else st.none() | README_TYPES[columns[n]]) for n in of
        }

    op = draw(st.sampled_from(OP_NAMES))
    others = [n for n in names if n not in key]
    left_out = draw(st.lists(st.sampled_from(others), min_size=1, unique=True)) if others and op in "cu" else []
    left_out = left_out if draw(st.booleans()) else []
    full = row(names)
    after = None if op in "dt" else {n: v for n, v in full.items() if n not in left_out}
    before = {k: full[k] for k in key} if op == "d" else None
    if op == "u" and draw(st.booleans()):
        before = row(draw(st.sampled_from([key, names])))
    env: Envelope = {
        "before": before,
        "after": after,
        "op": op,
        "ts_ms": draw(INT64),
        "source": draw(sources()),
        "columns": columns,
        "key": key,
    }
    if left_out and op == "c" and draw(st.booleans()):
        env["refetched"] = left_out
    elif left_out:
        env["unchanged"] = left_out
    if op == "t":
        env["partitions"] = draw(st.integers(1, 10_000))
    return env


@st.composite
def sources(draw: st.DrawFn) -> Source:
    snapshot = draw(st.booleans())
    maybe = st.none() | POSITIVE
    return {
        "version": ENVELOPE_VERSION,
        "connector": CONNECTOR,
        "name": draw(st.text()),
        "db": draw(st.text()),
        "schema": draw(st.text()),
        "table": draw(st.text()),
        "slot": draw(st.none() | st.text()),
        "lsn": draw(maybe),
        "commit_lsn": None if snapshot else draw(maybe),
        "txId": None if snapshot else draw(st.none() | st.integers(0, 2**32 - 1)),
        "ts_ms": draw(st.none() | INT64),
        "ts_us": draw(st.none() | INT64),
        "seq": draw(POSITIVE),
        "snapshot": snapshot,
    }


positions = st.fixed_dictionaries(
    {"txId": st.none() | POSITIVE, "lsn": st.none() | POSITIVE, "commit_lsn": st.none() | POSITIVE, "ts_us": INT64}
)


# --- round trips --------------------------------------------------------------------------------


@given(envelopes())
def test_decode_reads_back_what_encode_writes(env: Envelope) -> None:
    raw = encode(**env)
    assert decode(raw) == env
    assert raw == orjson.dumps(env)  # the envelope's own key order, nothing added or dropped
    errors = sorted(str(e) for e in VALIDATOR.iter_errors(orjson.loads(raw)))
    assert not errors, errors


@given(envelopes())
def test_preserialized_columns_and_key_write_the_same_bytes(env: Envelope) -> None:
    columns, key = orjson.Fragment(orjson.dumps(env["columns"])), orjson.Fragment(orjson.dumps(env["key"]))
    extra = (env.get("unchanged"), env.get("refetched"), env.get("partitions"))
    raw = encode(env["before"], env["after"], env["op"], env["ts_ms"], env["source"], columns, key, *extra)
    assert raw == encode(**env)


@given(envelopes())
def test_numbers_keep_every_digit(env: Envelope) -> None:
    got = decode(encode(**env))
    for read, written in ((got["before"], env["before"]), (got["after"], env["after"])):
        for column, value in (read or {}).items():
            assert type(value) is not float
            if env["columns"][column] in ("numeric", "numeric(12,2)", "real", "double precision"):
                assert value is None or (isinstance(value, str) and value == (written or {})[column])


@given(positions)
def test_a_tombstone_header_reads_back(position: TombstoneSource) -> None:
    raw = encode_tombstone(position)
    assert raw == orjson.dumps(position)
    assert decode_tombstone([("other", b"x"), (TOMBSTONE_HEADER, raw)]) == position


@given(envelopes())
def test_a_key_reads_back_in_key_order(env: Envelope) -> None:
    row = env["after"] or env["before"]
    if row is not None:
        raw = encode_key(row, env["key"])
        assert list(decode_key(raw).items()) == [(k, row[k]) for k in env["key"]]


def test_the_tombstone_header_is_optional() -> None:
    assert decode_tombstone(None) is None
    assert decode_tombstone([("other", b"x")]) is None


# --- what decode refuses ------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "before": None,
    "after": {"id": 1, "n": "1.50"},
    "op": "c",
    "ts_ms": 1_700_000_000_000,
    "source": {"txId": 730, "lsn": 1000, "commit_lsn": 2000, "ts_us": 1_700_000_000_000_000},
    "columns": {"id": "bigint", "n": "numeric(12,2)"},
    "key": ["id"],
}


def test_a_good_envelope_decodes() -> None:
    assert decode(orjson.dumps(GOOD)) == GOOD


def header(raw: bytes | None) -> TombstoneSource | None:
    return decode_tombstone([(TOMBSTONE_HEADER, raw)])


@pytest.mark.parametrize(
    ("read", "raw", "error"),
    [
        (decode, b"{nope", "value is not JSON: "),
        (decode, b"[1]", "value is not a JSON object"),
        (decode, b"null", "value is not a JSON object"),
        (decode, orjson.dumps({k: v for k, v in GOOD.items() if k != "key"}), "envelope has no 'key' field"),
        (decode, b'{"after": null}', "envelope has no 'op' field"),
        (decode_key, b"{nope", "key is not JSON: "),
        (decode_key, b"[1]", "key is not a JSON object of key columns"),
        (decode_key, b"{}", "key is not a JSON object of key columns"),
        (decode_key, b'{"id":1.0}', "key column 'id' is a JSON number that is not a 64-bit integer"),
        (header, None, "tombstone header cdc.source is not JSON: "),
        (header, b"", "tombstone header cdc.source is not JSON: "),
        (header, b'"x"', "tombstone header cdc.source must be an object of integers or nulls"),
        (header, b'{"lsn":1.5}', "tombstone header cdc.source must be an object of integers or nulls"),
    ],
)
def test_bytes_that_are_not_a_change_message(read: Callable[[Any], object], raw: bytes | None, error: str) -> None:
    with pytest.raises(BadMessage, match=error):
        read(raw)


MALFORMED: list[tuple[dict[str, Any], str]] = [
    ({"op": "x"}, "unknown op 'x'"),
    ({"op": None}, "unknown op None"),
    ({"columns": None}, "envelope `columns` must be an object and `key` a non-empty list of column names"),
    ({"key": ["id", 2]}, "`key` a non-empty list of column names"),
    ({"columns": {"id": 20}}, "envelope `columns` must map each column to its type name"),
    ({"source": []}, "envelope `source` must be an object"),
    ({"source": {"lsn": "0/16B3748"}}, "envelope `source` txId, lsn, commit_lsn and ts_us must be integers"),
    ({"source": {"txId": 1.5}}, "envelope `source` txId, lsn, commit_lsn and ts_us must be integers"),
    ({"source": {"ts_us": False}}, "envelope `source` txId, lsn, commit_lsn and ts_us must be integers"),
    ({"after": {"n": "1"}}, "`after` must be an object holding the key columns"),
    ({"op": "d", "before": [1]}, "`before` must be an object holding the key columns"),
    ({"before": "old"}, "`before` must be an object or null"),
    ({"op": "d", "before": {"id": 1}, "after": 7}, "`after` must be an object or null"),
    ({"after": {"id": 1, "n": 1.5}}, "`after` column 'n' is a JSON number that is not a 64-bit integer"),
    (
        {"after": {"id": 1, "n": orjson.Fragment(b"123456789012345678901")}},
        "`after` column 'n' is a JSON number that is not a 64-bit integer",
    ),
    ({"after": {"id": 1, "n": [1]}}, "`after` column 'n' is a JSON array"),
    ({"op": "u", "before": {"id": 1, "j": {}}}, "`before` column 'j' is a JSON object"),
    ({"op": "r", "unchanged": ["n"]}, "`unchanged` is only allowed on updates and creates, as a list"),
    ({"unchanged": [1]}, "`unchanged` is only allowed on updates and creates, as a list"),
    ({"refetched": "n"}, "`refetched` must be a list of column names"),
    ({"op": "t", "after": None}, "truncate event without a valid `partitions` count"),
    ({"op": "t", "after": None, "partitions": -1}, "truncate event without a valid `partitions` count"),
]


@pytest.mark.parametrize(("changes", "error"), MALFORMED)
def test_malformed_envelopes(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(BadMessage, match=error):
        decode(orjson.dumps({**GOOD, **changes}))


FULL_SOURCE: Source = {
    "version": ENVELOPE_VERSION,
    "connector": CONNECTOR,
    "name": "cdc",
    "db": "shop",
    "schema": "public",
    "table": "t",
    "slot": "cdc_slot",
    "lsn": 1000,
    "commit_lsn": 2000,
    "txId": 730,
    "ts_ms": 1_700_000_000_000,
    "ts_us": 1_700_000_000_000_000,
    "seq": 1,
    "snapshot": False,
}


SCHEMA_CHANGE: dict[str, Any] = {
    **GOOD,
    "op": "s",
    "after": None,
    "partitions": 3,
    "columns": {"id": "bigint", "label": "text", "score": "integer"},
    "schema_change": {
        "renamed": [{"from": "name", "to": "label"}],
        "retyped": [{"name": "id", "from": "integer", "to": "bigint"}],
        "dropped": ["gone"],
        "added": [{"name": "score", "type": "integer", "not_null": True, "default": "5", "missing": "5"}],
        "rewritten": False,
    },
}


def test_a_schema_change_event_decodes_and_fits_the_json_schema() -> None:
    raw = encode(
        None,
        None,
        "s",
        SCHEMA_CHANGE["ts_ms"],
        FULL_SOURCE,
        SCHEMA_CHANGE["columns"],
        SCHEMA_CHANGE["key"],
        partitions=3,
        schema_change=SCHEMA_CHANGE["schema_change"],
    )
    assert orjson.loads(raw) == decode(raw) == {**SCHEMA_CHANGE, "source": FULL_SOURCE}
    assert _valid(orjson.loads(raw))
    assert not list(VALIDATOR.iter_errors(orjson.loads(raw)))
    assert position(raw, None) == (2000, 1, RANKS["s"]) and RANKS["s"] < RANKS["d"]
    # the table may have no key by now
    assert decode(orjson.dumps({**SCHEMA_CHANGE, "key": []}))["key"] == []


def test_the_json_schema_wants_schema_change_only_on_s() -> None:
    good = {**SCHEMA_CHANGE, "source": FULL_SOURCE}
    assert not list(VALIDATOR.iter_errors(good))
    assert list(VALIDATOR.iter_errors({k: v for k, v in good.items() if k != "schema_change"}))
    assert list(VALIDATOR.iter_errors({k: v for k, v in good.items() if k != "partitions"}))
    assert list(VALIDATOR.iter_errors({**GOOD, "source": FULL_SOURCE, "schema_change": good["schema_change"]}))
    assert list(VALIDATOR.iter_errors({**good, "after": {"id": 1}}))
    assert list(VALIDATOR.iter_errors({**good, "schema_change": {**good["schema_change"], "extra": 1}}))
    assert not list(VALIDATOR.iter_errors({**good, "key": []}))
    assert list(VALIDATOR.iter_errors({**GOOD, "source": FULL_SOURCE, "key": []}))


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"partitions": None}, "schema change event without a valid `partitions` count"),
        ({"partitions": 0}, "schema change event without a valid `partitions` count"),
        ({"schema_change": None}, "schema change event without a `schema_change` object"),
        ({"after": {"id": 1}}, "schema change: `before` and `after` must be null"),
        ({"key": "id"}, "schema change: `key` must be a list of column names"),
        ({"columns": {"id": 1}}, "schema change: `columns` must map each column to its type name"),
        ({"source": {"lsn": "0/1"}}, "envelope `source` txId, lsn, commit_lsn and ts_us must be integers"),
        ({"unchanged": ["id"]}, "`unchanged` is only allowed on updates and creates"),
    ],
)
def test_malformed_schema_change_events(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(BadMessage, match=error):
        decode(orjson.dumps({**SCHEMA_CHANGE, **changes}))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("rewritten", None, "`schema_change` has no 'rewritten' field"),
        ("renamed", [{"from": "a"}], '`renamed` must be a list of {"from": name, "to": name}'),
        ("renamed", {"from": "a", "to": "b"}, "`renamed` must be a list of"),
        ("retyped", [{"name": "a", "from": "integer"}], "`retyped` must be a list of"),
        ("dropped", "gone", "`dropped` must be a list of column names"),
        ("dropped", [1], "`dropped` must be a list of column names"),
        ("added", [{"name": "a", "type": "integer", "not_null": 1, "default": None, "missing": None}], "`added`"),
        ("added", [{"name": "a", "type": "integer", "not_null": True, "default": None}], "`added` must be a list"),
        ("rewritten", "no", "`rewritten` must be true or false"),
    ],
)
def test_malformed_schema_changes(field: str, value: Any, error: str) -> None:
    change = {**SCHEMA_CHANGE["schema_change"], field: value}
    if value is None:
        del change[field]
    with pytest.raises(BadMessage, match=f"schema change: {error}"):
        decode(orjson.dumps({**SCHEMA_CHANGE, "schema_change": change}))
    assert not _valid({**SCHEMA_CHANGE, "schema_change": change})


def test_a_tombstone_header_lacking_fields_reads_them_as_null() -> None:
    assert decode_tombstone([(TOMBSTONE_HEADER, b'{"lsn":5}')]) == {
        "txId": None,
        "lsn": 5,
        "commit_lsn": None,
        "ts_us": None,
    }


FIELDS = [*GOOD, "unchanged", "refetched", "partitions"]


@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=3), st.booleans())
def test_any_json_is_an_envelope_or_a_bad_message(changes: dict[str, Any], nested: bool) -> None:
    env = {**GOOD, "source": {**GOOD["source"], **changes}} if nested else {**GOOD, **changes}
    with contextlib.suppress(BadMessage):
        decode(orjson.dumps(env))


@given(
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=3),
    st.sampled_from(["", "source", "after", "before"]),
    st.sampled_from(sorted(OPS)),
)
def test_the_fast_check_accepts_exactly_what_the_full_check_accepts(
    changes: dict[str, Any], where: str, op: str
) -> None:
    env: dict[str, Any] = {**GOOD, "op": op}
    if op == "t":
        env["partitions"] = 3
    if where and isinstance(env.get(where), dict):
        env[where] = {**env[where], **changes}
    else:
        env.update(changes)
    try:
        _checked(env)
    except BadMessage:
        accepted = False
    else:
        accepted = True
    assert _valid(env) is accepted, env


# --- the sink's hot path ------------------------------------------------------------------------


@given(envelopes())
def test_the_row_change_path_reads_what_decode_reads(env: Envelope) -> None:
    read = decode_row_change(encode(**env))
    if env["op"] == "t":
        assert read is None  # decode's path
        return
    assert read is not None
    fast, columns = read
    source = env["source"]
    assert (fast.op, fast.before, fast.after, columns, fast.key) == (
        env["op"],
        env["before"],
        env["after"],
        env["columns"],
        env["key"],
    )
    assert fast.unchanged == env.get("unchanged")
    assert (fast.source.txId, fast.source.lsn, fast.source.commit_lsn, fast.source.ts_us, fast.source.seq) == (
        source["txId"],
        source["lsn"],
        source["commit_lsn"],
        source["ts_us"],
        source["seq"],
    )


@pytest.mark.parametrize(("changes", "error"), MALFORMED)
def test_the_row_change_path_takes_nothing_decode_refuses(changes: dict[str, Any], error: str) -> None:
    assert decode_row_change(orjson.dumps({**GOOD, **changes})) is None


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "n", "x"]), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(
    st.dictionaries(
        st.sampled_from([*GOOD, "unchanged", "refetched", "partitions"]),
        ANY_JSON | st.sampled_from(["c", "u", "d", "r", "t", "s"]),
        max_size=4,
    ),
    st.sets(st.sampled_from(sorted(GOOD)), max_size=2),
)
def test_whatever_the_row_change_path_takes_decode_takes_and_reads_the_same(
    changes: dict[str, Any], dropped: set[str]
) -> None:
    env = {k: v for k, v in {**GOOD, **changes}.items() if k not in dropped}
    try:
        raw = orjson.dumps(env)
    except orjson.JSONEncodeError:  # an integer orjson cannot write
        return
    read = decode_row_change(raw)
    if read is None:
        return
    fast, columns = read
    slow = decode(raw)  # raises if the hot path took what decode refuses
    assert (fast.op, fast.before, fast.after, columns, fast.key) == (
        slow["op"],
        slow["before"],
        slow["after"],
        slow["columns"],
        slow["key"],
    )
    assert fast.unchanged == slow.get("unchanged")
    assert fast.source.commit_lsn == slow["source"].get("commit_lsn")


def test_an_integer_above_the_signed_64_bit_range_takes_decodes_path() -> None:
    raw = orjson.dumps({**GOOD, "after": {"id": 1, "n": 2**63}})
    assert decode_row_change(raw) is None
    assert decode(raw)["after"] == {"id": 1, "n": 2**63}
