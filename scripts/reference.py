"""The command reference: every command, flag and environment variable, as markdown, from the click
definitions themselves (README.md carries it between `<!-- reference:start -->` and
`<!-- reference:end -->`; `make docs` refreshes it)."""

import re
import sys
from pathlib import Path
from typing import Any

import click

from pg_kafka_cdc.status.cli import main as status
from pg_kafka_cdc.verify.cli import main as verify
from sink_connector.cli import main as sink
from source_connector.cli import main as source
from writer.cli import main as writer

START, END = "<!-- reference:start -->", "<!-- reference:end -->"


def commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = [("cdc-writer", writer)]
    for name, group in (("cdc-source", source), ("cdc-sink", sink)):
        assert isinstance(group, click.Group)
        for sub_name, sub in group.commands.items():
            found.append((name if sub_name == "run" else f"{name} {sub_name}", sub))
    found += [("cdc-verify", verify), ("cdc-status", status)]
    return found


SHARED = {
    "source_dsn",
    "target_dsn",
    "bootstrap_servers",
    "topic_prefix",
    "tables",
    "exclude_tables",
    "kafka_config",
    "log_format",
    "log_level",
}


def _default(option: click.Option) -> str:
    if option.is_flag:
        return ""
    shown = option.show_default
    if isinstance(shown, str):
        return f"`{shown}`"
    if option.default is None or option.multiple or not isinstance(option.default, str | int | float):
        return ""
    value: Any = option.default
    return f"`{value}`"


def _row(option: click.Option) -> str:
    flags = ", ".join(f"`{o}`" for o in option.opts)
    env = f"`{option.envvar}`" if isinstance(option.envvar, str) else ""
    help_text = " ".join((option.help or "").split()).replace("|", "\\|")
    if isinstance(option.type, click.Choice):
        help_text += f" One of: {', '.join(option.type.choices)}."
    return f"| {flags} | {env} | {_default(option)} | {help_text} |"


def render() -> str:
    lines = [
        "### Settings shared by every program",
        "",
        "| flag | environment | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    writer = commands()[0][1]
    for param in writer.params:
        if isinstance(param, click.Option) and param.name in SHARED:
            lines.append(_row(param))
    for name, command in commands():
        own = [
            p for p in command.params if isinstance(p, click.Option) and p.name not in SHARED and p.name != "help"
        ]
        summary = (command.help or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += ["", f"### `{name}`", "", summary, ""]
        if own:
            lines += ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
            lines += [_row(p) for p in own]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    return pattern.sub(lambda _: f"{START}\n{section}\n{END}", text)


def main() -> None:
    section = render()
    if "--write" in sys.argv:
        readme = Path("README.md")
        readme.write_text(replace_section(readme.read_text(encoding="utf-8"), section), encoding="utf-8")
    else:
        sys.stdout.write(section + "\n")


if __name__ == "__main__":
    main()
