"""WLCG bearer tokens, as the WLCG common JWT profile (v1.3) says (see README, "Tokens").

A token is trusted when its ``iss`` is a configured issuer (``[identity.issuers."ISS"]``),
its signature verifies with one of the issuer's keys (a JWKS file or URL, or discovered
through ``ISS/.well-known/openid-configuration`` → ``jwks_uri``; both cached), its
``aud`` is the issuer's configured audience or ``https://wlcg.cern.ch/jwt/v1/any``, and
``exp``, ``nbf`` and ``iat`` are numbers that hold now. PyJWT does the cryptography and
the claim checks; the profile's rules PyJWT does not know (numeric times, key type of the
algorithm, storage scopes) are checked here.

Storage scopes are capabilities: ``storage.read:/p`` lists and reads below /p,
``storage.stage:/p`` stages (and no longer implies read), ``storage.poll:/p`` asks for the
state of stage requests and files below /p. The path is mandatory and relative to the
issuer's ``base_path``; it is matched a whole component at a time (``/foo/bar`` does not
grant ``/foo/bargain``). A token carrying any storage scope is authorized by its scopes
alone; one without is authorized as a member of its ``wlcg.groups`` VO (capability scopes
win over groups). ``wlcg.groups`` never grants the hospital's register group.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from srm_dicom.errors import ConfigError
from srm_dicom.identity import REGISTER, AuthenticationError, Identity, normalize_path

log = logging.getLogger(__name__)

# The profile's audience meaning "any resource server"; resources must accept it.
WLCG_ANY_AUDIENCE = "https://wlcg.cern.ch/jwt/v1/any"
TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
# Storage scopes that grant something here; storage.create and storage.modify are valid
# scopes of the profile that a read-only storage element ignores.
STORAGE_ACTIONS = ("read", "stage", "poll")
IGNORED_ACTIONS = ("create", "modify")
TIME_CLAIMS = ("exp", "nbf", "iat")
DISCOVERY = "/.well-known/openid-configuration"
DISCOVERY_LIFETIME = 3600.0  # seconds a discovered jwks_uri is kept
LEEWAY = 30  # seconds of clock skew allowed on exp, nbf and iat
# The key type each algorithm needs: a token whose header names another family than its
# issuer's key is refused before any signature check (PyJWT would raise TypeError: a 500).
_ALGORITHM_KEYS: dict[str, type] = {"RS": rsa.RSAPublicKey, "PS": rsa.RSAPublicKey, "ES": ec.EllipticCurvePublicKey}


REALM = "srm-dicom"


def bearer_challenge(error: str | None = None, description: str = "") -> str:
    """A ``WWW-Authenticate`` value (RFC 6750 §3): no error code when no credential was shown."""
    if error is None:
        return f'Bearer realm="{REALM}"'
    text = "".join(c for c in description if c.isprintable() and c not in '"\\')[:200]
    return f'Bearer realm="{REALM}", error="{error}", error_description="{text}"'


class InvalidToken(AuthenticationError):
    """A bearer token that is not valid here (RFC 6750 ``invalid_token``: a 401)."""

    bearer_error = "invalid_token"

    @property
    def http_headers(self) -> tuple[tuple[str, str], ...]:
        return (("WWW-Authenticate", bearer_challenge(self.bearer_error, str(self))),)


class InvalidRequest(InvalidToken):
    """An Authorization header that is no credential at all (RFC 6750 ``invalid_request``: a 400)."""

    bearer_error = "invalid_request"
    http_status = 400


@dataclass
class Issuer:
    """A trusted token issuer: where its keys are, the audiences and the base path of its scopes.

    ``jwks`` is an https URL or a file; empty, the keys are found by OpenID discovery. A
    URL's key set is fetched through PyJWT's client, which caches it (5 min) and refreshes
    it once on an unknown key id; a file (offline sites, tests) is read once.
    """

    iss: str
    audience: tuple[str, ...]
    jwks: str = ""
    base_path: str = "/"
    ca: str | None = None  # extra CA file for https fetches (the site's), beside the system's
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _client: jwt.PyJWKClient | None = field(default=None, repr=False)
    _client_expires: float = field(default=0.0, repr=False)
    _file_keys: jwt.PyJWKSet | None = field(default=None, repr=False)

    @classmethod
    def from_config(cls, iss: str, table: Any, base_dir: Path, ca: Path | None = None) -> Issuer:
        allowed = {"jwks", "audience", "base_path"}
        if not isinstance(table, dict) or set(table) - allowed:
            raise ConfigError(f'config: [identity.issuers."{iss}"] takes jwks, audience and base_path')
        if not (iss.startswith("https://") or _loopback_http(iss)):
            raise ConfigError(f"config: issuer {iss!r} must be an https URL (the tokens' iss)")
        jwks, audience, base = table.get("jwks", ""), table.get("audience"), table.get("base_path", "/")
        if not isinstance(jwks, str):
            raise ConfigError(f"config: issuer {iss}: jwks must be a URL or a file (or absent: discovered)")
        if isinstance(audience, str):
            audience = [audience]
        if not audience or not all(isinstance(a, str) and a for a in audience):
            raise ConfigError(f"config: issuer {iss}: audience must be a string or a list")
        if not isinstance(base, str) or not base.startswith("/"):
            raise ConfigError(f"config: issuer {iss}: base_path must be an absolute path such as /grid/demo")
        if jwks and "://" not in jwks:
            jwks = str((base_dir / jwks).resolve())
        return cls(iss, tuple(audience), jwks, normalize_path(base), str(ca) if ca else None)

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca:
            context.load_verify_locations(self.ca)
        return context

    def _jwks_client(self) -> jwt.PyJWKClient:
        """PyJWT's cached client of the key set URL: the configured one, or ``jwks_uri`` of
        the issuer's discovery document (fetched again after DISCOVERY_LIFETIME)."""
        with self._lock:
            if self._client is not None and (self.jwks or time.monotonic() < self._client_expires):
                return self._client
            uri = self.jwks or self._discover()
            self._client = jwt.PyJWKClient(uri, timeout=10, ssl_context=self._context())
            self._client_expires = time.monotonic() + DISCOVERY_LIFETIME
            return self._client

    def _discover(self) -> str:
        url = self.iss.rstrip("/") + DISCOVERY
        try:
            with urllib.request.urlopen(url, timeout=10, context=self._context()) as answer:  # noqa: S310 - https
                document = json.loads(answer.read(1 << 20))
        except (OSError, ValueError) as exc:
            log.warning("token issuer %s: discovery at %s failed: %s", self.iss, url, exc)
            raise InvalidToken(f"cannot discover the keys of token issuer {self.iss}") from None
        uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(uri, str) or not (uri.startswith("https://") or _loopback_http(uri)):
            raise InvalidToken(f"token issuer {self.iss}: its discovery document has no jwks_uri")
        if document.get("issuer", self.iss).rstrip("/") != self.iss.rstrip("/"):
            raise InvalidToken(f"token issuer {self.iss}: its discovery document names another issuer")
        return uri

    def _keys_from_file(self) -> jwt.PyJWKSet:
        with self._lock:
            if self._file_keys is None:
                try:
                    self._file_keys = jwt.PyJWKSet.from_json(Path(self.jwks).read_text())
                except (OSError, jwt.PyJWTError) as exc:
                    raise InvalidToken(f"cannot read the keys of token issuer {self.iss}: {exc}") from None
            return self._file_keys

    def signing_key(self, token: str) -> Any:
        kid = None
        try:
            if self.jwks and "://" not in self.jwks:
                kid = jwt.get_unverified_header(token).get("kid")
                keys = self._keys_from_file()
                return (keys[kid] if kid else next(iter(keys.keys))).key
            return self._jwks_client().get_signing_key_from_jwt(token).key
        except KeyError:
            raise InvalidToken(f"bearer token: no key {kid!r} of {self.iss}") from None
        except jwt.PyJWKClientConnectionError:
            raise InvalidToken(f"cannot fetch the keys of token issuer {self.iss}") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"bearer token: no signing key of {self.iss}: {exc}") from None

    def scope_path(self, path: str) -> str:
        """A scope's path as a path of this storage element: below the issuer's base path."""
        relative = normalize_path(path)
        return self.base_path if relative == "/" else normalize_path(self.base_path + relative)


def _loopback_http(url: str) -> bool:
    """Plain http is taken for an issuer on loopback only (tests, a demo issuer)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1")


def issuers_from_config(tables: Mapping[str, Any], base_dir: Path, ca: Path | None = None) -> dict[str, Issuer]:
    return {iss: Issuer.from_config(iss, table, base_dir, ca) for iss, table in tables.items()}


def _fits(algorithm: str, key: object) -> bool:
    return isinstance(key, _ALGORITHM_KEYS[algorithm[:2]])


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def identity_from_bearer(token: str, issuers: Mapping[str, Issuer]) -> Identity:
    """The caller of a WLCG bearer token, or InvalidToken saying why not."""
    try:
        unverified = jwt.decode(token, options={"verify_signature": False})
        algorithm = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError:
        raise InvalidToken("bearer token is not a valid JWT") from None
    iss = unverified.get("iss")
    issuer = issuers.get(iss) if isinstance(iss, str) else None
    if issuer is None:
        raise InvalidToken(f"bearer token issuer {iss!r} is not trusted")
    for name in TIME_CLAIMS:  # PyJWT takes int("1700000000"); the profile says NumericDate
        if name in unverified and not _is_number(unverified[name]):
            raise InvalidToken(f"bearer token '{name}' must be a number (seconds since the epoch)")
    if algorithm not in TOKEN_ALGORITHMS:
        raise InvalidToken(f"bearer token algorithm {algorithm!r} is not accepted")
    key = issuer.signing_key(token)
    if not _fits(algorithm, key):
        raise InvalidToken(f"bearer token algorithm {algorithm} does not fit the key of {issuer.iss}")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=[*issuer.audience, WLCG_ANY_AUDIENCE],
            issuer=issuer.iss,
            options={"require": ["exp", "iss", "sub", "aud"]},
            leeway=LEEWAY,
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("bearer token expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidToken("bearer token is not valid yet (nbf/iat)") from None
    except jwt.InvalidAudienceError:
        raise InvalidToken("bearer token is not meant for this service (aud)") from None
    except jwt.InvalidSignatureError:
        raise InvalidToken("bearer token signature is invalid") from None
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"bearer token rejected: {exc}") from None
    if not isinstance(claims["sub"], str) or not claims["sub"]:
        raise InvalidToken("bearer token 'sub' must be a non-empty string")
    vo, groups = _token_groups(claims.get("wlcg.groups", []))
    return Identity(
        subject=claims["sub"],
        kind="token",
        vo=vo,
        groups=groups,
        scopes=_token_scopes(claims.get("scope", ""), issuer),
        issuer=issuer.iss,
    )


def _token_scopes(scope: Any, issuer: Issuer) -> tuple[tuple[str, str], ...]:
    if not isinstance(scope, str):
        raise InvalidToken("bearer token 'scope' must be a string")
    scopes = []
    for item in scope.split():
        name, colon, path = item.partition(":")
        if not name.startswith("storage."):
            continue
        action = name.removeprefix("storage.")
        if action not in STORAGE_ACTIONS + IGNORED_ACTIONS:
            continue
        if not colon or not path.startswith("/"):
            raise InvalidToken(f"bearer token scope {item!r} has no path")
        try:
            resolved = issuer.scope_path(path)
        except AuthenticationError:
            raise InvalidToken(f"bearer token scope {item!r}: a path must not contain '..'") from None
        scopes.append((action, resolved))  # create/modify grant nothing, yet make the token a capability one
    return tuple(scopes)


def _token_groups(claim: Any) -> tuple[str | None, frozenset[str]]:
    """``["/demo", "/demo/physician"]`` → ("demo", {"physician"}); the first group names the VO.
    ``register`` is dropped: a token never makes its bearer a member of the hospital side."""
    if not isinstance(claim, list) or not all(isinstance(g, str) for g in claim):
        raise InvalidToken("bearer token 'wlcg.groups' must be a list of strings")
    vo: str | None = None
    groups = set()
    for name in claim:
        parts = [p for p in name.split("/") if p]
        if not parts:
            continue
        vo = vo or parts[0]
        if parts[0] == vo and len(parts) > 1:
            groups.add("/".join(parts[1:]))
    return vo, frozenset(groups - {REGISTER})
