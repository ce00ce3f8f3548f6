"""`cdc-sink rebuild`'s verdicts: which consumer-group members are in its way and the one line
refusing it, waiting for members stopped a moment ago, the topics it needs and whether it finished."""

import datetime as dt

import pytest

from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.tables import TableName
from sink_connector.group_members import Member, describe, in_the_way, refusal, wait_for_members
from sink_connector.rebuild import Holder, check_topics, holder_text, unfinished

PERSON = TableName("public", "person")
ORDERS = TableName("public", "orders")
TOPICS = ["cdc.public.person", "cdc.public.orders"]


def member(group: str, *partitions: tuple[str, int], instance: str | None = None) -> Member:
    return Member(group, "cdc-sink", "/10.0.0.5", instance, tuple(partitions))


def test_every_member_of_its_own_group_is_in_the_way() -> None:
    idle = member("cdc-sink")
    holding = member("cdc-sink", ("cdc.public.person", 0))
    assert in_the_way([idle, holding], "cdc-sink", TOPICS) == [idle, holding]


def test_other_groups_count_only_for_the_members_holding_its_topics() -> None:
    other_tables = member("other", ("cdc.public.items", 0))
    holding = member("other", ("cdc.public.orders", 1))
    assert in_the_way([other_tables, holding], "cdc-sink", TOPICS) == [holding]


def test_describes_a_member_with_what_it_holds_of_the_topics() -> None:
    m = member("cdc-sink", ("cdc.public.items", 0), ("cdc.public.person", 0), instance="sink-1")
    assert describe(m, TOPICS) == "cdc-sink on /10.0.0.5 (instance sink-1) holding cdc.public.person[0]"
    assert describe(Member("g", "", "", None, ()), TOPICS) == "a consumer on an unknown host"


def test_refusal_names_each_group_its_live_members_and_the_fix() -> None:
    line = refusal(
        [member("cdc-sink", ("cdc.public.person", 0)), member("other", ("cdc.public.orders", 0))],
        "cdc-sink",
        [PERSON, ORDERS],
        TOPICS,
    )
    assert line == (
        "cannot rebuild public.person, public.orders while sinks apply them: group cdc-sink has 1 live member: "
        "cdc-sink on /10.0.0.5 holding cdc.public.person[0] | group other has 1 live member: cdc-sink on "
        "/10.0.0.5 holding cdc.public.orders[0]; stop them, then run the rebuild again"
    )
    assert "\n" not in line


def test_refusal_offers_a_group_of_its_own_when_its_groups_sinks_hold_none_of_the_topics() -> None:
    line = refusal([member("cdc-sink"), member("cdc-sink")], "cdc-sink", [PERSON], TOPICS[:1])
    assert "group cdc-sink has 2 live members: " in line
    assert line.endswith(
        "stop them, then run the rebuild again, or give the rebuild a --group of its own if those sinks do "
        "not consume public.person"
    )


def test_refusal_explains_static_members() -> None:
    line = refusal([member("cdc-sink", instance="s1")], "cdc-sink", [PERSON], TOPICS[:1])
    assert line.endswith("(a sink stopped with --instance-id stays a member for the session timeout)")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds


def test_waits_for_members_stopped_a_moment_ago_to_leave() -> None:
    clock, announced = Clock(), list[list[Member]]()
    reads = iter([[member("g")], [member("g")], []])
    found = wait_for_members(lambda: next(reads), 13.0, clock.now, clock.sleep, announced.append)
    assert found == [] and clock.t == 1.0 and len(announced) == 1


def test_gives_up_on_members_that_stay() -> None:
    clock = Clock()
    found = wait_for_members(lambda: [member("g")], 13.0, clock.now, clock.sleep, lambda _: None)
    assert found == [member("g")] and clock.t == 13.0


def test_no_wait_when_nobody_is_in_the_way() -> None:
    clock, announced = Clock(), list[list[Member]]()
    assert wait_for_members(list, 13.0, clock.now, clock.sleep, announced.append) == []
    assert clock.t == 0 and announced == []


def test_a_table_without_a_topic_cannot_be_rebuilt() -> None:
    assert check_topics(["cdc.public.person", "x"], "cdc", [PERSON]) == ["cdc.public.person"]
    with pytest.raises(ConfigError, match=r"topic cdc\.public\.orders does not exist"):
        check_topics(["cdc.public.person"], "cdc", [PERSON, ORDERS])


def test_unfinished_partitions_are_those_below_the_end_seen_at_start() -> None:
    ends = {("t", 0): 10, ("t", 1): 0, ("t", 2): 5}
    assert unfinished(ends, {("t", 0): 10, ("t", 2): 6}) == []
    assert unfinished(ends, {("t", 0): None, ("t", 2): 4}) == ["t[0] at 0 of 10", "t[2] at 4 of 5"]


def test_names_the_session_holding_a_rebuild_lock() -> None:
    since = dt.datetime(2026, 12, 1, 16, 40, 1, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    holder = Holder("public.person", 1234, "cdc-sink rebuild", "10.0.0.5", since)
    assert (
        holder_text(holder) == "cdc-sink rebuild (target pid 1234, from 10.0.0.5, since 2026-12-01 15:40:01 UTC)"
    )
    assert holder_text(Holder("public.person", 7, None, None, None)) == "a session (target pid 7)"
