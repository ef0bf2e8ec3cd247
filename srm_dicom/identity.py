"""Who is calling: the Identity of every kind, and the callers of X.509 client certificates.

Grid users authenticate with proxies, so the principal is the end-entity certificate
found by walking the chain past every proxy; its DN is written in the OpenSSL "slash"
form grid tools use (``/C=XX/O=site/CN=name``, RDNs in the certificate's order), built from
the parsed certificate rather than from a server's comma string, whose order and escaping
differ between servers. Groups of certificate users come from the VO map (or a VOMS
attribute certificate in the proxy); bearer tokens are read in ``srm_dicom.tokens``.

The chain handed to ``identity_from_cert_chain`` must already be verified by TLS
(``client_auth_ssl_adapter`` below does that, RFC 3820 proxies allowed).
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cheroot.ssl.builtin import BuiltinSSLAdapter
from cryptography import x509
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1_modules import rfc3820

from srm_dicom.config import read_toml
from srm_dicom.errors import ConfigError, MdmError

if TYPE_CHECKING:
    from srm_dicom.voms import VomsTrust

GROUPS = ("register", "physician", "mia")
# The hospital's group whose members add images and manage every entry: granted by a
# certificate (VO map or VOMS), never by a token or a macaroon.
REGISTER = "register"
KINDS = ("x509", "voms", "token", "macaroon", "service")
CERTIFICATE_KINDS = ("x509", "voms", "service")
PROXY_CERT_INFO_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")
INDEPENDENT_POLICY = str(rfc3820.id_ppl_independent)
LIMITED_POLICY = "1.3.6.1.4.1.3536.1.1.1.9"  # Globus' limited-proxy policy language (voms-proxy-fake -limited)
# WSGI environ key under which the TLS adapter puts the verified client chain (DER, leaf first).
ENVIRON_PEER_CHAIN = "srm_dicom.peer_chain"

# OpenSSL's short names where they differ from RFC 4514's (which prints emailAddress as an OID).
_SLASH_NAMES = {NameOID.EMAIL_ADDRESS: "emailAddress", NameOID.USER_ID: "UID"}


class AuthenticationError(MdmError):
    """The caller's certificate or token is missing, invalid, expired or not trusted."""

    exit_code = 5
    http_status = 401


@dataclass(frozen=True)
class Identity:
    """An authenticated caller, of one kind (``KINDS``), never compared with another kind.

    ``subject`` is the DN for the certificate kinds (x509: groups from the VO map; voms:
    groups from a verified attribute certificate; service: the storage element itself),
    the token's ``sub`` for tokens (``issuer`` says whose), and a description for a
    macaroon, which acts as ``on_behalf`` (its issuer at issue time, a certificate
    identity without the register group) within its ``paths`` and ``activities``.
    Decisions use ``dn`` and ``principal``, which keep the kinds apart; ``subject`` is for
    messages.
    """

    subject: str
    kind: str
    vo: str | None = None
    groups: frozenset[str] = frozenset()
    scopes: tuple[tuple[str, str], ...] = ()
    issuer: str | None = None
    limited: bool = False  # a limited proxy: it may read, never manage
    on_behalf: Identity | None = None
    paths: tuple[str, ...] = ()
    activities: frozenset[str] = frozenset()

    @property
    def dn(self) -> str | None:
        """The certificate DN; None for tokens and macaroons, whose subjects are no DNs."""
        return self.subject if self.kind in CERTIFICATE_KINDS else None

    @property
    def principal(self) -> str:
        """Who owns what this caller creates (stage requests): the DN for certificates (a DN
        starts with ``/``), ``token:<iss>#<sub>`` for tokens, the issuer's for a macaroon."""
        if self.kind == "token":
            return f"token:{self.issuer}#{self.subject}"
        if self.kind == "macaroon":
            assert self.on_behalf is not None
            return self.on_behalf.principal
        return self.subject

    @property
    def fqans(self) -> frozenset[str]:
        """VOMS-style group names: ``/vo`` for every VO member, ``/vo/group`` per group."""
        if self.vo is None:
            return frozenset()
        return frozenset({f"/{self.vo}"} | {f"/{self.vo}/{g}" for g in self.groups})

    def may_scope(self, action: str, path: str) -> bool:
        """Whether the token's scopes allow ``action`` on ``path``.

        Other kinds carry no scopes: for them the ACLs alone decide, so this is True.
        A scope path covers itself and what is below it, component-wise: ``/a/b`` allows
        ``/a/b/c`` but not ``/a/bc``.
        """
        if self.kind != "token":
            return True
        wanted = normalize_path(path)
        return any(act == action and covers(base, wanted) for act, base in self.scopes)


def covers(base: str, path: str) -> bool:
    """Whether ``path`` is ``base`` or below it, component-wise (both normalized)."""
    return base == "/" or path == base or path.startswith(base + "/")


def normalize_path(path: str) -> str:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AuthenticationError(f"path {path!r} must not contain '..'")
    return "/" + "/".join(parts)


def slash_dn(name: x509.Name) -> str:
    """``/C=XX/O=site/CN=name``: OpenSSL's one-line form, multi-valued RDNs joined with ``+``."""
    return "".join(
        "/" + "+".join(f"{_SLASH_NAMES.get(a.oid, a.rfc4514_attribute_name)}={a.value!s}" for a in rdn)
        for rdn in name.rdns
    )


def load_chain(chain: Iterable[bytes | str | x509.Certificate]) -> list[x509.Certificate]:
    """Certificates from DER or PEM (a PEM item may hold several), leaf first."""
    certs: list[x509.Certificate] = []
    for item in chain:
        if isinstance(item, x509.Certificate):
            certs.append(item)
            continue
        data = item.encode() if isinstance(item, str) else item
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                certs.extend(x509.load_pem_x509_certificates(data))
            else:
                certs.append(x509.load_der_x509_certificate(data))
        except ValueError:
            raise AuthenticationError("client certificate chain is not valid X.509") from None
    return certs


def is_proxy(cert: x509.Certificate) -> bool:
    """RFC 3820 (proxyCertInfo) or legacy Globus proxy (issuer DN + CN=proxy|limited proxy|digits)."""
    try:
        cert.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
        return True
    except x509.ExtensionNotFound:
        pass
    rdns = cert.subject.rdns
    if len(rdns) < 2 or x509.Name(rdns[:-1]) != cert.issuer:
        return False
    last = list(rdns[-1])
    if len(last) != 1 or last[0].oid != NameOID.COMMON_NAME:
        return False
    value = str(last[0].value)
    return value in ("proxy", "limited proxy") or value.isdigit()


def end_entity(chain: list[x509.Certificate]) -> x509.Certificate:
    """The first certificate of the chain (leaf first) that is not a proxy."""
    for cert in chain:
        if not is_proxy(cert):
            return cert
    raise AuthenticationError("client certificate chain has only proxies, no end-entity certificate")


@dataclass(frozen=True)
class VoMapEntry:
    vo: str
    groups: frozenset[str]


@dataclass(frozen=True)
class VoMap:
    """Certificate DN → VO and groups, from a TOML file of ``[[user]] dn, vo, groups`` tables."""

    users: Mapping[str, VoMapEntry] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> VoMap:
        return cls.from_dict(read_toml(path, "VO map"), str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "VO map") -> VoMap:
        unknown = set(data) - {"user"}
        if unknown:
            raise ConfigError(f"{origin}: unknown key '{sorted(unknown)[0]}' (expected [[user]])")
        users: dict[str, VoMapEntry] = {}
        for number, entry in enumerate(data.get("user", []), 1):
            dn, vo, groups = entry.get("dn"), entry.get("vo"), entry.get("groups", [])
            if not isinstance(dn, str) or not dn.startswith("/"):
                raise ConfigError(f'{origin}: user #{number} needs dn = "/C=../CN=.."')
            if not isinstance(vo, str) or not vo or "/" in vo:
                raise ConfigError(f"{origin}: user {dn} needs a vo name")
            bad = [g for g in groups if g not in GROUPS]
            if bad:
                raise ConfigError(f"{origin}: user {dn}: unknown group {bad[0]!r}")
            users[dn] = VoMapEntry(vo, frozenset(groups))
        return cls(users)

    def identity(self, dn: str, services: Iterable[str] = ()) -> Identity:
        entry = self.users.get(dn)
        kind = "service" if dn in set(services) else "x509"
        if entry is None:
            return Identity(subject=dn, kind=kind)
        return Identity(subject=dn, kind=kind, vo=entry.vo, groups=entry.groups)


def proxy_policy(cert: x509.Certificate) -> str | None:
    """The RFC 3820 policy language OID of a proxy (inheritAll, independent, limited...), or None."""
    try:
        extension = cert.extensions.get_extension_for_oid(PROXY_CERT_INFO_OID)
    except x509.ExtensionNotFound:
        return None
    raw = extension.value.value  # type: ignore[attr-defined]
    try:
        info, _ = der_decoder.decode(raw, asn1Spec=rfc3820.ProxyCertInfoExtension())
    except PyAsn1Error:
        return None
    return str(info["proxyPolicy"]["policyLanguage"])


def _limited(cert: x509.Certificate) -> bool:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return proxy_policy(cert) == LIMITED_POLICY or (bool(names) and names[-1].value == "limited proxy")


def identity_from_cert_chain(chain_der_or_pem: list[Any], vomap: VoMap, services: Iterable[str] = (),
                             voms: VomsTrust | None = None) -> Identity:
    """The caller of a TLS connection whose (already verified) chain is given leaf first.

    ``services`` lists the DNs of service identities (the storage element): kind "service".
    A proxy's VOMS attribute certificate, when ``voms`` trusts it, gives the VO and groups
    (kind "voms") instead of the VO map. A limited proxy (anywhere in the chain) may read,
    never manage. An RFC 3820 independent proxy inherits nothing of its issuer: it is its own
    subject, in no VO and no group.
    """
    chain = load_chain(chain_der_or_pem)
    if not chain:
        raise AuthenticationError("no client certificate")
    user = end_entity(chain)
    proxies = chain[: chain.index(user)]
    independent = next((p for p in proxies if proxy_policy(p) == INDEPENDENT_POLICY), None)
    if independent is not None:
        return Identity(subject=slash_dn(independent.subject), kind="x509")
    limited = any(_limited(p) for p in proxies)
    dn = slash_dn(user.subject)
    attributes = voms.attributes(chain, user) if voms is not None and dn not in set(services) else None
    if attributes is not None:
        return Identity(subject=dn, kind="voms", vo=attributes.vo, groups=attributes.groups, limited=limited)
    return replace(vomap.identity(dn, services), limited=limited)


class _WithoutSession:
    """A TLS socket as cheroot's ``get_environ`` sees it, without ``session``.

    cheroot reads ``sock.session.id`` once per connection for ``SSL_SESSION_ID`` (and skips it
    on AttributeError). On CPython before 3.12.7 and 3.13.1 each read of ``SSLSocket.session``
    leaks a copy of the TLS session, the client's certificate chain in it: about 6.5 KB per
    connection, outside the Python heap, never given back (CPython gh-116810; cheroot issue
    647). That was the RSS growth of ``mdm serve`` under load (README, "Hostile input, faults
    and fuzzing"). Nothing in srm-dicom uses the session id.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - whatever the socket's attribute is
        if name == "session":
            raise AttributeError(name)
        return getattr(self._sock, name)


# OpenSSL's SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF) is this SSL_CTX_ctrl call (ssl.h).
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_SESS_CACHE_OFF = 0
# SSL_VERIFY_NONE, SSL_VERIFY_PEER, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
_SSL_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}


def _without_session_cache(context: ssl.SSLContext) -> None:
    """Turn off the server's TLS 1.2 session-ID cache, which Python's ssl does not expose.

    Hand-written because neither the standard library nor cheroot offers it: the ``SSL_CTX``
    pointer is the first field after the object header of CPython's ``_ssl._SSLContext``
    (Modules/_ssl.c, 3.11 to 3.13), and libssl is reached through the ``_ssl`` module that
    links it. The pointer is checked first against the verify mode Python set on it.
    """
    libssl = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # noqa: SLF001
    libssl.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    libssl.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    libssl.SSL_CTX_ctrl.restype = ctypes.c_long
    libssl.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if libssl.SSL_CTX_get_verify_mode(pointer) != _SSL_VERIFY_MODES[context.verify_mode]:
        raise RuntimeError("cannot reach OpenSSL's SSL_CTX of this Python: TLS session resumption left on")
    libssl.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)


class ClientAuthSSLAdapter(BuiltinSSLAdapter):
    """cheroot's builtin TLS adapter, asking for client certificates and passing on the chain.

    Python's ssl refuses RFC 3820 proxies unless ``VERIFY_ALLOW_PROXY_CERTS`` is set; with
    it, OpenSSL verifies the proxy chain itself, including the proxy naming rules. Legacy
    (GT2) proxies are unknown to OpenSSL and fail the handshake: they are obsolete on the
    grid and the standard library offers no verify callback to accept them.
    cheroot puts only the leaf in the WSGI environ; the DN must come from the end-entity
    certificate further down the chain, so the verified chain is added under
    ``ENVIRON_PEER_CHAIN`` (DER, leaf first).

    TLS session resumption is turned off: a resumed session skips verification, so OpenSSL
    has no verified chain for it (and keeps none of the chain in a TLS 1.3 ticket or a TLS
    1.2 session either: ``get_unverified_chain`` is empty too), and clients resuming (curl
    with several URLs, davix, gfal2) got 401 from their second connection on. Rebuilding the
    path by hand from what a session keeps (the leaf alone) is neither possible nor safe, so
    every connection makes a full handshake: no TLS 1.3 tickets (``num_tickets = 0``), no
    TLS 1.2 tickets (``OP_NO_TICKET``), no TLS 1.2 session-ID cache. The cost is one full
    handshake per connection; HTTP keep-alive still serves many requests on one.
    """

    def __init__(self, certificate: str, private_key: str, ca: str, *, required: bool = True):
        super().__init__(certificate, private_key, ca)
        self.context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
        self.context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.num_tickets = 0
        self.context.options |= ssl.OP_NO_TICKET
        _without_session_cache(self.context)

    def get_environ(self, sock: ssl.SSLSocket) -> dict[str, Any]:  # type: ignore[override]  # cheroot's stub says socket
        environ = super().get_environ(_WithoutSession(sock))
        # SSLSocket.get_verified_chain is public from Python 3.13; 3.11 has it on _sslobj.
        getter = getattr(sock, "get_verified_chain", None) or sock._sslobj.get_verified_chain  # type: ignore[attr-defined]  # noqa: SLF001
        chain = getter() or []
        environ[ENVIRON_PEER_CHAIN] = [
            cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]  # noqa: SLF001
            for cert in chain
        ]
        return environ
