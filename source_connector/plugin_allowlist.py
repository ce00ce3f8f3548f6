"""PostgreSQL's output-plugin allow-list (`output_plugin_libraries`, in the minor releases of August
2026: 14.24, 15.19, 16.15, 17.11, 18.6): whether a server has it, whether it lets wal2json load, and
the exact line that fixes it. Pure functions of the server's own text, no I/O and no third-party
import: `stack/stack.sh` runs this module with the system's python3 before any virtualenv exists.

    postgres --describe-config | python3 -m source_connector.plugin_allowlist

prints the `postgresql.conf` line that allows wal2json on that server, or nothing on a server that
does not know the setting (where the line would stop it from starting).
"""

import sys

SETTING = "output_plugin_libraries"
PLUGIN = "wal2json"
BUILT_IN_DEFAULT = "pgoutput, test_decoding"
# What the server says when the list refuses a plugin (SQLSTATE 42501, insufficient privilege).
REFUSAL = "may not be used as an output plugin"


def parse_list(value: str) -> list[str]:
    """The names in a list setting, as the server reads them: comma-separated, blanks trimmed,
    unquoted names folded to lower case, double-quoted names kept as written."""
    names: list[str] = []
    for part in value.split(","):
        name = part.strip()
        if len(name) >= 2 and name[0] == name[-1] == '"':
            names.append(name[1:-1].replace('""', '"'))
        elif name:
            names.append(name.lower())
    return names


def allows(value: str | None, plugin: str = PLUGIN) -> bool:
    """Does the setting's value (None: a server without the setting) let `plugin` load?"""
    return value is None or plugin in parse_list(value)


def with_plugin(value: str | None, plugin: str = PLUGIN) -> str:
    """The list `value` (the server's default when unknown) with `plugin` added, as it is written."""
    names = parse_list(BUILT_IN_DEFAULT if value is None else value)
    return ", ".join([*names, plugin] if plugin not in names else names)


def config_line(value: str | None, plugin: str = PLUGIN) -> str:
    """The `postgresql.conf` line that keeps what the list has and allows `plugin`."""
    return f"{SETTING} = '{with_plugin(value, plugin)}'"


def refused(value: str | None) -> str:
    """One line for a server whose allow-list refuses wal2json: what is wrong and the exact fix.
    `value` is the list as the server has it (None when the role may not read it)."""
    has = f" ({SETTING} = '{value}')" if value is not None else ""
    return (
        f"the source server refuses {PLUGIN} as a logical decoding output plugin: it is not in "
        f"{SETTING}{has}, the allow-list of PostgreSQL 14.24, 15.19, 16.15, 17.11, 18.6 and later. "
        f"Fix: add the line {config_line(value)} to postgresql.conf, then run SELECT pg_reload_conf() "
        f"as a superuser (a reload is enough); on a managed service, set {SETTING} in its parameter group"
    )


def is_refusal(sqlstate: str | None, message: str) -> bool:
    """Is this server error the allow-list refusing a plugin (not a role without REPLICATION)?"""
    return sqlstate == "42501" and REFUSAL in message


def described_default(described: str) -> str | None:
    """The setting's default from `postgres --describe-config` output (tab-separated: name, context,
    group, type, default, ...); None when the server does not have the setting."""
    for line in described.splitlines():
        fields = line.split("\t")
        if fields[0] == SETTING:
            return fields[4] if len(fields) > 4 else ""
    return None


def line_for_server(described: str, plugin: str = PLUGIN) -> str | None:
    """The line to add to a new cluster's configuration so `plugin` loads; None for a server that
    does not know the setting (an older minor release, which loads any installed plugin)."""
    default = described_default(described)
    return None if default is None else config_line(default, plugin)


def main() -> None:
    line = line_for_server(sys.stdin.read())
    if line is not None:
        sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
