"""`mdm doctor` on a real site (embedded PACS, three key servers): all ok, then each part
broken, with one line and one fix per failure and a meaningful exit code."""

from __future__ import annotations

import json
import os
import re

import peers
from sites import mdm, write_site_config

CHECKS = ["config", "file modes", "certificate (server)", "certificate (service identity)",
          "CA certificates ([identity] ca)", "CA certificates ([keystore] ca)", "PACS echo", "key servers",
          "database", "cache space"]


def findings(output: str) -> dict[str, tuple[str, str]]:
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(ok|FAIL)\s+(.+?): (.*)$", line)
        if match:
            found[match.group(2)] = (match.group(1), match.group(3))
    return found


def test_a_healthy_site_passes_every_check(embedded_pacs, key_servers, tmp_path):
    config = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    config.chmod(0o600)
    done = mdm("doctor", config=config)
    assert done.returncode == 0, done.stdout + done.stderr
    found = findings(done.stdout)
    assert list(found) == CHECKS
    assert all(state == "ok" for state, _ in found.values()), done.stdout
    assert "3 of 3 answering, 2 needed" in found["key servers"][1]
    assert "answered a C-ECHO" in found["PACS echo"][1]
    assert "sqlite catalog answers, 0 entries" in found["database"][1]


def test_every_failure_gets_its_own_line_and_fix(key_servers, tmp_path):
    pacs = peers.start_embedded(tmp_path / "pacs", "MDM_TEST", peers.free_port())
    pacs.stop()  # nobody answers on its port now
    config = write_site_config(tmp_path / "site", pacs, key_servers, quota_bytes=1 << 60)
    dead = f"https://127.0.0.1:{peers.free_port()}"
    text = config.read_text().replace(json.dumps(key_servers.urls), json.dumps([*key_servers.urls[:2], dead]))
    config.write_text(text)
    config.chmod(0o644)  # it holds the site secret
    done = mdm("doctor", config=config)
    assert done.returncode == 1, done.stdout + done.stderr
    found = findings(done.stdout)
    failed = {check for check, (state, _) in found.items() if state == "FAIL"}
    assert failed == {"file modes", "PACS echo", "key servers", "cache space"}, done.stdout
    assert f"fix: chmod 600 {config}" in done.stdout
    assert "2 of 3 answering, 2 needed" in found["key servers"][1] and dead in found["key servers"][1]
    assert "lower [cache] quota_bytes" in found["cache space"][1]
    assert all("; fix: " in line for line in done.stdout.splitlines() if line.startswith("FAIL"))
    assert done.stdout.rstrip().endswith("4 checks failed")


def test_a_bad_config_exits_2_with_its_fix(tmp_path):
    config = tmp_path / "mdm.toml"
    config.write_text("[site]\nvo = 'demo'\ntypo = 1\n")
    done = mdm("doctor", config=config)
    assert done.returncode == 2
    assert done.stdout.startswith("FAIL  config: config: unknown key 'typo' in [site]; fix:")
    missing = mdm("doctor", config=tmp_path / "absent.toml")
    assert missing.returncode == 2 and "not found" in missing.stdout


def test_an_expired_or_mismatched_certificate_is_named(embedded_pacs, key_servers, tmp_path):
    config = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    pki = key_servers.pki
    text = config.read_text().replace(str(pki / "hosts" / "storage-element" / "key.pem"),
                                      str(pki / "users" / "bob" / "key.pem"))
    config.write_text(text)
    os.chmod(config, 0o600)
    done = mdm("doctor", config=config)
    assert done.returncode == 1
    state, detail = findings(done.stdout)["certificate (server)"]
    assert state == "FAIL" and "is not the key of" in detail and "fix: install the matching pair" in detail
