"""Which topics a sink consumes: --tables and --exclude-tables as a Kafka subscription. Pure.

A subscription lists topics and regular expressions (those starting with `^`), which librdkafka
matches against the broker's topics again at each metadata refresh, so a topic created later that
a pattern reaches is consumed too. librdkafka compiles them as POSIX extended expressions: no
lookahead, so --exclude-tables is built into the expression itself (exclusions_regex).
"""

import re
from collections.abc import Iterable
from typing import Any

from pg_kafka_cdc.common.errors import ConfigError
from pg_kafka_cdc.common.tables import NamePattern, TablePattern, TableSelection
from schemas.topics import change_topic_pattern, encode_identifier, topic_for

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
