"""How cdc-source starts, decided from what it finds: the slot on the source and the connector's own
record in Kafka. Pure: the connector reads both, asks `decide`, and carries out the answer.

- Resume: the slot and the record agree; stream on from the confirmed position.
- Adopt: a slot made by someone else; stream from it without an initial snapshot.
- Create: no slot; create it (and take the initial snapshot).
- Restart: the initial snapshot never finished; drop the slot and create it again.
- Refuse: streaming on would leave a gap in the topics; the reason says how to start over.
"""

from dataclasses import dataclass

from pg_kafka_cdc.common.lsn import int_to_lsn
from source_connector.slot import SlotInfo, slot_mismatch
from source_connector.state import SourceState


@dataclass(frozen=True)
class Resume:
    state: SourceState
    at: int  # where streaming starts


@dataclass(frozen=True)
class Adopt:
    state: SourceState  # a new record ("skipped" snapshot), to be written before streaming


@dataclass(frozen=True)
class Create:
    restart: bool  # an earlier snapshot died half-way: its `r` events are in the topics


@dataclass(frozen=True)
class Restart:
    pass


@dataclass(frozen=True)
class Refuse:
    reason: str


Decision = Resume | Adopt | Create | Restart | Refuse


def start_over(slot: str) -> str:
    return f"`cdc-source drop-slot --slot {slot}`"


def decide(
    slot_name: str, slot: SlotInfo | None, state: SourceState | None, database: str, system_id: str
) -> Decision:
    if slot is None:
        return _without_slot(slot_name, state)
    mismatch = slot_mismatch(slot, database)
    if mismatch is not None:
        return Refuse(mismatch)
    confirmed = slot.confirmed_flush_lsn or 0
    if state is None:
        return Adopt(SourceState(slot_name, database, system_id, "skipped", confirmed, confirmed, confirmed))
    if state.snapshot == "started":
        if confirmed != state.snapshot_lsn:
            return Refuse(
                f"slot {slot_name} moved ({int_to_lsn(confirmed)}) while its initial snapshot "
                f"(at {int_to_lsn(state.snapshot_lsn)}) never finished: something else consumed it. "
                f"Run {start_over(slot_name)} to start over"
            )
        return Restart()
    if confirmed > state.bound_lsn:
        return Refuse(
            f"slot {slot_name} is at {int_to_lsn(confirmed)}, past the last position this connector "
            f"confirmed ({int_to_lsn(state.bound_lsn)}): it was dropped and recreated, or consumed by "
            "another client, so changes in between are missing from the topics. To start over with a "
            f"fresh snapshot run {start_over(slot_name)}, then rebuild the target"
        )
    return Resume(state, max(confirmed, state.confirmed_lsn))


def _without_slot(slot_name: str, state: SourceState | None) -> Decision:
    if state is None:
        return Create(restart=False)
    if state.snapshot == "started":
        return Create(restart=True)
    return Refuse(
        f"slot {slot_name} is gone: it was dropped while this connector was stopped (it had confirmed "
        f"{int_to_lsn(state.confirmed_lsn)}), so changes since then are lost from the WAL. To start over "
        f"with a fresh snapshot run {start_over(slot_name)}, then rebuild the target"
    )
