"""cdc-sink (not implemented yet)."""

import sys


def main() -> None:
    sys.stderr.write("cdc-sink: not implemented yet\n")
    sys.exit(2)
