"""Whether a transaction wal2json decoded is visible to a snapshot yet.

Logical decoding hands a transaction over as soon as its commit record is in the WAL, which is
before other sessions can see it (PostgreSQL marks it visible after the WAL flush, and after the
wait for synchronous standbys). A read-back of a row that transaction wrote must wait for that.
Pure: works on the text form of `pg_current_snapshot()` (`xmin:xmax:xip,...`, 64-bit ids) and the
32-bit xid wal2json reports.
"""

EPOCH = 1 << 32


def full_xid(xid: int, xmax: int) -> int:
    """The 64-bit id of `xid`, a transaction that started before a snapshot whose xmax is `xmax`."""
    candidate = (xmax & ~(EPOCH - 1)) | xid
    return candidate - EPOCH if candidate >= xmax and candidate >= EPOCH else candidate


def visible(snapshot: str, xid: int) -> bool:
    """True when the effects of committed transaction `xid` are visible in `snapshot`."""
    xmin_text, xmax_text, xip_text = snapshot.split(":")
    xmin, xmax = int(xmin_text), int(xmax_text)
    full = full_xid(xid, xmax)
    if full < xmin:
        return True
    if full >= xmax:
        return False
    return str(full) not in xip_text.split(",")
