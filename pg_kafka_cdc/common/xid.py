"""Transaction ids: the 32-bit xid that WAL and wal2json carry, and the 64-bit id (xid8) that
`pg_current_snapshot()` prints, which adds the count of wraparounds (the epoch) above it."""

EPOCH = 1 << 32
_HALF = EPOCH // 2


def widen(xid: int, reference: int) -> int:
    """The 64-bit id of the 32-bit `xid`: the one nearest the 64-bit id `reference` (a snapshot's
    xmax, say), within 2^31 before it to 2^31 after it, never negative.

    PostgreSQL refuses to assign an xid that would be 2^31 or more ahead of an unfrozen one, so a
    transaction that can still be seen as running or committed is always that close to any id read
    at about the same time: the nearest 64-bit id with the same low 32 bits is the right one."""
    full = reference + (xid - reference + _HALF) % EPOCH - _HALF
    return full if full >= 0 else full + EPOCH
