"""A demo PKI: one CA, host certificates, the storage element's service certificate, users.

A real site uses its grid CA (IGTF) and VOMS; the demo needs the same shapes on loopback
so that every TLS path (mutual TLS to the key servers, proxies, DNs in the VO map) is the
real one. End-entity keys are EC P-256: fast to make and accepted by OpenSSL and grid tools
alike. The CA's key is RSA, as IGTF grid CAs' are: VOMS's tools (voms-proxy-fake 2.1) sign a
proxy and an attribute certificate with the digest of the issuing CA's signature, but find
that digest only for RSA signatures (sha256WithRSAEncryption); under an ECDSA CA they fall
back to SHA-1, which OpenSSL 3 refuses in a TLS handshake ("ca md too weak"). So no
certificate of the demo is signed with SHA-1 and no TLS setting is lowered (README, "VOMS").
Re-running keeps what exists, so a demo's certificates survive a restart.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from srm_dicom.errors import InvalidInput
from srm_dicom.identity import slash_dn as slash
from srm_dicom.private_files import write_private

DN_BASE = (("C", "XX"), ("O", "srm-dicom"))
SERVICE_NAME = "storage element"
SERVICE_DN = "/C=XX/O=srm-dicom/CN=storage element"
HOSTS = ("storage-element", "keystore-1", "keystore-2", "keystore-3")
DEFAULT_KEYSTORE_URLS = (
    "https://localhost:8441",
    "https://localhost:8442",
    "https://localhost:8443",
)


@dataclass(frozen=True)
class DemoUser:
    name: str
    vo: str
    groups: tuple[str, ...]

    @property
    def dn(self) -> str:
        return f"/C=XX/O=srm-dicom/CN={self.name}"


USERS = (
    DemoUser("alice", "demo", ("register",)),
    DemoUser("bob", "demo", ("physician",)),
    DemoUser("carol", "demo", ("mia",)),
    DemoUser("dave", "demo", ()),
    DemoUser("eve", "other", ()),
)

# RFC 3820 proxyCertInfo: cryptography has no builder for it, so its DER is written out:
# ProxyCertInfo ::= SEQUENCE { proxyPolicy SEQUENCE { policyLanguage id-ppl-inheritAll } }.
PROXY_CERT_INFO_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")
_INHERIT_ALL_POLICY_DER = bytes.fromhex("300c300a06082b06010505071501")
_INDEPENDENT_POLICY_DER = bytes.fromhex("300c300a06082b06010505071502")  # id-ppl-independent

_NAME_OIDS = {"C": NameOID.COUNTRY_NAME, "O": NameOID.ORGANIZATION_NAME, "CN": NameOID.COMMON_NAME}
_DAY = dt.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    parts = [*DN_BASE, ("CN", common_name)]
    return x509.Name([x509.NameAttribute(_NAME_OIDS[k], v) for k, v in parts])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def load_key(path: Path) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise InvalidInput(f"{path}: not an EC or RSA private key")
    return key


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey  # RSA for new PKIs; an older demo's EC key still loads

    def issue(
        self,
        common_name: str,
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
        *,
        server: bool = False,
        days: int = 825,
    ) -> x509.Certificate:
        """An end-entity certificate: client auth always, server auth plus SANs for hosts."""
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _DAY)
            .not_valid_after(_now() + days * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_end_entity_key_usage(), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            # voms-proxy-fake (and OpenSSL's proxy tools) need it for the proxy's AKID.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return builder.sign(self.key, hashes.SHA256())


def _end_entity_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _create_ca() -> CertificateAuthority:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)  # module docstring: why RSA
    name = _name("srm-dicom demo CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _DAY)
        .not_valid_after(_now() + 3650 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(cert, key)


def _ensure_ca(root: Path) -> CertificateAuthority:
    cert_path, key_path = root / "ca.pem", root / "ca" / "key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        return CertificateAuthority(cert, load_key(key_path))
    if cert_path.exists() or key_path.exists():
        raise InvalidInput(f"{root}: ca.pem and ca/key.pem must both exist or both be absent")
    ca = _create_ca()
    _write_key(key_path, ca.key)
    os.chmod(key_path.parent, 0o700)
    _write_cert(cert_path, ca.cert)
    return ca


def _ensure_pair(ca: CertificateAuthority, folder: Path, common_name: str, server: bool) -> bool:
    """Issue ``folder/cert.pem`` + ``key.pem`` unless both exist; True if it made them."""
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.exists() and key_path.exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(key_path, key)
    _write_cert(cert_path, ca.issue(common_name, key, server=server))
    return True


def client_toml(ca_path: str, keystore_urls: tuple[str, ...], storage_url: str = "", vo: str = "demo") -> str:
    """A user's client config; the site secret is never in it (only the storage element has it)."""
    urls = ", ".join(f'"{url}"' for url in keystore_urls)
    return (
        "# Client config made by 'mdm pki init'; paths are relative to this file.\n"
        "[site]\n"
        f'vo = "{vo}"\n'
        "[storage]\n"
        f'url = "{storage_url}"\n'
        "[keystore]\n"
        f"urls = [{urls}]\n"
        "k = 2\n"
        f'ca = "{ca_path}"\n'
        'cert = "cert.pem"\n'
        'key = "key.pem"\n'
        "timeout = 10.0\n"
    )


def vomap_toml(users: tuple[DemoUser, ...] = USERS) -> str:
    lines = ["# VO map: certificate DN -> VO and groups (register, physician, mia).", ""]
    for user in users:
        groups = ", ".join(f'"{g}"' for g in user.groups)
        lines += ["[[user]]", f'dn = "{user.dn}"', f'vo = "{user.vo}"', f"groups = [{groups}]", ""]
    return "\n".join(lines)


def init_pki(root: Path, keystore_urls: tuple[str, ...] = DEFAULT_KEYSTORE_URLS) -> list[str]:
    """Create the demo PKI under ``root``, keeping what exists; returns what it created."""
    root.mkdir(parents=True, exist_ok=True)
    created = [] if (root / "ca.pem").exists() else ["ca.pem"]
    ca = _ensure_ca(root)
    for host in HOSTS:
        if _ensure_pair(ca, root / "hosts" / host, host, server=True):
            created.append(f"hosts/{host}")
    if _ensure_pair(ca, root / "service", SERVICE_NAME, server=False):
        created.append("service")
    for user in USERS:
        folder = root / "users" / user.name
        if _ensure_pair(ca, folder, user.name, server=False):
            created.append(f"users/{user.name}")
        config = folder / "client.toml"
        if not config.exists():
            config.write_text(client_toml("../../ca.pem", keystore_urls))
    vomap = root / "vomap.toml"
    if not vomap.exists():
        vomap.write_text(vomap_toml())
        created.append("vomap.toml")
    return created


def init_voms(root: Path, vo: str, host: str) -> Path:
    """A VOMS server credential for ``vo`` (``root/voms/{cert,key}.pem``, RSA: Debian's
    voms-proxy-fake signs ACs with RSA keys only) and ``root/vomsdir/<vo>/<host>.lsc``
    naming it, as gLite's vomsdir does; kept if they exist. Returns the vomsdir."""
    ca = _ensure_ca(root)
    folder = root / "voms"
    if not (folder / "cert.pem").exists() or not (folder / "key.pem").exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        folder.mkdir(parents=True, exist_ok=True)
        _write_key(folder / "key.pem", key)
        _write_cert(folder / "cert.pem", ca.issue(f"voms {vo}", key, server=True))
    cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
    vomsdir = root / "vomsdir"
    lsc = vomsdir / vo / f"{host}.lsc"
    lsc.parent.mkdir(parents=True, exist_ok=True)
    lsc.write_text(f"{slash(cert.subject)}\n{slash(cert.issuer)}\n")
    return vomsdir


def init_host(root: Path, name: str) -> Path:
    """``root/hosts/<name>/{cert,key}.pem``: a loopback server certificate from the demo CA
    (made by ``init_pki``), for a peer such as XRootD; kept if it exists."""
    _ensure_pair(_ensure_ca(root), root / "hosts" / name, name, server=True)
    return root / "hosts" / name


def hashed_ca_dir(ca: Path, folder: Path) -> Path:
    """The CA as an OpenSSL hashed directory (``<subject hash>.0``), the form gfal2
    (X509_CERT_DIR) and davix (--capath) want. The hash is OpenSSL's own canonical-name
    digest, so it is asked of the openssl command rather than reimplemented."""
    subject_hash = subprocess.run(
        ["openssl", "x509", "-subject_hash", "-noout", "-in", str(ca)], capture_output=True, text=True, check=True
    ).stdout.strip()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{subject_hash}.0").write_bytes(ca.read_bytes())
    return folder


def make_proxy(
    cert_pem: bytes,
    key_pem: bytes,
    *,
    hours: float = 12,
    legacy: bool = False,
    independent: bool = False,
) -> tuple[bytes, bytes]:
    """A proxy signed by a user's certificate: (proxy cert + user cert chain PEM, proxy key PEM).

    RFC 3820 by default (subject = issuer + CN=<serial>, proxyCertInfo inheritAll, as
    voms-proxy-init -rfc makes); ``legacy`` gives a Globus GT2 proxy (CN=proxy, no extension);
    ``independent`` an RFC 3820 independent proxy (it inherits none of its issuer's rights).
    """
    issuer_cert = x509.load_pem_x509_certificate(cert_pem)
    issuer_key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        raise InvalidInput("make_proxy: the user key must be an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    last_cn = "proxy" if legacy else str(serial)
    subject = x509.Name([*issuer_cert.subject, x509.NameAttribute(NameOID.COMMON_NAME, last_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(hours=hours))
        .add_extension(_end_entity_key_usage(), critical=True)
    )
    if not legacy:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(PROXY_CERT_INFO_OID,
                                       _INDEPENDENT_POLICY_DER if independent else _INHERIT_ALL_POLICY_DER),
            critical=True,
        )
    proxy = builder.sign(issuer_key, hashes.SHA256())
    key_out = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return proxy.public_bytes(serialization.Encoding.PEM) + cert_pem, key_out
