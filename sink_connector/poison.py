"""What a message the sink cannot apply does (--on-error): stop the sink after applying everything
before it (fail), or send it to the dead-letter topic and park its key (dlq)."""

from collections.abc import Callable, Iterable

from pg_kafka_cdc.common.errors import SinkError
from pg_kafka_cdc.common.pg import error_reason
from sink_connector.changes import Change, Rejected
from sink_connector.net_effect import TableBatch
from sink_connector.ports import Message, Target

Explain = Callable[[BaseException], str | None]


def _unexplained(exc: BaseException) -> str | None:
    return None


class ErrorPolicy:
    def __init__(self, on_error: str, parked: set[tuple[str, bytes]], explain: Explain = _unexplained) -> None:
        self.dead_letters = on_error == "dlq"
        # Keys whose changes are held back behind a dead letter (shared with the decoding).
        self.parked = parked
        # The target constraint or trigger behind an error, with its fix (session.TargetSession.explain).
        self.explain = explain

    def reason(self, exc: BaseException) -> str:
        """Why the target refused a write: its constraint or trigger and the fix, else the server's words."""
        return self.explain(exc) or error_reason(exc)

    def unapplicable(self, exc: BaseException) -> SinkError:
        """A batch the target refuses although no single change of it is refused (the rows of one
        statement checked against each other, or a deferred constraint at commit)."""
        return SinkError(f"a batch failed but no single change of it does: {self.reason(exc)}; giving up on it")

    def undecodable(self, message: Message, error: str) -> SinkError:
        return SinkError(
            f"cannot decode message {message.topic()}[{message.partition()}] at offset {message.offset()}: "
            f"{error}; nothing past it was applied (inspect it, or run with --on-error dlq)"
        )

    def rejected(self, poison: Change, reason: str) -> SinkError:
        return SinkError(
            f"the target rejected message {poison.topic}[{poison.partition}] at offset {poison.offset}: "
            f"{reason}; nothing past it was applied (fix the target or the data, or run with --on-error dlq)"
        )

    def set_aside(
        self, changes: list[Change], poison: Change, reason: str, messages: Iterable[Message]
    ) -> tuple[list[Change], list[Rejected]]:
        """--on-error dlq: the changes left to apply, and the dead letters: the poison and the later
        changes of its key (parked behind it)."""
        by_position = {(m.topic(), m.partition(), m.offset()): m for m in messages}
        rejected = [
            Rejected(
                by_position[(poison.topic, poison.partition, poison.offset)], f"rejected by the target: {reason}"
            )
        ]
        self.parked.add((poison.topic, poison.key))
        kept = []
        for c in changes:
            if c is poison:
                continue
            if (c.topic, c.key) == (poison.topic, poison.key) and c.offset > poison.offset:
                later = by_position[(c.topic, c.partition, c.offset)]
                rejected.append(Rejected(later, f"parked: behind offset {poison.offset} of this key"))
                continue
            kept.append(c)
        return kept, rejected


def find_poison(
    target: Target, changes: list[Change], plan_one: Callable[[Change], list[TableBatch]]
) -> tuple[int, str] | None:
    """Apply the changes one at a time (in a transaction that is rolled back) to find the first
    one the target rejects, and why; None when each of them alone is accepted."""
    target.begin()
    try:
        for index, change in enumerate(changes):
            for batch in plan_one(change):
                reason = target.probe(batch)
                if reason is not None:
                    return index, reason
    finally:
        target.rollback()
    return None
