"""A row change read without decoding it (source_connector/row_match.py) gives the events the
general path gives (decode, then EventBuilder.row); whatever it does not know takes that path."""

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st

from source_connector.events import EventBuilder, Message, TxContext
from source_connector.table_info import TableInfo
from source_connector.wal2json import Decoder
from tests.unit.test_events import builder, table
from tests.unit.wal2json_messages import Column, bare, boolean, bytea, change, text

# (type, strategy of values as wal2json 2.5 prints them, the same as 2.6 prints them)
TYPES: dict[str, tuple[st.SearchStrategy[bytes], st.SearchStrategy[bytes]]] = {
    "bigint": (
        st.integers(-(2**63), 2**63 - 1).map(bare),
        st.integers(-(2**63), 2**63 - 1).map(lambda i: text(str(i))),
    ),
    "integer": (
        st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)).map(bare),
        st.integers(0, 9).map(lambda i: text(str(i))),
    ),
    "numeric(12,2)": (
        st.one_of(st.none(), st.decimals(-(10**9), 10**9, places=2, allow_nan=False).map(str)).map(bare),
        st.one_of(st.none(), st.sampled_from(["1.50", "NaN", "-0.01"])).map(text),
    ),
    "double precision": (
        st.sampled_from([b"1e+100", b"-1.5", b"0", b"3.141592653589793", b"null"]),
        st.sampled_from([b'"1e+100"', b'"Infinity"', b'"NaN"', b"null"]),
    ),
    "boolean": (
        st.one_of(st.none(), st.booleans()).map(boolean),
        st.one_of(st.none(), st.booleans()).map(boolean),
    ),
    "bytea": (
        st.one_of(st.none(), st.binary(max_size=8).map(bytes.hex)).map(bytea),
        st.one_of(st.none(), st.binary(max_size=8).map(bytes.hex)).map(bytea),
    ),
    "text": (st.one_of(st.none(), st.text()).map(text), st.one_of(st.none(), st.text()).map(text)),
    "jsonb": (st.just(text('{"a": [1, "\\"x\\""]}')), st.just(text("[]"))),
    "timestamp with time zone": (
        st.just(text("2026-11-25 14:43:17.816235+00")),
        st.just(text("2026-11-25 14:43:17.816235+00")),
    ),
}


def events(messages: list[Message]) -> list[tuple[Any, ...]]:
    """The messages with each value parsed and its processing time left out; keys as they are."""
    out: list[tuple[Any, ...]] = []
    for topic, key, value, partition, headers in messages:
        parsed = None if value is None else orjson.loads(value)
        if parsed is not None:
            parsed.pop("ts_ms")
        out.append((topic, key, parsed, partition, headers))  # the key as bytes: it picks the partition
    return out


def both(
    info: TableInfo, payload: bytes, numbers_as_strings: bool = False
) -> tuple[list[Message] | None, list[Message], EventBuilder]:
    """(the messages read without decoding, or None; the messages of the general path)."""
    fast, _ = builder(info)
    slow, _ = builder(info)
    fast.wal2json_numbers(numbers_as_strings)
    fast_tx, slow_tx = TxContext(730, 0x1927B78, 1), TxContext(730, 0x1927B78, 1)
    found = fast.row_payload(payload, fast_tx)
    general = slow.row(Decoder(numbers_as_strings).decode(payload), slow_tx)
    if found is not None:
        assert fast_tx.seq == slow_tx.seq
    return found, general, fast


@st.composite
def tables_and_rows(draw: st.DrawFn) -> tuple[TableInfo, list[Column], list[Column], bool]:
    """A table of random columns (a key first), a new row and an old one, and the wal2json build."""
    numbers_as_strings = draw(st.booleans())
    names = draw(st.lists(st.sampled_from(sorted(TYPES)), min_size=1, max_size=6))
    columns = [("id", "bigint"), *((f"c{i} é", t) for i, t in enumerate(names))]
    full = draw(st.booleans())
    info = table(columns=columns, replica_identity="f" if full else "d")
    form = 1 if numbers_as_strings else 0

    def row() -> list[Column]:
        return [(n, t, draw(TYPES[t][form])) for n, t in columns]

    new, old = row(), row()
    old[0] = new[0] if draw(st.booleans()) else old[0]
    return info, new, old, numbers_as_strings


@given(tables_and_rows(), st.sampled_from(["I", "U", "D"]))
def test_a_change_read_without_decoding_gives_the_events_of_the_general_path(
    case: tuple[TableInfo, list[Column], list[Column], bool], action: str
) -> None:
    info, new, old, numbers_as_strings = case
    identity = old if info.full_identity else old[:1]
    payload = change(
        action,
        columns=new if action != "D" else None,
        identity=identity if action != "I" else None,
        table="probe",
    )
    found, general, _ = both(info, payload, numbers_as_strings)
    if found is not None:
        assert events(found) == events(general)


def probe_row(n: bytes = bare("1.50"), big: bytes = text("x")) -> list[tuple[str, str, bytes]]:
    return [("id", "bigint", bare(7)), ("n", "numeric(12,2)", n), ("big", "text", big)]


def test_the_common_changes_are_read_without_decoding() -> None:
    info = table()
    for payload in (
        change("I", columns=probe_row()),
        change("U", columns=probe_row(), identity=[("id", "bigint", bare(7))]),
        change("D", identity=[("id", "bigint", bare(7))]),
        change("I", columns=probe_row(big=text('quote " backslash \\ tab \t ünï'))),
    ):
        found, general, fast = both(info, payload)
        assert found is not None, payload
        assert events(found) == events(general)
    assert sum(fast.events.values()) == 1


def test_what_the_matcher_does_not_know_takes_the_general_path() -> None:
    info = table()
    key = [("id", "bigint", bare(7))]
    for payload in (
        change("I", columns=probe_row(n=b"null")),  # a null numeric may stand for NaN: counted there
        change("U", columns=probe_row()[:2], identity=key),  # an unchanged TOAST column left out
        change("U", columns=probe_row(), identity=[("id", "bigint", bare(8))]),  # a key change
        change("U", columns=probe_row()),  # no identity
        change("I", columns=[*probe_row(), ("added", "text", text("a"))]),  # a shape change
        change("I", columns=[(n, t, v, p + 1) for p, (n, t, v) in enumerate(probe_row(), 1)]),  # attnums moved
        change("I", columns=probe_row(), table="probe_2026"),  # a partition (or an unknown table)
        change("I", columns=probe_row(), table='pro"be'),  # a name that needs escapes
    ):
        found, general, _ = both(info, payload)
        assert found is None, payload
    quoted = table(name='pro"be')
    found, general, _ = both(quoted, change("I", columns=probe_row(), table='pro"be'))
    assert found is None and len(general) == 1


def test_changes_of_two_tables_in_turn_and_a_table_known_anew_each_get_their_own_shape() -> None:
    probe, other = table(), table(name="other", columns=(("id", "bigint"), ("s", "text")))
    fast, tables = builder(probe, other)
    ctx = TxContext(730, 0x1927B78, 1)
    other_row: list[Column] = [("id", "bigint", bare(1)), ("s", "text", text("a"))]
    for payload, topic in (
        (change("I", columns=probe_row()), probe.topic),
        (change("I", columns=other_row, table="other"), other.topic),
        (change("I", columns=probe_row()), probe.topic),
    ):
        found = fast.row_payload(payload, ctx)
        assert found is not None and [m[0] for m in found] == [topic]
    tables.remember(table())  # the catalog's answer is now another TableInfo of the same shape
    found = fast.row_payload(change("I", columns=probe_row()), ctx)
    assert (
        found is not None
        and fast.last_shape is not None
        and fast.last_shape.info is tables.infos[("public", "probe")]
    )
