"""The output-plugin allow-list decisions: which servers have the setting, which values let wal2json
load, and the line that fixes a value that does not."""

import shutil
import subprocess
from pathlib import Path

import pytest

from source_connector.plugin_allowlist import allows, config_line, line_for_server, parse_list

ARCHIVE = "archive_command\tsighup\tWrite-Ahead Log / Archiving\tSTRING\t\t\t\tSets the shell command.\t"
# `postgres --describe-config` of 15.20 (with the setting) and of 15.18 (without), one row each.
NEWER = (
    f"{ARCHIVE}\n"
    "output_plugin_libraries\tsuperuser\tReplication / Sending Servers\tSTRING\tpgoutput, test_decoding\t\t\t"
    "Lists libraries that may be named as logical decoding output plugins.\tUsers with REPLICATION ...\n"
    "wal_level\tpostmaster\tWrite-Ahead Log / Settings\tENUM\treplica\t\t\tSets the level.\t\n"
)
OLDER = f"{ARCHIVE}\nwal_level\tpostmaster\tWrite-Ahead Log / Settings\tENUM\treplica\t\t\tSets the level.\t\n"


def test_a_server_with_the_setting_gets_wal2json_added_to_its_default() -> None:
    assert line_for_server(NEWER) == "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'"


def test_a_server_without_the_setting_gets_no_line() -> None:
    # An unknown setting in postgresql.conf stops the server from starting.
    assert line_for_server(OLDER) is None
    assert line_for_server("") is None


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        (None, True),  # no allow-list: every installed plugin loads
        ("pgoutput, test_decoding", False),
        ("", False),
        ("pgoutput, test_decoding, wal2json", True),
        ("wal2json", True),
        ("  WAL2JSON ,pgoutput", True),  # unquoted names are folded to lower case
        ('"WAL2JSON"', False),  # a quoted name is kept as written
        ('"wal2json"', True),
        ("$libdir/wal2json", False),  # the server compares names, not paths
        ("wal2json.so", False),
    ],
)
def test_which_values_let_wal2json_load(value: str | None, allowed: bool) -> None:
    assert allows(value) is allowed


def test_the_fix_keeps_what_the_list_has() -> None:
    assert (
        config_line("pgoutput, test_decoding") == "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'"
    )
    assert config_line("pgoutput, decoderbufs") == "output_plugin_libraries = 'pgoutput, decoderbufs, wal2json'"
    assert config_line(None) == "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'"
    assert config_line("") == "output_plugin_libraries = 'wal2json'"
    assert parse_list('a, "B",, c ') == ["a", "B", "c"]


@pytest.mark.parametrize(("described", "printed"), [(NEWER, True), (OLDER, False)])
def test_the_module_runs_as_a_script_without_the_virtualenv(described: str, printed: bool) -> None:
    # stack/stack.sh pipes `postgres --describe-config` into it with the system's python3.
    result = subprocess.run(
        [shutil.which("python3", path="/usr/bin:/bin") or "python3", "-m", "source_connector.plugin_allowlist"],
        cwd=Path(__file__).parents[2],
        input=described,
        capture_output=True,
        text=True,
        check=True,
    )
    expected = "output_plugin_libraries = 'pgoutput, test_decoding, wal2json'\n" if printed else ""
    assert result.stdout == expected
