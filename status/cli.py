"""cdc-status (not implemented yet)."""

import sys


def main() -> None:
    sys.stderr.write("cdc-status: not implemented yet\n")
    sys.exit(2)
