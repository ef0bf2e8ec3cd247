"""VOMS attribute certificates in grid proxies: the groups a user's VO vouches for.

``voms-proxy-init -voms <vo>`` (and Debian's ``voms-proxy-fake``) put an RFC 5755
attribute certificate, signed by the VO's VOMS server, in an extension of the proxy. It
is trusted as gLite does: the VOMS server's certificate travels in the AC, must be the
one named by ``[identity] vomsdir``/<vo>/<host>.lsc (its subject DN, then its issuer's)
and must be issued by a CA of ``[identity] ca``; the AC's signature, validity and holder
(the end-entity certificate under the proxies) must hold. Its FQANs become groups:
``/<vo>`` makes a member, ``/<vo>/register``, ``/<vo>/physician``, ``/<vo>/mia`` the
seeds' groups, and ``[identity] voms_roles`` maps ``Role=...`` to a group. An AC that
does not hold gives no groups, and the log says why (README, "VOMS").

The DER structures are decoded with pyasn1's RFC 5755 and RFC 3820 modules; signatures
and certificates are checked with ``cryptography``. VOMS's own wrapping (a sequence of
sequences of ACs, the server certificate in the ``certseq`` AC extension) is the only
shape written here, as no library describes it.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyasn1.codec.der import decoder, encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc5280, rfc5755

from srm_dicom.identity import slash_dn as _slash

log = logging.getLogger(__name__)

VOMS_AC_OID = x509.ObjectIdentifier("1.3.6.1.4.1.8005.100.100.5")
FQAN_OID = "1.3.6.1.4.1.8005.100.100.4"
CERTSEQ_OID = "1.3.6.1.4.1.8005.100.100.10"
SEEDS_GROUPS = ("register", "physician", "mia")
# AC signature algorithms → their hash. No SHA-1: OpenSSL 3 refuses it in the certificates
# of a TLS chain, and an AC vouches for more than a certificate does. voms-proxy-fake signs
# with the digest of the VOMS server certificate's signature (SHA-256 under the demo's RSA
# CA; it falls back to SHA-1 only under an ECDSA CA: README, "VOMS").
_SIGNATURES: dict[str, hashes.HashAlgorithm] = {
    "1.2.840.113549.1.1.11": hashes.SHA256(),
    "1.2.840.113549.1.1.12": hashes.SHA384(),
    "1.2.840.113549.1.1.13": hashes.SHA512(),
    "1.2.840.10045.4.3.2": hashes.SHA256(),
    "1.2.840.10045.4.3.3": hashes.SHA384(),
}

_ACS = univ.SequenceOf(componentType=univ.SequenceOf(componentType=rfc5755.AttributeCertificate()))
_CERTS = univ.SequenceOf(componentType=univ.SequenceOf(componentType=rfc5280.Certificate()))


class UntrustedAC(Exception):
    """An attribute certificate that does not hold; the message says why (for the log)."""


@dataclass(frozen=True)
class VomsAttributes:
    vo: str
    groups: frozenset[str]
    fqans: tuple[str, ...]


@dataclass(frozen=True)
class VomsTrust:
    """Where ACs are checked against: the vomsdir (``<vo>/<host>.lsc``), the CA bundle, roles."""

    vomsdir: Path
    cas: tuple[x509.Certificate, ...]
    roles: dict[str, str] = field(default_factory=dict)

    def attributes(self, chain: list[x509.Certificate], end_entity: x509.Certificate,
                   now: dt.datetime | None = None) -> VomsAttributes | None:
        """The groups of the first AC in the chain's proxies; None (and a log line) if it does not hold."""
        for cert in chain:
            if cert is end_entity:
                break
            try:
                extension = cert.extensions.get_extension_for_oid(VOMS_AC_OID)
            except x509.ExtensionNotFound:
                continue
            raw = extension.value.value  # type: ignore[attr-defined]
            try:
                return self._verify(raw, end_entity, now or dt.datetime.now(dt.UTC))
            except UntrustedAC as exc:
                log.warning("VOMS AC of %s refused, no VOMS groups: %s", _slash(end_entity.subject), exc)
                return None
        return None

    def _verify(self, raw: bytes, holder: x509.Certificate, now: dt.datetime) -> VomsAttributes:
        try:
            acs, _ = decoder.decode(raw, asn1Spec=_ACS)
            ac = acs[0][0]
        except (PyAsn1Error, IndexError) as exc:
            raise UntrustedAC(f"not an attribute certificate ({exc.__class__.__name__})") from None
        info = ac["acinfo"]
        base = info["holder"]["baseCertificateID"]
        # RFC 5755 names the holder certificate's issuer; VOMS (voms-proxy-fake 2.1 at least)
        # writes the holder's own subject there. Either, with the holder's serial number.
        names = _names(base["issuer"])
        known = (holder.issuer.public_bytes(), holder.subject.public_bytes())
        if int(base["serial"]) != holder.serial_number or len(names) != 1 or names[0] not in known:
            raise UntrustedAC("its holder is not the proxy's end-entity certificate")
        period = info["attrCertValidityPeriod"]
        not_before, not_after = (period[k].asDateTime for k in ("notBeforeTime", "notAfterTime"))
        if not not_before <= now <= not_after:
            raise UntrustedAC(f"expired or not yet valid ({not_before:%Y-%m-%d %H:%M} to {not_after:%Y-%m-%d %H:%M})")
        authority, fqans = _fqans(info)
        vo, _, host_port = authority.partition("://")
        host = host_port.rsplit(":", 1)[0]
        server = self._server(info, vo, host, now)
        self._check_signature(ac, server)
        return VomsAttributes(vo, self._groups(vo, fqans), tuple(fqans))

    def _server(self, info: univ.Sequence, vo: str, host: str, now: dt.datetime) -> x509.Certificate:
        """The VOMS server certificate in the AC, as the vomsdir names it and a trusted CA issued it."""
        lsc = self.vomsdir / vo / f"{host}.lsc"
        if "/" in vo or "/" in host or not lsc.is_file():
            raise UntrustedAC(f"no {lsc} for VO {vo!r} and VOMS server {host!r}")
        expected = [line.strip() for line in lsc.read_text().splitlines() if line.strip() and not line.startswith("#")]
        certs = []
        for extension in info["extensions"]:
            if str(extension["extnID"]) == CERTSEQ_OID:
                try:
                    found, _ = decoder.decode(bytes(extension["extnValue"]), asn1Spec=_CERTS)
                except PyAsn1Error:
                    raise UntrustedAC("its server certificate does not parse") from None
                certs = [x509.load_der_x509_certificate(encoder.encode(c)) for group in found for c in group]
        if not certs:
            raise UntrustedAC("it carries no VOMS server certificate")
        server = certs[0]
        if [_slash(server.subject), _slash(server.issuer)] != expected[:2]:
            raise UntrustedAC(f"its server {_slash(server.subject)} is not the one {lsc.name} names")
        if not server.not_valid_before_utc <= now <= server.not_valid_after_utc:
            raise UntrustedAC("its VOMS server certificate expired")
        for ca in self.cas:
            try:
                server.verify_directly_issued_by(ca)
                return server
            except (ValueError, TypeError, InvalidSignature):
                continue
        raise UntrustedAC(f"its VOMS server certificate is not issued by a trusted CA ({_slash(server.issuer)})")

    @classmethod
    def from_config(cls, vomsdir: Path, ca: Path, roles: dict[str, str]) -> VomsTrust:
        return cls(vomsdir, tuple(x509.load_pem_x509_certificates(ca.read_bytes())), dict(roles))

    @staticmethod
    def _check_signature(ac: univ.Sequence, server: x509.Certificate) -> None:
        algorithm = str(ac["signatureAlgorithm"]["algorithm"])
        digest = _SIGNATURES.get(algorithm)
        if digest is None:
            raise UntrustedAC(f"signature algorithm {algorithm} is not accepted")
        data, signature = encoder.encode(ac["acinfo"]), ac["signatureValue"].asOctets()
        key = server.public_key()
        try:
            if isinstance(key, rsa.RSAPublicKey) and algorithm.startswith("1.2.840.113549"):
                key.verify(signature, data, padding.PKCS1v15(), digest)
            elif isinstance(key, ec.EllipticCurvePublicKey) and algorithm.startswith("1.2.840.10045"):
                key.verify(signature, data, ec.ECDSA(digest))
            else:
                raise UntrustedAC("signature algorithm does not fit the VOMS server's key")
        except InvalidSignature:
            raise UntrustedAC("its signature does not verify with the VOMS server's key") from None

    def _groups(self, vo: str, fqans: list[str]) -> frozenset[str]:
        groups = set()
        for fqan in fqans:
            parts = [p for p in fqan.split("/") if p]
            if not parts or parts[0] != vo:
                continue
            for part in parts[1:]:
                name, _, value = part.partition("=")
                if not value and name in SEEDS_GROUPS:
                    groups.add(name)
                elif name == "Role" and value in self.roles:
                    groups.add(self.roles[value])
        return frozenset(groups)


def _fqans(info: univ.Sequence) -> tuple[str, list[str]]:
    """The policy authority (``vo://host:port``) and the FQANs of the AC's VOMS attribute."""
    for attribute in info["attributes"]:
        if str(attribute["type"]) != FQAN_OID:
            continue
        try:
            syntax, _ = decoder.decode(bytes(attribute["values"][0]), asn1Spec=rfc5755.IetfAttrSyntax())
        except (PyAsn1Error, IndexError):
            raise UntrustedAC("its FQAN attribute does not parse") from None
        authority = ""
        if syntax["policyAuthority"].isValue:
            authority = str(syntax["policyAuthority"][0]["uniformResourceIdentifier"])
        values = [bytes(v["octets"]).decode("utf-8", "replace") for v in syntax["values"] if v.getName() == "octets"]
        return authority, values
    raise UntrustedAC("it carries no FQANs")


def _names(general_names: univ.SequenceOf) -> list[bytes]:
    """The DER of each directory name (compared with ``x509.Name.public_bytes()``: VOMS copies
    the holder's issuer name as the certificate has it)."""
    return [encoder.encode(n["directoryName"]["rdnSequence"]) for n in general_names if n.getName() == "directoryName"]
