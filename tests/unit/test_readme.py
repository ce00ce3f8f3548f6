"""README.md documents every command, flag and environment variable (generated, kept in sync)."""

import re
from pathlib import Path

from scripts.reference import END, START, commands, render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_command_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    section = re.search(re.escape(START) + r"\n(.*)\n" + re.escape(END), text, re.S)
    assert section is not None, "README.md has no command reference markers"
    assert section.group(1) == render(), "README.md's command reference is stale: run `make docs`"


def test_every_flag_and_variable_is_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    for name, command in commands():
        assert f"`{name}`" in text
        for param in command.params:
            for flag in getattr(param, "opts", []):
                assert f"`{flag}`" in text, f"{name} {flag} is not documented"
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str):
                assert f"`{envvar}`" in text, f"{name} {envvar} is not documented"


def test_every_metric_is_in_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    sources = "".join(
        p.read_text(encoding="utf-8")
        for p in (
            README.parent / "source_connector" / "metrics.py",
            README.parent / "sink_connector" / "metrics.py",
        )
    )
    for metric in set(re.findall(r'"(cdc_(?:source|sink)_[a-z_]+)"', sources)):
        assert metric in text, f"metric {metric} is not documented"
