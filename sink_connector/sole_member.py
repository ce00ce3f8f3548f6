"""`--consistency transaction` needs one cdc-sink holding every partition of its topics and of the
transaction topic: a source transaction spans partitions, and only a member that reads them all can
tell when it is complete. Checked before joining the group (another live member: refused, once a
member killed a moment ago has had its session time out) and at every assignment. The verdicts and
their one line are pure; the group is read with Kafka's DescribeConsumerGroups."""

import logging
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from pg_kafka_cdc.common.errors import SinkError
from sink_connector.bookkeeping import TopicPartition
from sink_connector.group_members import Member, members_of, wait_for_members
from sink_connector.session import SESSION_TIMEOUT_MS

log = logging.getLogger("sink")

# How long a member killed a moment ago may stay in the group: its session timeout, and a margin.
GRACE = SESSION_TIMEOUT_MS / 1000 + 3.0


def refusal(group: str, holders: Sequence[Member], missing: Collection[TopicPartition] = ()) -> str:
    """The one line refusing a second member."""
    parts = []
    for m in holders:
        held = [f"{t}[{p}]" for t, p in m.partitions] or [f"{t}[{p}]" for t, p in sorted(missing)]
        who = f"{m.client_id or 'a consumer'} on {m.host or 'an unknown host'}"
        if m.instance_id:
            who += f", instance {m.instance_id}"
        parts.append(f"{', '.join(held[:8])}{' ...' if len(held) > 8 else ''} ({who})")
    if not parts:
        parts.append(", ".join(f"{t}[{p}]" for t, p in sorted(missing)[:8]))
    return (
        f"--consistency transaction needs one cdc-sink to hold every partition: group {group} has another member "
        f"holding {'; '.join(parts)}; run a single cdc-sink in this group"
    )


def others(members: Iterable[Member], instance_id: str | None) -> list[Member]:
    """The members that are not this sink (a static member restarted is itself)."""
    return [m for m in members if not (instance_id and m.instance_id == instance_id)]


def missing_partitions(
    assigned: Iterable[TopicPartition], wanted_topics: Iterable[str], partitions_of: Callable[[str], Iterable[int]]
) -> list[TopicPartition]:
    """The partitions of `wanted_topics` not among `assigned`."""
    held = set(assigned)
    return sorted((t, p) for t in wanted_topics for p in partitions_of(t) if (t, p) not in held)


def check_alone_before_joining(admin: Any, group: str, instance_id: str | None) -> None:
    """Refuse when the group has another live member (waiting out one killed a moment ago)."""

    def read() -> list[Member]:
        return others(members_of(admin, [group]), instance_id)

    def announce(found: list[Member]) -> None:
        log.info(
            "group %s has %d other member(s); waiting up to %.0f s for them to leave (--consistency transaction "
            "needs a single cdc-sink)",
            group,
            len(found),
            GRACE,
        )

    found = wait_for_members(read, time.monotonic() + GRACE, time.monotonic, time.sleep, announce)
    if found:
        raise SinkError(refusal(group, found))


def members_besides(admin: Any, group: str, member_id: str, timeout: float = 10.0) -> list[Member]:
    """The live members of `group` other than the one with `member_id`, with what each is assigned
    (perhaps nothing yet: during a rebalance the assignments come last)."""
    found: list[Member] = []
    for future in admin.describe_consumer_groups([group], request_timeout=timeout).values():
        description = future.result()
        for m in description.members:
            if m.member_id == member_id:
                continue
            assigned = m.assignment.topic_partitions if m.assignment is not None else []
            partitions = tuple(sorted((p.topic, p.partition) for p in assigned))
            found.append(Member(group, m.client_id or "", m.host or "", m.group_instance_id, partitions))
    return found


def check_assignment(
    admin: Any,
    consumer: Any,
    group: str,
    assigned: list[TopicPartition],
    wanted: Callable[[Iterable[str]], list[str]],
    instance_id: str | None = None,
    tx_topic: str | None = None,
) -> None:
    """At an assignment: every partition of the subscribed topics (`wanted` of the broker's topics)
    is this member's. When some are not and the group has another member, refused (whether or not
    the group shows yet what that member holds); when it has none, the partitions belong to a topic
    created a moment ago and come with the next assignment."""
    metadata = consumer.list_topics(timeout=10)
    topics = wanted(metadata.topics)
    missing = missing_partitions(assigned, topics, lambda t: metadata.topics[t].partitions)
    if not missing:
        return
    holders = members_besides(admin, group, consumer.memberid())
    if holders:
        holding = [m for m in holders if set(m.partitions) & set(missing)]
        raise SinkError(refusal(group, holding or holders, missing))
    if instance_id and any(t == tx_topic for t, _ in missing):
        # Kafka hands a static member restarted within its session timeout the assignment of its
        # previous run, made for that run's subscription: no rebalance follows
        raise SinkError(
            f"Kafka gave instance {instance_id} of group {group} the assignment of its previous run, without "
            f"{tx_topic}: start it again with --consistency transaction once its session timeout "
            f"({SESSION_TIMEOUT_MS // 1000} s) has passed, or with another --instance-id"
        )
    log.info(
        "not assigned %s yet (no other member holds them): waiting for the next assignment",
        ", ".join(f"{t}[{p}]" for t, p in missing[:8]),
    )
