"""VOMS proxies made by Debian's real voms-proxy-fake: the AC's FQANs become groups when the
vomsdir and the CA vouch for its server, and nothing when they do not."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import require_program
from srm_dicom.access import may_manage, may_read, metadata_level
from srm_dicom.catalog import Entry
from srm_dicom.identity import VoMap, identity_from_cert_chain
from srm_dicom.pki import hashed_ca_dir, init_pki, init_voms, make_proxy
from srm_dicom.voms import VomsTrust

VOMS_HOST = "voms.demo.test"


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voms-pki")
    init_pki(root)
    init_voms(root, "demo", VOMS_HOST)
    hashed_ca_dir(root / "ca.pem", root / "cadir")
    return root


def trust(root: Path, roles: dict[str, str] | None = None) -> VomsTrust:
    return VomsTrust.from_config(root / "vomsdir", root / "ca.pem", roles or {})


def fake_proxy(root: Path, user: str, out: Path, *args: str, voms: Path | None = None) -> list[bytes]:
    """voms-proxy-fake's proxy for a demo user, its AC signed by ``voms`` (default the demo's).
    1024-bit proxy keys: these proxies are read, never used for TLS, and 2048-bit ones cost
    seconds each to make."""
    program = require_program("voms-proxy-fake")
    server = voms or root / "voms"
    folder = root / "users" / user
    done = subprocess.run(
        [program, "-q", "-rfc", "-bits", "1024", "-certdir", str(root / "cadir"), "-cert", str(folder / "cert.pem"),
         "-key", str(folder / "key.pem"), "-hostcert", str(server / "cert.pem"), "-hostkey", str(server / "key.pem"),
         "-voms", "demo", "-uri", f"{VOMS_HOST}:15000", "-out", str(out), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={"HOME": str(root), "PATH": "/usr/bin"},  # it wants a writable $HOME/.rnd
    )
    assert done.returncode == 0 and out.exists(), done.stdout + done.stderr
    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(out.read_bytes())]


def entry(mode: int = 0o750, metadata: str = "group") -> Entry:
    return Entry("/grid/demo/mdm/1/2/3", "9b3e0c52-8d1e-4f2b-9a55-3c2d1e0f9a11", "dicom://P@127.0.0.1:104/1/2/3",
                 "slice", "1", "2", "3", "/C=XX/O=srm-dicom/CN=registration service", "demo", mode, metadata)


def test_a_user_of_another_vo_becomes_a_physician_of_the_demo_vo(grid, tmp_path):
    chain = fake_proxy(grid, "eve", tmp_path / "eve.pem", "-fqan", "/demo/physician")
    vomap = VoMap.load(grid / "vomap.toml")
    assert identity_from_cert_chain(chain, vomap).vo == "other"  # without VOMS: eve is of another VO
    eve = identity_from_cert_chain(chain, vomap, voms=trust(grid))
    assert (eve.kind, eve.dn, eve.vo, eve.groups) == ("voms", "/C=XX/O=srm-dicom/CN=eve", "demo", {"physician"})
    assert may_read(eve, entry()) and metadata_level(eve, entry()) == "all"


def test_fqans_and_roles_map_to_groups(grid, tmp_path):
    chain = fake_proxy(grid, "dave", tmp_path / "dave.pem", "-fqan", "/demo/Role=doctor/Capability=NULL",
                       "-fqan", "/demo/mia", "-fqan", "/other/physician")
    dave = identity_from_cert_chain(chain, VoMap(), voms=trust(grid, {"doctor": "physician"}))
    assert dave.vo == "demo" and dave.groups == {"physician", "mia"}
    member = identity_from_cert_chain(fake_proxy(grid, "dave", tmp_path / "m.pem", "-fqan", "/demo"), VoMap(),
                                      voms=trust(grid))
    assert member.vo == "demo" and member.groups == frozenset() and metadata_level(member, entry()) == "none"


def test_an_ac_of_an_unknown_voms_server_gives_no_groups_and_says_so(grid, tmp_path, caplog):
    rogue = tmp_path / "rogue"
    init_pki(rogue)
    init_voms(rogue, "demo", VOMS_HOST)  # another CA's "VOMS server", not the one the vomsdir names
    chain = fake_proxy(grid, "eve", tmp_path / "rogue.pem", "-fqan", "/demo/register", voms=rogue / "voms")
    with caplog.at_level(logging.WARNING, logger="srm_dicom.voms"):
        eve = identity_from_cert_chain(chain, VoMap.load(grid / "vomap.toml"), voms=trust(grid))
    assert (eve.kind, eve.vo, eve.groups) == ("x509", "other", frozenset())
    assert "VOMS AC of /C=XX/O=srm-dicom/CN=eve refused" in caplog.text


def test_an_expired_ac_gives_no_groups_and_says_so(grid, tmp_path, caplog):
    chain = fake_proxy(grid, "eve", tmp_path / "old.pem", "-fqan", "/demo/physician", "-vomslife", "1",
                       "-pastac", "3:00")
    with caplog.at_level(logging.WARNING, logger="srm_dicom.voms"):
        eve = identity_from_cert_chain(chain, VoMap(), voms=trust(grid))
    assert eve.kind == "x509" and eve.groups == frozenset()
    assert "expired" in caplog.text


def test_a_limited_proxy_reads_but_never_manages(grid, tmp_path):
    chain = fake_proxy(grid, "alice", tmp_path / "limited.pem", "-limited", "-fqan", "/demo/register")
    alice = identity_from_cert_chain(chain, VoMap(), voms=trust(grid))
    assert alice.limited and alice.groups == {"register"}
    assert may_read(alice, entry(0o700, "private")) and not may_manage(alice, entry())


def test_an_independent_proxy_does_not_inherit_its_issuers_rights(grid):
    """voms-proxy-fake aborts on -pl id-ppl-independent (VOMS_MakeProxy assertion), so the
    RFC 3820 independent proxy comes from mdm's own proxy maker."""
    folder = grid / "users" / "alice"
    proxy, _ = make_proxy((folder / "cert.pem").read_bytes(), (folder / "key.pem").read_bytes(), independent=True)
    chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(proxy)]
    alice = identity_from_cert_chain(chain, VoMap.load(grid / "vomap.toml"), voms=trust(grid))
    assert alice.dn is not None and alice.dn.startswith("/C=XX/O=srm-dicom/CN=alice/CN=")
    assert alice.vo is None and alice.groups == frozenset()
    assert not may_read(alice, entry()) and not may_manage(alice, entry())
    inheriting, _ = make_proxy((folder / "cert.pem").read_bytes(), (folder / "key.pem").read_bytes())
    chain = [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(inheriting)]
    assert identity_from_cert_chain(chain, VoMap.load(grid / "vomap.toml")).groups == {"register"}
