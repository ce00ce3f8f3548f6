"""Expected failures. Each carries one line for the operator: what is wrong and how to fix it."""


class CdcError(Exception):
    """A failure the operator can fix; printed as one line, without a stack trace."""


class ConfigError(CdcError):
    """A setting is malformed or names something that does not exist."""


class ConnectError(CdcError):
    """A service cannot be reached or refuses the credentials."""


class SourceError(CdcError):
    """The source database cannot be replicated as configured (wal_level, plugin, slot, key...)."""


class SinkError(CdcError):
    """The sink cannot apply what it consumed (bad message, incompatible target table...)."""
