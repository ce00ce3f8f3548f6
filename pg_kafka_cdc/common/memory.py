"""The cyclic garbage collector set for programs that build and drop many small acyclic objects
(decoded messages and events): what start-up allocated is frozen out of its scans, and the young
generation is large enough that a batch of messages is not scanned hundreds of times over while
it is decoded. Nothing here is cyclic garbage that waits longer for it: reference counting frees
the messages."""

import gc

YOUNG_GENERATION = 50_000  # container objects allocated between two scans (Python's default: 700)


def tune_collector() -> None:
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION, middle, old)
