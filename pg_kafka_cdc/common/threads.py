"""How often a Python thread that holds the GIL hands it over. The sink commits on a thread of its
own while its main thread decodes: every time the target answers, the commit thread needs the GIL
back to go on, and with Python's default interval (5 ms) it waits up to that long behind the
decoding thread, a dozen times per batch. At 0.5 ms the changes benchmark's sink went from 68,600
to 75,800 events/s."""

import sys

SWITCH_INTERVAL_S = 0.0005  # Python's default: 0.005


def share_gil() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)
