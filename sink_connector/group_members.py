"""Which consumer-group members would apply the tables a `cdc-sink rebuild` empties: every live
member of the rebuild's own group (joining the group hands them its topics), and the members of the
other groups that applied these topics to this target (their offsets rows) holding a partition of
them. Read with Kafka's DescribeConsumerGroups; the verdict and its one line are pure."""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import ConsumerGroupState

from pg_kafka_cdc.common.tables import TableName

_GONE = (ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD)


@dataclass(frozen=True)
class Member:
    group: str
    client_id: str
    host: str
    instance_id: str | None
    partitions: tuple[tuple[str, int], ...]  # assigned now


def in_the_way(members: Iterable[Member], group: str, topics: Iterable[str]) -> list[Member]:
    """The members that would apply what the rebuild replays: any of its own group, and those of
    the other groups (the sinks' groups of this target) assigned one of `topics`."""
    wanted = set(topics)
    return [m for m in members if m.group == group or any(t in wanted for t, _ in m.partitions)]


def describe(member: Member, topics: Iterable[str]) -> str:
    """`cdc-sink on /10.0.0.5 (instance sink-1) holding cdc.public.person[0]`."""
    wanted = set(topics)
    held = [f"{t}[{p}]" for t, p in member.partitions if t in wanted]
    text = f"{member.client_id or 'a consumer'} on {member.host or 'an unknown host'}"
    if member.instance_id:
        text += f" (instance {member.instance_id})"
    return text + (f" holding {', '.join(held)}" if held else "")


def refusal(members: Sequence[Member], group: str, tables: Sequence[TableName], topics: Sequence[str]) -> str:
    """The one line refusing a rebuild while `members` run."""
    names = ", ".join(map(str, tables))
    groups: dict[str, list[Member]] = {}
    for m in members:
        groups.setdefault(m.group, []).append(m)
    parts = []
    for name, of_group in groups.items():
        count = f"{len(of_group)} live member{'s' if len(of_group) > 1 else ''}"
        parts.append(f"group {name} has {count}: " + "; ".join(describe(m, topics) for m in of_group))
    fix = "stop them, then run the rebuild again"
    if all(m.group == group and not set(topics) & {t for t, _ in m.partitions} for m in members):
        fix += f", or give the rebuild a --group of its own if those sinks do not consume {names}"
    static = any(m.instance_id for m in members)
    if static:
        fix += " (a sink stopped with --instance-id stays a member for the session timeout)"
    return f"cannot rebuild {names} while sinks apply them: {' | '.join(parts)}; {fix}"


def members_of(admin: Any, groups: Iterable[str], timeout: float = 10.0) -> list[Member]:
    """The live members of `groups`, with what each is assigned."""
    names = sorted(set(groups))
    if not names:
        return []
    found: list[Member] = []
    for name, future in admin.describe_consumer_groups(names, request_timeout=timeout).items():
        description = future.result()
        if description.state in _GONE:
            continue
        for m in description.members:
            assigned = m.assignment.topic_partitions if m.assignment is not None else []
            found.append(
                Member(
                    name,
                    m.client_id or "",
                    m.host or "",
                    m.group_instance_id,
                    tuple(sorted((p.topic, p.partition) for p in assigned)),
                )
            )
    return found


def blocking_members(admin: Any, group: str, others: Iterable[str], topics: Sequence[str]) -> list[Member]:
    """The members in the way of a rebuild of `topics` by `group`, now (`others`: the other groups
    that applied them to the target)."""
    return in_the_way(members_of(admin, [group, *others]), group, topics)


def wait_for_members(
    read: Callable[[], list[Member]],
    deadline: float,
    now: Callable[[], float],
    sleep: Callable[[float], object],
    announce: Callable[[list[Member]], object],
) -> list[Member]:
    """`read()` until it finds no member in the way or `deadline` passes (a member stopped a moment
    ago stays until its session times out); returns the last members found."""
    members = read()
    announced = False
    while members and now() < deadline:
        if not announced:
            announce(members)
            announced = True
        sleep(0.5)
        members = read()
    return members
