"""conf/systemd: the service units pass `systemd-analyze verify` without a warning and carry
the hardening a sysadmin relies on (README, Deployment)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import require_program

UNITS = Path(__file__).resolve().parents[2] / "conf" / "systemd"
INSTALLED_MDM = "/opt/srm-dicom/bin/mdm"
NAMES = ("mdm-serve.service", "mdm-listen.service", "mdm-keystore@.service")


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units with ExecStart pointed at this checkout's mdm (verify checks it is executable)."""
    mdm = shutil.which("mdm")
    assert mdm, "the mdm command is not installed"
    for name in NAMES:
        text = (UNITS / name).read_text()
        assert text.count(INSTALLED_MDM) == 1, f"{name}: ExecStart must run {INSTALLED_MDM}"
        (tmp_path / name).write_text(text.replace(INSTALLED_MDM, mdm))
    return tmp_path


def test_the_units_pass_systemd_analyze_verify_without_a_warning(units: Path):
    analyze = require_program("systemd-analyze")
    targets = [str(units / "mdm-serve.service"), str(units / "mdm-listen.service"),
               str(units / "mdm-keystore@1.service")]
    done = subprocess.run([analyze, "verify", *targets], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""  # unknown keys and unsafe settings are only warnings


def test_systemd_analyze_verify_catches_a_broken_unit(units: Path):
    """The check above can fail: a typo'd directive and a missing program are reported."""
    analyze = require_program("systemd-analyze")
    broken = units / "mdm-serve.service"
    broken.write_text(broken.read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes")
                      .replace(shutil.which("mdm") or "", "/nonexistent/mdm"))
    done = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "NoNewPrivilege" in done.stderr and "/nonexistent/mdm" in done.stderr


@pytest.mark.parametrize("name", NAMES)
def test_each_unit_runs_as_a_dedicated_user_in_a_read_only_system(name: str):
    found = directives(UNITS / name)
    assert found["User"][0] in ("mdm", "mdm-keys") and found["User"] == found["Group"]
    assert found["ProtectSystem"] == ["strict"] and found["NoNewPrivileges"] == ["yes"]
    assert found["ProtectHome"] == ["yes"] and found["CapabilityBoundingSet"] == [""]
    assert int(found["LimitNOFILE"][0]) >= 16384
    writable = found["ReadWritePaths"][0].split()
    assert writable and all(p.startswith("/var/lib/srm-dicom") or p.startswith("/var/cache/srm-dicom")
                            for p in writable)
    if name == "mdm-serve.service":  # the database and the cache
        assert writable == ["/var/lib/srm-dicom", "/var/cache/srm-dicom"]


def test_the_key_servers_run_as_another_user_than_the_storage_element():
    serve, keys = directives(UNITS / "mdm-serve.service"), directives(UNITS / "mdm-keystore@.service")
    assert serve["User"] != keys["User"]
    assert "%i" in keys["ExecStart"][0] and "%i" in keys["ReadWritePaths"][0]
    sysusers = (UNITS / "srm-dicom.sysusers").read_text().split("\n")
    assert {line.split()[1] for line in sysusers if line.startswith("u ")} == {serve["User"][0], keys["User"][0]}
