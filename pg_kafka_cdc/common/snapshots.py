"""PostgreSQL snapshots in their text form (`pg_current_snapshot()::text`, `xmin:xmax:xip,...`, 64-bit
ids), and whether a transaction known by its 32-bit xid is visible in one. Pure."""

from dataclasses import dataclass

from pg_kafka_cdc.common import xid as xids


@dataclass(frozen=True)
class Snapshot:
    xmin: int  # 64-bit (xid8): every transaction below it had ended
    xmax: int  # the first id not yet assigned
    xip: frozenset[int]  # running at the time, between xmin and xmax

    def widen(self, xid: int) -> int:
        """A 32-bit xid as the 64-bit xid nearest to this snapshot."""
        return xids.widen(xid, self.xmax)

    def visible(self, xid: int) -> bool:
        """True when the effects of transaction `xid` (32-bit), if it committed, are visible in the
        snapshot: it had ended when the snapshot was taken."""
        full = self.widen(xid)
        if full < self.xmin:
            return True
        if full >= self.xmax:
            return False
        return full not in self.xip


def parse_snapshot(text: str) -> Snapshot:
    """From pg_snapshot's text form `xmin:xmax:xip,xip,...`."""
    xmin, xmax, xip = text.split(":")
    return Snapshot(int(xmin), int(xmax), frozenset(int(x) for x in xip.split(",") if x))
