"""cdc-verify (not implemented yet)."""

import sys


def main() -> None:
    sys.stderr.write("cdc-verify: not implemented yet\n")
    sys.exit(2)
