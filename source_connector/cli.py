"""cdc-source (not implemented yet)."""

import sys


def main() -> None:
    sys.stderr.write("cdc-source: not implemented yet\n")
    sys.exit(2)
