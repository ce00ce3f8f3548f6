"""cdc-sink: consume change topics in batches and apply them to the target, exactly once in effect.

Each batch is one target transaction that also moves the stored offsets of its partitions, after
checking they are still the ones this process started the batch from (a process that lost its
partitions while frozen cannot write behind its successor's back). Offsets are committed to Kafka
afterwards, for the tools that show a group's lag. A batch goes through batch.py, which decodes it
(changes.py), prepares the tables first seen (preparation.py), plans it (plan.py) and commits it
(commit.py).
"""

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.kafka import admin_client, wait_for_kafka
from pg_kafka_cdc.common.service import serving
from pg_kafka_cdc.common.settings import Settings
from pg_kafka_cdc.common.signals import StopFlag
from pg_kafka_cdc.common.tables import NamePattern, TableName, TablePattern, TableSelection
from schemas.topics import change_topic_pattern, encode_identifier, topic_for
from sink_connector.batch import BatchProcessor
from sink_connector.bookkeeping import Bookkeeping, TopicPartition
from sink_connector.commit import BatchCommit
from sink_connector.consumer import EndOffsets, KafkaLog, batch_count, end_offsets
from sink_connector.dlq import DeadLetters
from sink_connector.metrics import SinkStats, collect
from sink_connector.plan import TopicTables
from sink_connector.poison import ErrorPolicy
from sink_connector.preparation import TablePreparer, TableState
from sink_connector.rebuild import check_not_rebuilding
from sink_connector.session import TargetSession

log = logging.getLogger("sink")


@dataclass(frozen=True)
class SinkOptions:
    group: str = "cdc-sink"
    snapshot: str = "copy"  # copy | topic | never
    on_error: str = "fail"  # fail | dlq
    slot: str = "cdc_slot"
    state_schema: str = "cdc_sink"
    batch_size: int = 10000
    batch_bytes: int = 12 << 20
    batch_wait: float = 0.02
    once: bool = False
    kafka_timeout: float = 60.0
    rebuild: tuple[TableName, ...] = ()
    metrics_port: int = 0
    instance_id: str | None = None  # static group membership (group.instance.id)


class Sink:
    def __init__(self, settings: Settings, options: SinkOptions, stop: StopFlag) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.stats = SinkStats()
        book = Bookkeeping(options.state_schema, options.group)
        tables: dict[TableName, TableState] = {}
        self.target = TargetSession(settings.target_dsn, book, tables)
        self.preparer = TablePreparer(
            settings, book, options.snapshot, options.rebuild, options.slot, stop, self.target, tables
        )
        self.topic_tables = TopicTables(settings.topic_prefix)
        self.kafka = KafkaLog(settings, options.group, options.instance_id, self._claim, self.stats)
        self.dead_letters: DeadLetters | None = None
        # Messages asked for at once (see batch_count); the first batch is small, until the size of
        # the messages is known.
        self.batch_count = min(options.batch_size, 500)
        self.next_lag_check = 0.0

    def run(self) -> None:
        with serving(self.options.metrics_port, lambda: collect(self), self.health):
            self._run()

    def health(self) -> tuple[bool, str]:
        now = time.monotonic()
        down = self.stats.target_down_since
        if down is not None and now - down > 30:
            return False, f"target database unreachable for {now - down:.0f} s"
        if self.kafka.down_since is not None and now - self.kafka.down_since > 30:
            return False, f"Kafka unreachable for {now - self.kafka.down_since:.0f} s"
        return True, f"ok: {self.stats.batches} batches applied"

    # --- start-up -----------------------------------------------------------------------------

    def _run(self) -> None:
        self.target.connect()
        self.target.install()
        admin = admin_client(self.settings)
        wait_for_kafka(self.settings, self.options.kafka_timeout, self.stop)
        policy = ErrorPolicy(self.options.on_error, self.target.parked(), self.target.explain)
        if policy.dead_letters:
            self.dead_letters = DeadLetters(self.settings, admin)
        topics = self._topics_in_scope(admin)
        self._copy_before_consuming(topics)
        once = None
        if self.options.once:
            ends = end_offsets(self.settings, self.options.group, topics)
            once = EndOffsets(ends, self.kafka.expected, self.target.all_offsets)
        self._subscribe()
        commit = BatchCommit(self.target, self.kafka, self.kafka.consumer, self.dead_letters, self.kafka.expected)
        processor = BatchProcessor(
            self.target, self.preparer, commit, policy, self.topic_tables, self.stats, self._reconnect
        )
        try:
            self.loop(processor, once)
        finally:
            self.kafka.close()
            if self.dead_letters is not None:
                self.dead_letters.flush()
            self.target.close()

    def _topics_in_scope(self, admin: Any) -> list[str]:
        """Change topics that exist now and belong to the configured tables (all, by default)."""
        existing = admin.list_topics(timeout=10).topics
        return in_subscription(subscription_for(self.settings.topic_prefix, self.settings.selection), existing)

    def _copy_before_consuming(self, topics: list[str]) -> None:
        """Bulk copies before consuming, so that a long copy cannot stall the group: the tables named
        in --tables (whether or not the source created their topics yet), and those with a topic."""
        named = list(self.settings.selection.names)
        wanted = named + [t for t in map(self.topic_tables.table_of, topics) if t not in named]
        if self.options.snapshot == "copy":
            for table in wanted:
                if table not in self.options.rebuild:
                    self.preparer.prepare(table, None)

    def _claim(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
        """At an assignment: never apply a table `cdc-sink rebuild` is replaying (but our own)."""
        check_not_rebuilding(
            self.target.conn, self.settings.topic_prefix, {t for t, _ in partitions}, self.options.rebuild
        )
        return self.target.claim(partitions)

    def _subscribe(self) -> None:
        subscription = subscription_for(self.settings.topic_prefix, self.settings.selection)
        self.kafka.subscribe(subscription)
        log.info(
            "consuming %s as group %s",
            ", ".join(subscription),
            self.options.group,
            extra={"group": self.options.group},
        )

    # --- the loop -----------------------------------------------------------------------------

    def loop(self, processor: BatchProcessor, once: EndOffsets | None) -> None:
        """Consume and apply batches until stopped (or caught up, with --once)."""
        while not self.stop:
            if once is not None and once.reached():
                log.info("caught up with the end offsets seen at start-up; exiting (--once)")
                return
            messages = self.kafka.consume(self.batch_count, self.options.batch_wait)
            self._watch()
            if not messages:
                continue
            self.batch_count = batch_count(messages, self.options.batch_size, self.options.batch_bytes)
            batch = self.kafka.usable(messages)
            if batch and not processor.run(batch, self.stop):
                return

    def _watch(self) -> None:
        """Every few seconds: consumer lag per partition, and whether Kafka is back."""
        now = time.monotonic()
        if now >= self.next_lag_check:
            self.next_lag_check = now + 2.0
            self.stats.lag = self.kafka.lag()

    def _reconnect(self, exc: BaseException, delay: float) -> None:
        self.stats.errors["target_connection"] += 1
        if self.stats.target_down_since is None:
            self.stats.target_down_since = time.monotonic()
        self.target.reconnect(exc, delay, self.stop.wait)


# --- which topics: --tables and --exclude-tables as a Kafka subscription ---------------------------
#
# A subscription lists topics and regular expressions (those starting with `^`), which librdkafka
# matches against the broker's topics again at each metadata refresh, so a topic created later that
# a pattern reaches is consumed too. librdkafka compiles them as POSIX extended expressions: no
# lookahead, so --exclude-tables is built into the expression itself (exclusions_regex).

_PLAIN_UNITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_"
_HEX = "0123456789ABCDEF"
# One character of an identifier in a topic name (see schemas/topics.py): itself, or `-` and two hex digits.
_ANY_UNIT = "([A-Za-z0-9_]|-[0-9A-F][0-9A-F])"
_DOT, _STAR, _OTHER_PLAIN, _OTHER_ESCAPE = ".", "*", "plain", "escape"
MAX_SUBSCRIPTION_REGEX = 60_000


def subscription_for(prefix: str, selection: TableSelection) -> list[str]:
    """The topics of the tables --tables names, then one regular expression for its patterns (or
    the default) less --exclude-tables (a table named exactly cannot be excluded: see parse_selection)."""
    topics = [topic_for(prefix, t) for t in selection.names]
    patterns = selection.patterns
    if not patterns:
        return topics
    if not selection.exclude:
        if selection.default:
            return [change_topic_pattern(prefix)]
        body = "|".join(_glob_regex(_units_of(p)) for p in patterns)
    else:
        body = exclusions_regex([_units_of(p) for p in patterns], [_units_of(p) for p in selection.exclude])
    if len(body) > MAX_SUBSCRIPTION_REGEX:
        raise ConfigError(
            f"--tables / --exclude-tables make a subscription expression of {len(body)} characters: "
            "use fewer patterns or exclusions"
        )
    alone = not selection.exclude and len(patterns) == 1
    return [*topics, "^" + re.escape(prefix) + r"\." + (body if alone else _group(body)) + "$"]


def in_subscription(subscription: list[str], topics: Iterable[str]) -> list[str]:
    """The topics `subscription` takes, sorted."""
    regexes = [re.compile(s) for s in subscription if s.startswith("^")]
    named = {s for s in subscription if not s.startswith("^")}
    return sorted(t for t in topics if t in named or any(r.search(t) for r in regexes))


def _units_of(pattern: TablePattern) -> tuple[str, ...]:
    """The pattern as topic-name units (schemas/topics.py's encoding, one unit per plain character or
    `-XX` byte), the separating dot and wildcards."""
    return (*_part_units(pattern.schema), _DOT, *_part_units(pattern.name))


def _part_units(part: NamePattern) -> list[str]:
    units: list[str] = []
    for i, piece in enumerate(part.pieces):
        if i:
            units.append(_STAR)
        encoded = encode_identifier(piece)
        j = 0
        while j < len(encoded):
            step = 3 if encoded[j] == "-" else 1
            units.append(encoded[j : j + step])
            j += step
    return units


def _glob_regex(units: tuple[str, ...]) -> str:
    return "".join(_ANY_UNIT + "*" if u == _STAR else _unit_regex(u) for u in units)


def _unit_regex(unit: str) -> str:
    return r"\." if unit == _DOT else unit


Glob = tuple[str, ...]
State = frozenset[tuple[int, int]]  # (glob, position); globs after the includes are exclusions


def exclusions_regex(includes: list[Glob], excludes: list[Glob]) -> str:
    """A regular expression (no lookahead) for the topic names after `<prefix>.` that an include
    glob matches and no exclude glob does: the globs' automaton, made deterministic, then turned
    into an expression by eliminating its states."""
    globs = [*includes, *excludes]
    literals = sorted({u for g in globs for u in g if u != _STAR})
    symbols = [*literals, _OTHER_PLAIN, _OTHER_ESCAPE]

    def closure(state: set[tuple[int, int]]) -> State:
        todo, seen = list(state), set(state)
        while todo:
            g, i = todo.pop()
            if i < len(globs[g]) and globs[g][i] == _STAR and (g, i + 1) not in seen:
                seen.add((g, i + 1))
                todo.append((g, i + 1))
        return frozenset(seen)

    def step(state: State, symbol: str) -> State:
        moved = set()
        for g, i in state:
            if i < len(globs[g]):
                token = globs[g][i]
                if token == symbol:
                    moved.add((g, i + 1))
                elif token == _STAR and symbol != _DOT:
                    moved.add((g, i))
        return closure(moved)

    def accepting(state: State) -> bool:
        ends = {g for g, i in state if i == len(globs[g])}
        return any(g < len(includes) for g in ends) and not any(g >= len(includes) for g in ends)

    start = closure({(g, 0) for g in range(len(globs))})
    edges: dict[State, dict[State, str]] = {}
    todo = [start]
    while todo:
        state = todo.pop()
        if state in edges:
            continue
        by_target: dict[State, list[str]] = {}
        for symbol in symbols:
            target = step(state, symbol)
            if any(g < len(includes) for g, _ in target):
                by_target.setdefault(target, []).append(symbol)
        edges[state] = {}
        for target, among in by_target.items():
            label = _label(among, literals)
            if label is not None:
                edges[state][target] = label
                todo.append(target)
    regex = _eliminate(start, edges, {s for s in edges if accepting(s)})
    if regex is None:
        raise ConfigError("--exclude-tables / EXCLUDE_TABLES leaves out every table --tables / TABLES selects")
    return regex


def _label(symbols: list[str], literals: list[str]) -> str | None:
    """One expression for any unit of `symbols` (OTHER_PLAIN: every plain character not among
    `literals`, OTHER_ESCAPE: every `-XX` not among them)."""
    plain = {u for u in symbols if len(u) == 1 and u != _DOT}
    if _OTHER_PLAIN in symbols:
        plain |= {c for c in _PLAIN_UNITS if c not in literals}
    escapes = {u for u in symbols if len(u) == 3}
    if _OTHER_ESCAPE in symbols:
        escapes |= {f"-{h}{lo}" for h in _HEX for lo in _HEX if f"-{h}{lo}" not in literals}
    options = []
    if _DOT in symbols:
        options.append(r"\.")
    if plain:
        options.append(_char_class(plain))
    if escapes:
        options.append(_escape_regex(escapes))
    if not options:
        return None
    return options[0] if len(options) == 1 else "(" + "|".join(options) + ")"


def _char_class(chars: set[str]) -> str:
    """A bracket expression for `chars`, runs of consecutive characters as ranges."""
    if len(chars) == 1:
        return next(iter(chars))
    runs: list[list[str]] = []
    for c in sorted(chars):
        if runs and ord(c) == ord(runs[-1][-1]) + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return "[" + "".join("".join(r) if len(r) < 4 else f"{r[0]}-{r[-1]}" for r in runs) + "]"


def _escape_regex(escapes: set[str]) -> str:
    if len(escapes) == 1:
        return next(iter(escapes))
    highs: dict[str, str] = {}
    for h in _HEX:
        lows = "".join(lo for lo in _HEX if f"-{h}{lo}" in escapes)
        if lows:
            highs[h] = lows
    if len(highs) == 16 and all(v == _HEX for v in highs.values()):
        return "-[0-9A-F][0-9A-F]"
    parts = [
        h + (lows if len(lows) == 1 else "[0-9A-F]" if lows == _HEX else f"[{lows}]") for h, lows in highs.items()
    ]
    return "-" + (parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")")


def _eliminate(start: State, edges: dict[State, dict[State, str]], final: set[State]) -> str | None:
    """State elimination: the expression for the paths from `start` to a state of `final` (None:
    there is none)."""
    begin, end = "begin", "end"
    graph: dict[Any, dict[Any, str]] = {begin: {start: ""}}
    for state, targets in edges.items():
        graph[state] = dict(targets)
        if state in final:
            graph[state][end] = ""
    remaining = set(edges)
    while remaining:
        state = min(remaining, key=lambda q: (len(graph[q]) * sum(q in graph[s] for s in graph), sorted(q)))
        remaining.discard(state)
        loop = graph[state].pop(state, None)
        around = f"{_group(loop)}*" if loop else ""
        sources = [s for s in graph if state in graph[s]]
        for source in sources:
            into = graph[source].pop(state)
            for target, out in graph[state].items():
                path = into + around + out
                old = graph[source].get(target)
                graph[source][target] = path if old is None else _alternatives([old, path])
        del graph[state]
    return graph[begin].get(end)


def _alternatives(labels: list[str]) -> str:
    unique = list(dict.fromkeys(labels))
    if len(unique) == 1:
        return unique[0]
    optional = "" in unique
    rest = [u for u in unique if u]
    body = rest[0] if len(rest) == 1 else "(" + "|".join(rest) + ")"
    return f"{_group(body)}?" if optional else body


def _group(regex: str) -> str:
    """`regex` as one atom, for `*` or `?` to follow."""
    if len(regex) == 1 or (regex.startswith("[") and regex.endswith("]") and regex.count("[") == 1):
        return regex
    if regex.startswith("(") and _closes_at_end(regex):
        return regex
    return f"({regex})"


def _closes_at_end(regex: str) -> bool:
    depth = 0
    for i, ch in enumerate(regex):
        if ch == "\\":
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0 and i != len(regex) - 1:
                return False
    return depth == 0
