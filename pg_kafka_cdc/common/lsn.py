"""WAL positions (pg_lsn): PostgreSQL's text form `16/B374D848` and the 64-bit integer it stands for."""


def lsn_to_int(text: str) -> int:
    """`16/B374D848` -> 97500059720."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def int_to_lsn(value: int) -> str:
    """97500059720 -> `16/B374D848`."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
