"""WAL positions: text form and integer."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.lsn import int_to_lsn, lsn_to_int


@pytest.mark.parametrize(
    ("text_", "value"),
    [("0/0", 0), ("0/19276D8", 0x19276D8), ("16/B374D848", 97500059720), ("FFFFFFFF/FFFFFFFF", 2**64 - 1)],
)
def test_lsn_known_values(text_: str, value: int) -> None:
    assert lsn_to_int(text_) == value
    assert int_to_lsn(value) == text_


def test_lsn_accepts_lower_case_and_leading_zeros() -> None:
    assert lsn_to_int("16/b374d848") == 97500059720
    assert lsn_to_int("00000016/0B374D84") == (0x16 << 32) | 0x0B374D84


@given(st.integers(0, 2**64 - 1))
def test_lsn_round_trip(value: int) -> None:
    lsn = int_to_lsn(value)
    assert re.fullmatch(r"(0|[1-9A-F][0-9A-F]{0,7})/(0|[1-9A-F][0-9A-F]{0,7})", lsn)
    assert lsn_to_int(lsn) == value


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_lsn_order_is_numeric_order(a: int, b: int) -> None:
    assert (lsn_to_int(int_to_lsn(a)) < lsn_to_int(int_to_lsn(b))) == (a < b)
