"""Kafka's murmur2 partitioner: Kafka's own test vectors and the partition range."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.partitioner import as_signed, murmur2, partition_for

# org.apache.kafka.common.utils.UtilsTest#testMurmur2
KAFKA_VECTORS = [
    ("21", -973932308),
    ("foobar", -790332482),
    ("a-little-bit-long-string", -985981536),
    ("a-little-bit-longer-string", -1486304829),
    ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    ("abc", 479470107),
]


@pytest.mark.parametrize(("key", "expected"), KAFKA_VECTORS)
def test_kafka_test_vectors(key: str, expected: int) -> None:
    assert as_signed(murmur2(key.encode())) == expected


def test_empty_key() -> None:
    # no 4-byte block and no tail: only the seed mixed with the length 0 and the final avalanche
    h = 0x9747B28C
    h ^= h >> 13
    h = (h * 0x5BD1E995) & 0xFFFFFFFF
    h ^= h >> 15
    assert murmur2(b"") == h


@pytest.mark.parametrize("length", range(9))
def test_every_tail_length(length: int) -> None:
    # lengths 0..8 cover the 0, 1, 2 and 3 byte tails after whole 4-byte blocks
    data = bytes(range(0x80, 0x80 + length))  # high bytes: Java's signed bytes must not leak in
    h = murmur2(data)
    assert 0 <= h < 2**32


def test_as_signed() -> None:
    assert as_signed(0) == 0
    assert as_signed(0x7FFFFFFF) == 2**31 - 1
    assert as_signed(0x80000000) == -(2**31)
    assert as_signed(0xFFFFFFFF) == -1


@given(st.binary(max_size=200))
def test_hash_is_unsigned_32_bit(data: bytes) -> None:
    h = murmur2(data)
    assert 0 <= h < 2**32
    assert -(2**31) <= as_signed(h) < 2**31
    assert as_signed(h) & 0xFFFFFFFF == h


@given(st.binary(max_size=200), st.integers(1, 10_000))
def test_partition_in_range(key: bytes, partitions: int) -> None:
    p = partition_for(key, partitions)
    assert 0 <= p < partitions
    # Kafka: Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions
    assert p == (as_signed(murmur2(key)) & 0x7FFFFFFF) % partitions


def test_single_partition() -> None:
    assert partition_for(b'{"id":1}', 1) == 0


def test_keys_spread_over_partitions() -> None:
    seen = {partition_for(f'{{"id":{i}}}'.encode(), 6) for i in range(200)}
    assert seen == set(range(6))
