"""The demo PKI: certificates that verify against ca.pem, private keys kept private, idempotent."""

from __future__ import annotations

import ssl
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

from cryptography import x509

from srm_dicom.identity import VoMap, identity_from_cert_chain
from srm_dicom.pki import HOSTS, SERVICE_DN, USERS, init_pki, make_proxy

# The installed console script, next to the interpreter running the tests.
MDM = str(Path(sys.executable).with_name("mdm"))


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_makes_certificates_that_verify_against_the_ca(tmp_path):
    init_pki(tmp_path)
    ca = _cert(tmp_path / "ca.pem")
    folders = [tmp_path / "hosts" / h for h in HOSTS] + [tmp_path / "service"]
    folders += [tmp_path / "users" / u.name for u in USERS]
    for folder in folders:
        cert = _cert(folder / "cert.pem")
        cert.verify_directly_issued_by(ca)
        assert stat.S_IMODE((folder / "key.pem").stat().st_mode) == 0o600
        # Each key really belongs to its certificate: Python's ssl refuses a mismatch.
        ssl.create_default_context().load_cert_chain(folder / "cert.pem", folder / "key.pem")
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    host = _cert(tmp_path / "hosts" / "keystore-1" / "cert.pem")
    san = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_vomap_and_client_configs(tmp_path):
    init_pki(tmp_path, ("https://ks1:1", "https://ks2:2", "https://ks3:3"))
    vomap = VoMap.load(tmp_path / "vomap.toml")
    expected = {
        "alice": ("demo", {"register"}),
        "bob": ("demo", {"physician"}),
        "carol": ("demo", {"mia"}),
        "dave": ("demo", set()),
        "eve": ("other", set()),
    }
    for name, (vo, groups) in expected.items():
        identity = identity_from_cert_chain([(tmp_path / "users" / name / "cert.pem").read_bytes()], vomap)
        assert (identity.subject, identity.vo, identity.groups) == (
            f"/C=XX/O=srm-dicom/CN={name}",
            vo,
            groups,
        )
    service = _cert(tmp_path / "service" / "cert.pem")
    assert service.subject.rfc4514_string() == "CN=storage element,O=srm-dicom,C=XX"
    assert identity_from_cert_chain([service], vomap, [SERVICE_DN]).kind == "service"
    client = tomllib.loads((tmp_path / "users" / "bob" / "client.toml").read_text())
    assert client == {
        "site": {"vo": "demo"},
        "storage": {"url": ""},
        "keystore": {
            "urls": ["https://ks1:1", "https://ks2:2", "https://ks3:3"],
            "k": 2,
            "ca": "../../ca.pem",
            "cert": "cert.pem",
            "key": "key.pem",
            "timeout": 10.0,
        }
    }
    assert (tmp_path / "users" / "bob" / "client.toml").parent.joinpath(client["keystore"]["ca"]).resolve() == (
        tmp_path / "ca.pem"
    ).resolve()


def test_init_is_idempotent_and_completes_what_is_missing(tmp_path):
    created = init_pki(tmp_path)
    assert "ca.pem" in created and "users/eve" in created
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert init_pki(tmp_path) == []
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    (tmp_path / "users" / "dave" / "cert.pem").unlink()
    assert init_pki(tmp_path) == ["users/dave"]
    _cert(tmp_path / "users" / "dave" / "cert.pem").verify_directly_issued_by(_cert(tmp_path / "ca.pem"))
    assert (tmp_path / "ca.pem").read_bytes() == before[tmp_path / "ca.pem"]


def test_rfc3820_proxy_verifies_with_openssl(tmp_path):
    init_pki(tmp_path)
    user = tmp_path / "users" / "bob"
    chain, key = make_proxy((user / "cert.pem").read_bytes(), (user / "key.pem").read_bytes())
    proxy_file = tmp_path / "proxy.pem"
    proxy_file.write_bytes(chain)
    certs = x509.load_pem_x509_certificates(chain)
    assert certs[0].issuer == certs[1].subject
    assert certs[0].extensions.get_extension_for_oid(x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14"))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-allow_proxy_certs",
            "-CAfile",
            str(tmp_path / "ca.pem"),
            "-untrusted",
            str(user / "cert.pem"),
            str(proxy_file),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert key.startswith(b"-----BEGIN PRIVATE KEY-----")


def test_cli_init_and_proxy(tmp_path):
    run = [MDM, "pki"]
    first = subprocess.run([*run, "init", str(tmp_path)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "created ca.pem" in first.stdout
    out = tmp_path / "bob-proxy.pem"
    proxy = subprocess.run(
        [*run, "proxy", str(tmp_path / "users" / "bob"), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert proxy.returncode == 0, proxy.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().count(b"BEGIN CERTIFICATE") == 2
    missing = subprocess.run(
        [*run, "proxy", str(tmp_path / "users" / "zoe"), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "not found" in missing.stderr
