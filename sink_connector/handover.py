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

from pg_kafka_cdc.common.snapshots import Snapshot, parse_snapshot


@dataclass(frozen=True)
class CopySnapshot(Snapshot):
    lsn: int  # WAL insert position read right after the snapshot was taken

    @classmethod
    def parse(cls, text: str, lsn: int) -> "CopySnapshot":
        """From pg_snapshot's text form `xmin:xmax:xip,xip,...` and the position read after it."""
        snapshot = parse_snapshot(text)
        return cls(snapshot.xmin, snapshot.xmax, snapshot.xip, lsn)

    def contains(self, op: str, xid: int | None, lsn: int | None, commit_lsn: int | None) -> bool:
        """True when the copy already holds this event's effect (skip it)."""
        if op == "r" or (op == "t" and xid is None):  # snapshot reads, and the truncate before a snapshot
            # at the copy's own position too: nothing was written between the slot's snapshot and the copy
            return lsn is None or lsn <= self.lsn
        if commit_lsn is not None and commit_lsn >= self.lsn:
            return False
        if xid is None:
            return False
        return self.visible(xid)
