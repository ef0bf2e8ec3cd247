"""Proxies made by Debian's real ``voms-proxy-fake`` for the demo PKI's users (tests/test_voms.py,
the HTTPS authorization matrix, the interop tests).

``voms-proxy-fake`` signs the AC with the given VOMS server credential and the proxy with the
user's key, each with the digest of the issuing CA's signature: SHA-256 under the demo's RSA
CA (``srm_dicom.pki``), so its proxies work in a TLS handshake as they come out of the tool.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from conftest import require_program
from srm_dicom.pki import hashed_ca_dir, init_voms

VO, VOMS_HOST = "demo", "voms.demo.test"


def trust_voms(root: Path) -> Path:
    """The demo VO's VOMS server credential and vomsdir in the PKI ``root`` (kept if made), and
    the CA as a hashed directory (voms-proxy-fake's -certdir); returns the vomsdir."""
    vomsdir = init_voms(root, VO, VOMS_HOST)
    if not (root / "cadir").is_dir():
        hashed_ca_dir(root / "ca.pem", root / "cadir")
    return vomsdir


def fake_proxy(root: Path, user: str, out: Path, *args: str, voms: Path | None = None, bits: int = 2048) -> Path:
    """``voms-proxy-fake -rfc -voms demo`` for the demo user, its AC signed by ``voms`` (default
    the demo's VOMS server); ``args`` add -fqan, -limited, -vomslife... The proxy file (proxy
    certificate, its key, the user's certificate) is what curl takes as --cert and --key.
    Proxies only read (never used in TLS) may take 1024 bits: 2048-bit ones cost up to a second."""
    program = require_program("voms-proxy-fake")
    server = voms or root / "voms"
    folder = root / "users" / user
    done = subprocess.run(
        [program, "-q", "-rfc", "-bits", str(bits), "-certdir", str(root / "cadir"),
         "-cert", str(folder / "cert.pem"), "-key", str(folder / "key.pem"),
         "-hostcert", str(server / "cert.pem"), "-hostkey", str(server / "key.pem"),
         "-voms", VO, "-uri", f"{VOMS_HOST}:15000", "-out", str(out), *args],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={"HOME": str(out.parent), "PATH": "/usr/bin"},  # it wants a writable $HOME/.rnd
    )
    assert done.returncode == 0 and out.exists(), done.stdout + done.stderr
    return out


def chain_of(proxy: Path) -> list[bytes]:
    """The proxy file's certificates, DER, leaf first (what TLS hands the server)."""
    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(proxy.read_bytes())]
