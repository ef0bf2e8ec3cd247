"""Who is calling: an X.509 client certificate chain (proxies included) or a WLCG bearer token.

Grid users authenticate with proxies, so the principal is the end-entity certificate
found by walking the chain past every proxy; its DN is written in the OpenSSL "slash"
form grid tools use (``/C=XX/O=site/CN=name``, RDNs in the certificate's order), built from
the parsed certificate rather than from a server's comma string, whose order and escaping
differ between servers. Groups of certificate users come from the VO map; token users
carry their groups (``wlcg.groups``) and storage scopes in the token (WLCG common JWT
profile v1).

The chain handed to ``identity_from_cert_chain`` must already be verified by TLS
(``client_auth_ssl_adapter`` below does that, RFC 3820 proxies allowed).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import jwt
from cheroot.ssl.builtin import BuiltinSSLAdapter
from cryptography import x509
from cryptography.x509.oid import NameOID

from srm_dicom.config import read_toml
from srm_dicom.errors import ConfigError, MdmError

GROUPS = ("register", "physician", "mia")
KINDS = ("x509", "jwt", "service")
STORAGE_ACTIONS = ("read", "create", "modify", "stage")
# The WLCG profile's audience meaning "any resource server"; resources must accept it.
WLCG_ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256")
PROXY_CERT_INFO_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.14")
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
    """An authenticated caller. ``subject`` is a DN for certificates, ``sub`` for tokens."""

    subject: str
    kind: str
    vo: str | None = None
    groups: frozenset[str] = frozenset()
    scopes: tuple[tuple[str, str], ...] = ()
    issuer: str | None = None

    @property
    def fqans(self) -> frozenset[str]:
        """VOMS-style group names: ``/vo`` for every VO member, ``/vo/group`` per group."""
        if self.vo is None:
            return frozenset()
        return frozenset({f"/{self.vo}"} | {f"/{self.vo}/{g}" for g in self.groups})

    def may_scope(self, action: str, path: str) -> bool:
        """Whether the token's scopes allow ``action`` on ``path``.

        Certificates carry no scopes: for them the ACLs alone decide, so this is True.
        A scope path covers itself and what is below it, component-wise: ``/a/b`` allows
        ``/a/b/c`` but not ``/a/bc``.
        """
        if self.kind != "jwt":
            return True
        wanted = _normalize_path(path)
        return any(
            act == action and (base == "/" or wanted == base or wanted.startswith(base + "/"))
            for act, base in self.scopes
        )


def _normalize_path(path: str) -> str:
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


def identity_from_cert_chain(chain_der_or_pem: list[Any], vomap: VoMap, services: Iterable[str] = ()) -> Identity:
    """The caller of a TLS connection whose (already verified) chain is given leaf first.

    ``services`` lists the DNs of service identities (the storage element): kind "service".
    """
    chain = load_chain(chain_der_or_pem)
    if not chain:
        raise AuthenticationError("no client certificate")
    return vomap.identity(slash_dn(end_entity(chain).subject), services)


@dataclass
class Issuer:
    """A trusted token issuer: its JWKS (an https URL or a file) and the audiences accepted.

    A URL is fetched through PyJWT's client, which caches the key set (5 min) and
    refreshes it once on an unknown key id; a file (offline sites, tests) is read once.
    """

    iss: str
    jwks: str
    audience: tuple[str, ...]

    @classmethod
    def from_config(cls, iss: str, table: Any, base_dir: Path) -> Issuer:
        if not isinstance(table, dict) or set(table) - {"jwks", "audience"}:
            raise ConfigError(f'config: [identity.issuers."{iss}"] takes jwks and audience')
        jwks, audience = table.get("jwks"), table.get("audience")
        if not isinstance(jwks, str) or not jwks:
            raise ConfigError(f"config: issuer {iss}: jwks must be a URL or a file")
        if isinstance(audience, str):
            audience = [audience]
        if not audience or not all(isinstance(a, str) for a in audience):
            raise ConfigError(f"config: issuer {iss}: audience must be a string or a list")
        if "://" not in jwks:
            jwks = str((base_dir / jwks).resolve())
        return cls(iss, jwks, tuple(audience))

    @cached_property
    def _client(self) -> jwt.PyJWKClient:
        return jwt.PyJWKClient(self.jwks, timeout=10)

    @cached_property
    def _file_keys(self) -> jwt.PyJWKSet:
        try:
            return jwt.PyJWKSet.from_json(Path(self.jwks).read_text())
        except (OSError, jwt.PyJWTError) as exc:
            message = f"cannot read the keys of token issuer {self.iss}: {exc}"
            raise AuthenticationError(message) from None

    def signing_key(self, token: str) -> Any:
        try:
            if "://" in self.jwks:
                return self._client.get_signing_key_from_jwt(token).key
            kid = jwt.get_unverified_header(token).get("kid")
            keys = self._file_keys
            return (keys[kid] if kid else next(iter(keys.keys))).key
        except KeyError:
            raise AuthenticationError(f"bearer token: no key {kid!r} of {self.iss}") from None
        except jwt.PyJWKClientConnectionError:
            raise AuthenticationError(f"cannot fetch the keys of token issuer {self.iss}") from None
        except jwt.PyJWTError as exc:
            raise AuthenticationError(f"bearer token: no signing key of {self.iss}: {exc}") from None


def issuers_from_config(tables: Mapping[str, Any], base_dir: Path) -> dict[str, Issuer]:
    return {iss: Issuer.from_config(iss, table, base_dir) for iss, table in tables.items()}


def identity_from_bearer(token: str, issuers: Mapping[str, Issuer]) -> Identity:
    """The caller of a WLCG bearer token, signature, ``iss``, ``aud`` and ``exp`` checked."""
    try:
        iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
    except jwt.PyJWTError:
        raise AuthenticationError("bearer token is not a valid JWT") from None
    issuer = issuers.get(iss) if isinstance(iss, str) else None
    if issuer is None:
        raise AuthenticationError(f"bearer token issuer {iss!r} is not trusted")
    try:
        claims = jwt.decode(
            token,
            issuer.signing_key(token),
            algorithms=list(TOKEN_ALGORITHMS),
            audience=[*issuer.audience, WLCG_ANY_AUDIENCE],
            issuer=issuer.iss,
            options={"require": ["exp", "iss", "sub", "aud"]},
            leeway=30,
        )
    except jwt.ExpiredSignatureError:
        raise AuthenticationError("bearer token expired") from None
    except jwt.InvalidAudienceError:
        raise AuthenticationError("bearer token is not meant for this service (aud)") from None
    except jwt.InvalidSignatureError:
        raise AuthenticationError("bearer token signature is invalid") from None
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"bearer token rejected: {exc}") from None
    vo, groups = _token_groups(claims.get("wlcg.groups", []))
    return Identity(
        subject=str(claims["sub"]),
        kind="jwt",
        vo=vo,
        groups=groups,
        scopes=_token_scopes(claims.get("scope", "")),
        issuer=issuer.iss,
    )


def _token_scopes(scope: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(scope, str):
        raise AuthenticationError("bearer token 'scope' must be a string")
    scopes = []
    for item in scope.split():
        name, _, path = item.partition(":")
        if not name.startswith("storage."):
            continue
        action = name.removeprefix("storage.")
        if action not in STORAGE_ACTIONS:
            continue
        if not path.startswith("/"):
            raise AuthenticationError(f"bearer token scope {item!r} has no path")
        scopes.append((action, _normalize_path(path)))
    return tuple(scopes)


def _token_groups(claim: Any) -> tuple[str | None, frozenset[str]]:
    """``["/demo", "/demo/physician"]`` → ("demo", {"physician"}); the first group names the VO."""
    if not isinstance(claim, list) or not all(isinstance(g, str) for g in claim):
        raise AuthenticationError("bearer token 'wlcg.groups' must be a list of strings")
    vo: str | None = None
    groups = set()
    for name in claim:
        parts = [p for p in name.split("/") if p]
        if not parts:
            continue
        vo = vo or parts[0]
        if parts[0] == vo and len(parts) > 1:
            groups.add("/".join(parts[1:]))
    return vo, frozenset(groups)


class ClientAuthSSLAdapter(BuiltinSSLAdapter):
    """cheroot's builtin TLS adapter, asking for client certificates and passing on the chain.

    Python's ssl refuses RFC 3820 proxies unless ``VERIFY_ALLOW_PROXY_CERTS`` is set; with
    it, OpenSSL verifies the proxy chain itself, including the proxy naming rules. Legacy
    (GT2) proxies are unknown to OpenSSL and fail the handshake: they are obsolete on the
    grid and the standard library offers no verify callback to accept them.
    cheroot puts only the leaf in the WSGI environ; the DN must come from the end-entity
    certificate further down the chain, so the verified chain is added under
    ``ENVIRON_PEER_CHAIN`` (DER, leaf first).
    """

    def __init__(self, certificate: str, private_key: str, ca: str, *, required: bool = True):
        super().__init__(certificate, private_key, ca)
        self.context.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
        self.context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2

    def get_environ(self, sock: ssl.SSLSocket) -> dict[str, Any]:  # type: ignore[override]  # cheroot's stub says socket
        environ = super().get_environ(sock)
        # SSLSocket.get_verified_chain is public from Python 3.13; 3.11 has it on _sslobj.
        getter = getattr(sock, "get_verified_chain", None) or sock._sslobj.get_verified_chain  # type: ignore[attr-defined]  # noqa: SLF001
        chain = getter() or []
        environ[ENVIRON_PEER_CHAIN] = [
            cert if isinstance(cert, bytes) else cert.public_bytes(ssl._ssl.ENCODING_DER)  # type: ignore[attr-defined]  # noqa: SLF001
            for cert in chain
        ]
        return environ
