"""FeedbackGate: a flush position goes to PostgreSQL only once the state topic holds a bound of
everything psycopg2 could then report (its own auto-advance included)."""

from hypothesis import given
from hypothesis import strategies as st

from source_connector.feedback import FeedbackGate


def test_initial_state() -> None:
    gate = FeedbackGate(0, 500)
    assert (gate.sent, gate.auto, gate.last_start, gate.requested, gate.acked) == (0, 0, 0, 500, 500)
    assert gate.bound(0) == 0
    assert gate.bound(300) == 300


def test_bound_is_the_max_of_target_sent_and_auto() -> None:
    gate = FeedbackGate(100, 0)
    assert gate.bound(50) == 100
    gate.auto = 400
    assert gate.bound(200) == 400
    assert gate.bound(600) == 600


def test_sendable_only_when_the_acknowledged_bound_covers_it() -> None:
    gate = FeedbackGate(0, 100)
    assert gate.may_send(100)
    assert not gate.may_send(101)
    assert gate.needs_state(200) == 200
    assert not gate.may_send(200)  # requested, not yet acknowledged
    gate.state_acknowledged(200)
    assert gate.may_send(200)
    gate.mark_sent(200)
    assert gate.sent == 200
    assert not gate.may_send(200)  # nothing new
    assert not gate.may_send(150)  # never backwards


NO_BEGIN = 1 << 64  # no BEGIN received since the previous observation


def test_auto_advance_must_be_covered_too() -> None:
    gate = FeedbackGate(0, 100)
    gate.observe(NO_BEGIN, 0, 900)  # psycopg2 may report 900 by itself
    assert gate.auto == 900
    assert not gate.may_send(100)
    assert gate.needs_state(100) == 900
    gate.state_acknowledged(900)
    assert gate.may_send(100)


def test_needs_state_returns_each_new_bound_once() -> None:
    gate = FeedbackGate(0, 100)
    assert gate.needs_state(50) is None  # covered by the starting bound
    assert gate.needs_state(100) is None
    assert gate.needs_state(150) == 150
    assert gate.needs_state(150) is None  # already requested, even if not acknowledged yet
    assert gate.needs_state(120) is None
    assert gate.needs_state(151) == 151
    assert gate.requested == 151
    assert gate.acked == 100


def test_state_acknowledged_never_goes_back() -> None:
    gate = FeedbackGate(0, 100)
    gate.state_acknowledged(300)
    gate.state_acknowledged(200)  # an older write acknowledged late
    assert gate.acked == 300


def test_mark_sent_never_goes_back() -> None:
    gate = FeedbackGate(500, 500)
    gate.mark_sent(400)
    assert gate.sent == 500


def test_observe_raises_auto_when_sent_covered_the_previous_message() -> None:
    gate = FeedbackGate(0, 0)
    gate.observe(NO_BEGIN, 100, 150)  # last_start was 0 and sent 0 >= 0
    assert gate.auto == 150
    assert gate.last_start == 100
    gate.observe(NO_BEGIN, 200, 250)  # sent 0 < 100: psycopg2 cannot have advanced
    assert gate.auto == 150
    assert gate.last_start == 200
    gate.mark_sent(200)
    gate.observe(NO_BEGIN, 200, 300)  # sent 200 >= 200
    assert gate.auto == 300


def test_observe_uses_the_previous_message_start_not_the_new_one() -> None:
    gate = FeedbackGate(100, 0)
    gate.observe(NO_BEGIN, 50, 120)  # previous start 0 <= 100
    assert gate.auto == 120
    gate.observe(
        NO_BEGIN, 500, 600
    )  # previous start 50 <= 100: the keepalive may have come before the new message
    assert gate.auto == 600
    gate.observe(NO_BEGIN, 500, 700)  # previous start 500 > 100
    assert gate.auto == 600


def test_observe_never_lowers_auto() -> None:
    gate = FeedbackGate(1000, 0)
    gate.observe(NO_BEGIN, 900, 2000)
    gate.observe(NO_BEGIN, 10, 1500)
    assert gate.auto == 2000
    assert gate.last_start == 10  # psycopg2's last message start can go back (an older transaction)


def test_a_new_cursor_starts_from_zero_with_the_old_bound() -> None:
    # the stream recreates the gate with sent=0 and the acknowledged bound after a reconnect
    gate = FeedbackGate(0, 5000)
    gate.observe(NO_BEGIN, 0, 4000)
    assert gate.auto == 4000
    assert gate.needs_state(4500) is None
    assert gate.may_send(4500)


def test_observe_follows_psycopg2_when_message_starts_go_back() -> None:
    gate = FeedbackGate(0, 0)
    gate.observe(NO_BEGIN, 0, 10)
    gate.observe(20, 100, 100)  # tx1 read: B at 20 ... C at 100
    gate.state_acknowledged(gate.needs_state(100) or 0)
    gate.mark_sent(100)  # tx1 confirmed
    gate.observe(120, 160, 160)  # tx3 read (B 120, C 160), not yet confirmed: sent stays 100
    # tx2 began at LSN 30 (before tx1 committed) and committed at 250: its B message starts at 30.
    # A keepalive (wal_end 300) arrives right after it; psycopg2 sees explicitly_flushed 100 >= 30
    # and raises its flush_lsn to 300, which it reports on its own.
    gate.observe(30, 250, 300)
    assert gate.bound(gate.sent) >= 300


# --- property: whatever psycopg2 does, the bound written to the state topic covers what is sent ---


@given(
    st.lists(
        st.tuples(st.sampled_from(["observe", "target", "ack"]), st.integers(0, 1000), st.integers(0, 1000)),
        max_size=40,
    )
)
def test_never_sends_past_the_acknowledged_bound(ops: list[tuple[str, int, int]]) -> None:
    gate = FeedbackGate(0, 0)
    outstanding: list[int] = []
    for op, a, b in ops:
        if op == "observe":
            gate.observe(min(a, b), a, max(a, b))
        elif op == "target":
            bound = gate.needs_state(a)
            if bound is not None:
                assert bound >= a
                assert bound > gate.acked
                outstanding.append(bound)
            if gate.may_send(a):
                assert gate.bound(a) <= gate.acked
                gate.mark_sent(a)
        elif outstanding:
            gate.state_acknowledged(outstanding.pop(0))
        assert gate.sent <= gate.acked
        assert gate.requested >= gate.acked
