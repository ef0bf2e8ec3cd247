"""VOMS proxies made by Debian's real voms-proxy-fake: the AC's FQANs become groups when the
vomsdir and the CA vouch for its server, and nothing when they do not."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder

from srm_dicom.access import may_manage, may_read, metadata_level
from srm_dicom.catalog import Entry
from srm_dicom.identity import VoMap, identity_from_cert_chain
from srm_dicom.pki import init_pki, init_voms, make_proxy
from srm_dicom.private_files import write_private
from srm_dicom.voms import _ACS, VOMS_AC_OID, VomsTrust
from vomsfake import VOMS_HOST, chain_of, fake_proxy, trust_voms


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voms-pki")
    init_pki(root)
    trust_voms(root)
    return root


def trust(root: Path, roles: dict[str, str] | None = None) -> VomsTrust:
    return VomsTrust.from_config(root / "vomsdir", root / "ca.pem", roles or {})


def fake_chain(root: Path, user: str, out: Path, *args: str, voms: Path | None = None) -> list[bytes]:
    """voms-proxy-fake's proxy for a demo user as a chain; 1024-bit keys: these are only read."""
    return chain_of(fake_proxy(root, user, out, *args, voms=voms, bits=1024))


def entry(mode: int = 0o750, metadata: str = "group") -> Entry:
    return Entry("/grid/demo/mdm/1/2/3", "9b3e0c52-8d1e-4f2b-9a55-3c2d1e0f9a11", "dicom://P@127.0.0.1:104/1/2/3",
                 "slice", "1", "2", "3", "/C=XX/O=srm-dicom/CN=registration service", "demo", mode, metadata)


def test_a_user_of_another_vo_becomes_a_physician_of_the_demo_vo(grid, tmp_path):
    chain = fake_chain(grid, "eve", tmp_path / "eve.pem", "-fqan", "/demo/physician")
    vomap = VoMap.load(grid / "vomap.toml")
    assert identity_from_cert_chain(chain, vomap).vo == "other"  # without VOMS: eve is of another VO
    eve = identity_from_cert_chain(chain, vomap, voms=trust(grid))
    assert (eve.kind, eve.dn, eve.vo, eve.groups) == ("voms", "/C=XX/O=srm-dicom/CN=eve", "demo", {"physician"})
    assert may_read(eve, entry()) and metadata_level(eve, entry()) == "all"


def signature_oids(proxy: Path) -> tuple[str, str]:
    """The signature algorithms of the proxy certificate and of the AC inside it."""
    cert = x509.load_pem_x509_certificates(proxy.read_bytes())[0]
    raw = cert.extensions.get_extension_for_oid(VOMS_AC_OID).value.value  # type: ignore[attr-defined]
    acs, _ = decoder.decode(raw, asn1Spec=_ACS)
    return cert.signature_algorithm_oid.dotted_string, str(acs[0][0]["signatureAlgorithm"]["algorithm"])


def test_the_real_tool_signs_proxy_and_ac_with_sha256_under_the_demo_ca(grid, tmp_path):
    """What makes its proxies usable over TLS as they come out of the tool (README, "VOMS")."""
    proxy = fake_proxy(grid, "eve", tmp_path / "eve.pem", "-fqan", "/demo/physician", bits=1024)
    assert signature_oids(proxy) == ("1.2.840.10045.4.3.2", "1.2.840.113549.1.1.11")  # ecdsa-/sha256WithRSA


def test_under_an_ecdsa_ca_the_tool_falls_back_to_sha1_and_its_ac_is_refused(tmp_path, caplog):
    """voms-proxy-fake finds no digest for an ECDSA CA's signature and signs with SHA-1: an AC
    this site refuses, as OpenSSL 3 refuses such a proxy in TLS."""
    root = tmp_path / "ecdsa-pki"
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ECDSA demo CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
          .sign(key, hashes.SHA256()))
    (root / "ca").mkdir(parents=True)
    (root / "ca.pem").write_bytes(ca.public_bytes(Encoding.PEM))
    write_private(root / "ca" / "key.pem", key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    init_pki(root)  # the users and the VOMS server under that CA
    trust_voms(root)
    proxy = fake_proxy(root, "eve", tmp_path / "eve.pem", "-fqan", "/demo/physician", bits=1024)
    assert signature_oids(proxy) == ("1.2.840.10045.4.1", "1.2.840.113549.1.1.5")  # ecdsa-/sha1WithRSA
    with caplog.at_level(logging.WARNING, logger="srm_dicom.voms"):
        eve = identity_from_cert_chain(chain_of(proxy), VoMap(), voms=trust(root))
    assert eve.kind == "x509" and eve.groups == frozenset()
    assert "signature algorithm 1.2.840.113549.1.1.5 is not accepted" in caplog.text


def test_fqans_and_roles_map_to_groups(grid, tmp_path):
    chain = fake_chain(grid, "dave", tmp_path / "dave.pem", "-fqan", "/demo/Role=doctor/Capability=NULL",
                       "-fqan", "/demo/mia", "-fqan", "/other/physician")
    dave = identity_from_cert_chain(chain, VoMap(), voms=trust(grid, {"doctor": "physician"}))
    assert dave.vo == "demo" and dave.groups == {"physician", "mia"}
    member = identity_from_cert_chain(fake_chain(grid, "dave", tmp_path / "m.pem", "-fqan", "/demo"), VoMap(),
                                      voms=trust(grid))
    assert member.vo == "demo" and member.groups == frozenset() and metadata_level(member, entry()) == "none"


def test_an_ac_of_an_unknown_voms_server_gives_no_groups_and_says_so(grid, tmp_path, caplog):
    rogue = tmp_path / "rogue"
    init_pki(rogue)
    init_voms(rogue, "demo", VOMS_HOST)  # another CA's "VOMS server", not the one the vomsdir names
    chain = fake_chain(grid, "eve", tmp_path / "rogue.pem", "-fqan", "/demo/register", voms=rogue / "voms")
    with caplog.at_level(logging.WARNING, logger="srm_dicom.voms"):
        eve = identity_from_cert_chain(chain, VoMap.load(grid / "vomap.toml"), voms=trust(grid))
    assert (eve.kind, eve.vo, eve.groups) == ("x509", "other", frozenset())
    assert "VOMS AC of /C=XX/O=srm-dicom/CN=eve refused" in caplog.text


def test_an_expired_ac_gives_no_groups_and_says_so(grid, tmp_path, caplog):
    chain = fake_chain(grid, "eve", tmp_path / "old.pem", "-fqan", "/demo/physician", "-vomslife", "1",
                       "-pastac", "3:00")
    with caplog.at_level(logging.WARNING, logger="srm_dicom.voms"):
        eve = identity_from_cert_chain(chain, VoMap(), voms=trust(grid))
    assert eve.kind == "x509" and eve.groups == frozenset()
    assert "expired" in caplog.text


def test_a_limited_proxy_reads_but_never_manages(grid, tmp_path):
    chain = fake_chain(grid, "alice", tmp_path / "limited.pem", "-limited", "-fqan", "/demo/register")
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
