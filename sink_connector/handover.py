"""The hand-over from a bulk copy to the stream: which events the copy already contains. Pure.

The copy runs in a REPEATABLE READ transaction whose snapshot (`pg_current_snapshot()`) is recorded
with the WAL position right after it was taken. A streamed event is already in the copy exactly
when its transaction is visible in that snapshot: committed before it, so not running (not in
`xip`) and below `xmax`. Events of transactions that commit after that WAL position cannot be
visible and skip the test. Snapshot-read (`r`) events the source published when its slot was created
are older than the copy (the copy waits for the slot), so they are skipped too; `r` events of a slot
created after the copy are newer and applied.
"""

from dataclasses import dataclass

XID_EPOCH = 1 << 32


@dataclass(frozen=True)
class CopySnapshot:
    xmin: int  # 64-bit (xid8)
    xmax: int
    xip: frozenset[int]
    lsn: int  # WAL insert position read right after the snapshot was taken

    @classmethod
    def parse(cls, text: str, lsn: int) -> "CopySnapshot":
        """From pg_snapshot's text form `xmin:xmax:xip,xip,...`."""
        xmin, xmax, xip = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x), lsn)

    def widen(self, xid: int) -> int:
        """A 32-bit xid from the stream as the 64-bit xid nearest to this snapshot."""
        full = (self.xmax & ~(XID_EPOCH - 1)) | xid
        if full > self.xmax + XID_EPOCH // 2:
            full -= XID_EPOCH
        elif full < self.xmax - XID_EPOCH // 2:
            full += XID_EPOCH
        return full

    def visible(self, xid: int) -> bool:
        """Was the transaction `xid` (32-bit) committed when the snapshot was taken?"""
        full = self.widen(xid)
        if full < self.xmin:
            return True
        if full >= self.xmax:
            return False
        return full not in self.xip

    def contains(self, op: str, xid: int | None, lsn: int | None, commit_lsn: int | None) -> bool:
        """True when the copy already holds this event's effect (skip it)."""
        if op == "r" or (op == "t" and xid is None):  # snapshot reads, and the truncate of a snapshot restart
            return lsn is None or lsn < self.lsn
        if commit_lsn is not None and commit_lsn >= self.lsn:
            return False
        if xid is None:
            return False
        return self.visible(xid)
