"""How cdc-source starts, for every combination of slot and record it can find."""

import pytest

from source_connector.slot import SlotInfo
from source_connector.start import Adopt, Create, Refuse, Restart, Resume, decide
from source_connector.state import SourceState

DB, SYSTEM = "testdb", "7312345678901234567"


def slot(confirmed: int | None = 1000, plugin: str = "wal2json", database: str = DB) -> SlotInfo:
    return SlotInfo("s", plugin, database, False, None, confirmed, confirmed, "reserved", None)


def state(
    snapshot: str = "done", snapshot_lsn: int = 500, confirmed: int = 1000, bound: int = 1200
) -> SourceState:
    return SourceState("s", DB, SYSTEM, snapshot, snapshot_lsn, confirmed, bound)


def test_no_slot_and_no_record_creates_the_slot() -> None:
    assert decide("s", None, None, DB, SYSTEM) == Create(restart=False)


def test_no_slot_after_a_snapshot_that_died_creates_it_again_with_a_truncate_first() -> None:
    assert decide("s", None, state("started"), DB, SYSTEM) == Create(restart=True)


@pytest.mark.parametrize("snapshot", ["done", "skipped"])
def test_a_slot_dropped_while_stopped_is_refused(snapshot: str) -> None:
    decision = decide("s", None, state(snapshot, confirmed=1000), DB, SYSTEM)
    assert isinstance(decision, Refuse)
    assert "slot s is gone" in decision.reason and "0/3E8" in decision.reason
    assert "cdc-source drop-slot --slot s" in decision.reason


def test_slot_and_record_that_agree_resume_from_the_newer_position() -> None:
    record = state(confirmed=900, bound=1200)
    assert decide("s", slot(confirmed=1000), record, DB, SYSTEM) == Resume(record, 1000)
    record = state(confirmed=1100, bound=1200)
    assert decide("s", slot(confirmed=1000), record, DB, SYSTEM) == Resume(record, 1100)


def test_a_slot_at_the_bound_resumes() -> None:
    record = state(confirmed=1000, bound=1200)
    assert decide("s", slot(confirmed=1200), record, DB, SYSTEM) == Resume(record, 1200)


def test_a_slot_past_the_bound_was_recreated_or_consumed_and_is_refused() -> None:
    decision = decide("s", slot(confirmed=1201), state(bound=1200), DB, SYSTEM)
    assert isinstance(decision, Refuse)
    assert "past the last position this connector confirmed" in decision.reason
    assert "rebuild the target" in decision.reason


def test_a_slot_someone_else_made_is_adopted_without_a_snapshot() -> None:
    decision = decide("s", slot(confirmed=1000), None, DB, SYSTEM)
    assert decision == Adopt(SourceState("s", DB, SYSTEM, "skipped", 1000, 1000, 1000))


def test_a_new_slot_without_a_confirmed_position_is_adopted_at_zero() -> None:
    assert decide("s", slot(confirmed=None), None, DB, SYSTEM) == Adopt(
        SourceState("s", DB, SYSTEM, "skipped", 0, 0, 0)
    )


def test_an_unfinished_snapshot_on_an_unmoved_slot_restarts() -> None:
    assert decide("s", slot(confirmed=500), state("started", snapshot_lsn=500), DB, SYSTEM) == Restart()


def test_an_unfinished_snapshot_on_a_slot_that_moved_is_refused() -> None:
    decision = decide("s", slot(confirmed=700), state("started", snapshot_lsn=500), DB, SYSTEM)
    assert isinstance(decision, Refuse)
    assert "moved" in decision.reason and "never finished" in decision.reason


@pytest.mark.parametrize(
    ("found", "fragment"),
    [
        (slot(plugin="pgoutput"), "uses the plugin pgoutput, not wal2json"),
        (slot(database="other"), "belongs to database other, not testdb"),
    ],
)
def test_a_slot_that_cannot_be_ours_is_refused_whatever_the_record(found: SlotInfo, fragment: str) -> None:
    for record in (None, state(), state("started")):
        decision = decide("s", found, record, DB, SYSTEM)
        assert isinstance(decision, Refuse) and fragment in decision.reason
