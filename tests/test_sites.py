"""The sites of a client config: ``mdm site add|rm|ls`` on a user's real client.toml, the
choice of sites a query goes to, and the bound on a query when sites fail or stay silent."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest

from srm_dicom import sites
from srm_dicom.cli import main
from srm_dicom.config import load_config
from srm_dicom.errors import ConfigError, InvalidInput


@pytest.fixture
def client_toml(pki: Path, tmp_path: Path) -> Path:
    """Bob's client.toml as `mdm pki init` wrote it, in a copy of the PKI's layout (its paths are relative)."""
    folder = tmp_path / "users" / "bob"
    folder.mkdir(parents=True)
    for name in ("cert.pem", "key.pem", "client.toml"):
        shutil.copy(pki / "users" / "bob" / name, folder / name)
    shutil.copy(pki / "ca.pem", tmp_path / "ca.pem")
    path = folder / "client.toml"
    # As `mdm demo` leaves it: the storage element's URL filled in.
    path.write_text(path.read_text().replace('url = ""', 'url = "https://localhost:2880"', 1))
    return path


def mdm(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


def test_site_add_ls_rm_round_trip_leaves_the_rest_of_the_file_byte_identical(client_toml, capsys):
    original = client_toml.read_bytes()
    south_ca = shutil.copy(client_toml.parents[2] / "ca.pem", client_toml.parents[2] / "south-ca.pem")
    assert mdm(client_toml, "site", "add", "north", "https://se.north.example:2880") == 0
    assert mdm(client_toml, "site", "add", "south", "https://se.south.example:2881", "--ca", str(south_ca)) == 0
    edited = client_toml.read_bytes()
    assert edited.startswith(original)
    config = load_config(client_toml)
    assert config.sites["north"].url == "https://se.north.example:2880"
    assert config.path(config.sites["south"].ca) == Path(south_ca).resolve()
    assert config.keystore.cert == "cert.pem" and config.site.vo == "demo"

    capsys.readouterr()
    assert mdm(client_toml, "site", "ls") == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    # The default site ([storage] url) is listed first; a CA is shown when it is not the [keystore] one.
    assert listed == [["default", config.storage.url], ["north", "https://se.north.example:2880"],
                      ["south", "https://se.south.example:2881", f"ca={Path(south_ca).resolve()}"]]

    assert mdm(client_toml, "site", "rm", "north") == 0
    assert "north" not in load_config(client_toml).sites
    assert mdm(client_toml, "site", "rm", "south") == 0
    assert client_toml.read_bytes() == original


def test_site_add_is_idempotent_and_a_new_url_needs_force(client_toml, capsys):
    assert mdm(client_toml, "site", "add", "north", "https://a.example:2880") == 0
    once = client_toml.read_bytes()
    assert mdm(client_toml, "site", "add", "north", "https://a.example:2880") == 0
    assert client_toml.read_bytes() == once

    capsys.readouterr()
    assert mdm(client_toml, "site", "add", "north", "https://b.example:2880") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "north" in err and "--force" in err
    assert client_toml.read_bytes() == once

    assert mdm(client_toml, "site", "add", "west", "https://w.example:1") == 0
    assert mdm(client_toml, "site", "add", "--force", "north", "https://b.example:2880") == 0
    # Replaced in place: north stays before west.
    assert list(load_config(client_toml).sites.items()) == [
        ("north", load_config(client_toml).sites["north"]), ("west", load_config(client_toml).sites["west"])]
    assert load_config(client_toml).sites["north"].url == "https://b.example:2880"


def test_site_edits_keep_comments_and_tables_after_the_sites(client_toml):
    east = '[sites.east]\nurl = "https://e.example:1"  # east\n\n'
    text = client_toml.read_text() + f'\n# our sites\n{east}[identity]\nca = "ca.pem"\n'
    client_toml.write_text(text)
    assert mdm(client_toml, "site", "add", "north", "https://n.example:1") == 0
    assert mdm(client_toml, "site", "rm", "north") == 0
    assert client_toml.read_text() == text
    assert mdm(client_toml, "site", "rm", "east") == 0
    assert client_toml.read_text() == text.replace(east, "")
    assert load_config(client_toml).identity.ca == "ca.pem"


@pytest.mark.parametrize("args, code, words", [
    (("rm", "nowhere"), 3, ["nowhere"]),
    (("add", "all", "https://x.example"), 2, ["all"]),
    (("add", "default", "https://x.example"), 2, ["default"]),
    (("add", "two words", "https://x.example"), 2, ["two words"]),
    (("add", "north", "http://x.example"), 2, ["https"]),
    (("add", "north", "https://x.example", "--ca", "/nonexistent/ca.pem"), 2, ["/nonexistent/ca.pem"]),
])
def test_bad_site_edits_are_one_line_and_change_nothing(client_toml, capsys, args, code, words):
    original = client_toml.read_bytes()
    capsys.readouterr()
    assert mdm(client_toml, "site", *args) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and all(word in err for word in words)
    assert client_toml.read_bytes() == original


def test_choice_of_sites(client_toml):
    default_url = load_config(client_toml).storage.url
    mdm(client_toml, "site", "add", "north", default_url)
    mdm(client_toml, "site", "add", "south", "https://s.example:1")
    config = load_config(client_toml)
    assert [s.name for s in sites.choose(config, None)] == ["default"]
    # The default site is also named north: asked once, under its name.
    assert [s.name for s in sites.choose(config, "all")] == ["north", "south"]
    assert [s.url for s in sites.choose(config, "south")] == ["https://s.example:1"]
    with pytest.raises(InvalidInput, match="unknown site 'west'.*north, south"):
        sites.choose(config, "west")


def test_a_config_with_a_bad_site_is_refused(client_toml):
    client_toml.write_text(client_toml.read_text() + '[sites.north]\nurl = "http://n.example"\n')
    with pytest.raises(ConfigError, match=r"\[sites.north\] url must be https"):
        load_config(client_toml)
    client_toml.write_text(client_toml.read_text().replace('url = "http://n.example"', 'uri = "https://n"'))
    with pytest.raises(ConfigError, match=r"unknown key 'uri' in \[sites.north\]"):
        load_config(client_toml)


def test_a_silent_site_and_a_refusing_one_are_reported_within_the_bound(client_toml):
    """No storage element here: one port accepts and never speaks TLS, one refuses connections."""
    with socket.socket() as silent, socket.socket() as closed:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        mdm(client_toml, "site", "add", "silent", f"https://127.0.0.1:{silent.getsockname()[1]}")
        mdm(client_toml, "site", "add", "closed", f"https://127.0.0.1:{closed.getsockname()[1]}")
        config = load_config(client_toml)
        started = time.monotonic()
        answer = sites.query(config, sites.choose(config, "silent") + sites.choose(config, "closed"),
                             {"q": ""}, timeout=1.0)
        elapsed = time.monotonic() - started
    assert answer.rows == []
    assert [failure.site for failure in answer.failures] == ["silent", "closed"]
    assert answer.failures[0].reason == f"no answer from {sites.choose(config, 'silent')[0].url} within 1 s"
    assert "refused" in answer.failures[1].reason.lower()
    assert elapsed < 1.5
