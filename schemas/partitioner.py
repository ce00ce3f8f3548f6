"""Kafka's default partitioner for keyed messages (Java's murmur2, librdkafka's `murmur2_random`).

The sink uses it to find which rows of a table belong to a partition when it applies a TRUNCATE
event that the source sent to every partition.
"""

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash as an unsigned 32-bit integer."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    end = length & ~3
    for i in range(0, end, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    rest = length & 3
    if rest == 3:
        h ^= data[end + 2] << 16
    if rest >= 2:
        h ^= data[end + 1] << 8
    if rest >= 1:
        h ^= data[end]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h


def as_signed(h: int) -> int:
    """The hash as Java's signed int (for comparing with Kafka's published test vectors)."""
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java-compatible partitioner picks for a non-null key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
