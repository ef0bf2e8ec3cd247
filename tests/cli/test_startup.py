"""``mdm --help`` and ``mdm --version`` import no command module; each command still has its whole parser."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from srm_dicom.cli import COMMANDS, build_parser

HEAVY = ("pydicom", "pynetdicom", "cryptography", "Crypto", "cheroot", "wsgidav", "rich", "numpy", "srm_dicom.catalog")

PROBE = """
import sys
from srm_dicom.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("IMPORTED", " ".join(sorted(sys.modules)), file=sys.stderr)
"""


def imported(*argv: str) -> tuple[str, set[str]]:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    line = next(line for line in done.stderr.splitlines() if line.startswith("IMPORTED "))
    return done.stdout, set(line.split()[1:])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_help_and_version_import_no_command_module(argv):
    out, modules = imported(*argv)
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == []
    assert not [m for m in modules if m.startswith("srm_dicom.cli.")]
    if argv == ["--help"]:
        for name, (_, summary) in COMMANDS.items():
            assert name in out and summary.split()[0] in out
    if argv == ["--version"]:
        assert out.startswith("mdm ")


def test_a_command_imports_its_own_module_only():
    out, modules = imported("ls", "--help")
    assert "usage: mdm ls" in out and "srm_dicom.cli.namespace" in modules
    assert not {"srm_dicom.cli.serve", "srm_dicom.cli.demo", "srm_dicom.cli.register"} & modules


@pytest.mark.parametrize("command", ["ls", "del", "stat", "cache", "get", "decrypt", "site"])
def test_commands_that_read_no_dicom_import_no_dicom_library(command):
    """They load the config, the catalog or the key server client only: pydicom, numpy and
    pynetdicom there cost them half a second of start-up (issue 9)."""
    out, modules = imported(command, "--help")
    assert f"usage: mdm {command}" in out
    assert not {m.split(".")[0] for m in modules} & {"pydicom", "pynetdicom", "numpy", "gdcm"}


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_the_lazy_listing_says_what_each_commands_own_parser_says():
    full = _help_of(build_parser())
    assert full == {name: summary for name, (_, summary) in COMMANDS.items()}
    for name in COMMANDS:
        assert _help_of(build_parser(name)) == full  # the same list, whichever command is loaded


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_its_whole_parser(command, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser(command).parse_args([command, "--help"])
    assert done.value.code == 0
    assert f"usage: mdm {command}" in capsys.readouterr().out
