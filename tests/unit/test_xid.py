"""Widening a 32-bit xid to 64 bits around a reference id, at the edges of a wraparound."""

from hypothesis import given
from hypothesis import strategies as st

from pg_kafka_cdc.common.xid import EPOCH, widen

HALF = EPOCH // 2


def test_same_epoch() -> None:
    assert widen(100, 200) == 100
    assert widen(300, 200) == 300
    assert widen(100, (3 << 32) + 200) == (3 << 32) + 100
    assert widen(200, (3 << 32) + 200) == (3 << 32) + 200


def test_just_past_a_wraparound_a_high_xid_is_from_the_epoch_before() -> None:
    assert widen(EPOCH - 1, EPOCH) == EPOCH - 1
    assert widen(EPOCH - 1, (5 << 32) + 3) == (5 << 32) - 1
    assert widen(4_294_967_000, EPOCH + 5) == 4_294_967_000


def test_just_before_a_wraparound_a_low_xid_is_from_the_epoch_after() -> None:
    assert widen(0, EPOCH - 1) == EPOCH
    assert widen(3, (5 << 32) - 10) == (5 << 32) + 3


def test_the_window_is_half_an_epoch_each_side() -> None:
    reference = (7 << 32) + 1000
    assert widen((reference - HALF) % EPOCH, reference) == reference - HALF
    assert widen((reference + HALF - 1) % EPOCH, reference) == reference + HALF - 1
    # exactly half an epoch ahead is the same low 32 bits as half an epoch behind: behind wins
    assert widen((reference + HALF) % EPOCH, reference) == reference - HALF


def test_no_epoch_before_the_first() -> None:
    # with a reference in epoch 0 an xid "from the epoch before" can only be a later one
    assert widen(EPOCH - 10, 5) == EPOCH - 10
    assert widen(EPOCH - 10, 0) == EPOCH - 10


@given(st.integers(0, 1 << 48), st.integers(-HALF, HALF - 1))
def test_recovers_any_id_within_the_window(reference: int, offset: int) -> None:
    full = reference + offset
    if full >= 0:
        assert widen(full % EPOCH, reference) == full


@given(st.integers(0, 1 << 48), st.integers(0, EPOCH - 1))
def test_keeps_the_low_32_bits(reference: int, xid: int) -> None:
    full = widen(xid, reference)
    assert full >= 0
    assert full % EPOCH == xid
