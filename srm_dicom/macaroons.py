"""Macaroons as dCache issues them: what gfal2 asks the source of a third-party copy for.

``POST <path>`` with ``Content-Type: application/macaroon-request`` and
``{"caveats": ["activity:DOWNLOAD,LIST"], "validity": "PT60M"}`` answers
``{"macaroon", "uri": {"targetWithMacaroon", "baseWithMacaroon"}}``. The macaroon is then
shown as ``Authorization: Bearer`` (or ``?authz=``) by whoever holds it — XRootD pulling
for FTS — and acts as its issuer at issue time, within its caveats, never more
(``srm_dicom.access``; README, "Macaroons").

First-party caveats, all of which must hold: ``id:`` the issuer's identity (DN, VO,
groups without ``register``, limited or not), ``path:`` (default: the requested path),
``activity:`` (LIST, DOWNLOAD, READ_METADATA, STAGE), ``before:`` (an ISO 8601 UTC time;
always set, validity capped by ``[tokens] macaroon_max_lifetime``) and ``ip:`` (addresses
or networks, comma-separated). pymacaroons signs and verifies; the caveats' meaning is here.
The root key derives from the site secret, so every front end of a site shares it.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from typing import Any

from pymacaroons import Macaroon, Verifier

from srm_dicom.access import ACTIVITIES
from srm_dicom.durations import parse_duration
from srm_dicom.errors import InvalidInput
from srm_dicom.identity import REGISTER, Identity, covers, normalize_path
from srm_dicom.tokens import InvalidToken

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/macaroon-request"
DEFAULT_VALIDITY = 3600
CAVEATS = ("id", "path", "activity", "before", "ip")


def root_key(site_secret: bytes) -> bytes:
    """The macaroon root key of a site: an HMAC of the site secret, so that it is the same on
    every front end and never the secret itself."""
    return hmac.new(site_secret, b"srm-dicom macaroon root key v1", sha256).digest()


@dataclass(frozen=True)
class MacaroonRequest:
    """What a client asked for: the caveats it added and the validity (seconds)."""

    caveats: tuple[str, ...]
    validity: int

    @classmethod
    def from_json(cls, data: Any, max_lifetime: int) -> MacaroonRequest:
        if not isinstance(data, dict):
            raise InvalidInput("a macaroon request is a JSON object {\"caveats\": [...], \"validity\": \"PT1H\"}")
        caveats = data.get("caveats", [])
        if not isinstance(caveats, list) or not all(isinstance(c, str) for c in caveats):
            raise InvalidInput("'caveats' must be a list of strings such as \"activity:DOWNLOAD,LIST\"")
        for caveat in caveats:
            _check_caveat(caveat)
        validity = parse_duration(data.get("validity", DEFAULT_VALIDITY))
        if validity <= 0:
            raise InvalidInput("'validity' must be a positive duration")
        return cls(tuple(caveats), min(validity, max_lifetime))


def _check_caveat(caveat: str) -> None:
    """A caveat a client may add: path, activity, before or ip, well formed."""
    name, colon, value = caveat.partition(":")
    if not colon or name not in CAVEATS or name == "id":
        raise InvalidInput(f"unsupported caveat {caveat!r} (path:, activity:, before:, ip:)")
    if name == "path":
        if not value.startswith("/") or ".." in value.split("/"):
            _bad(caveat, "an absolute path without '..'")
    elif name == "activity":
        unknown = [a for a in value.split(",") if a not in ACTIVITIES]
        if unknown or not value:
            _bad(caveat, f"activities among {', '.join(ACTIVITIES)} (this storage element is read-only)")
    elif name == "before":
        _parse_time(value, caveat)
    else:
        _networks(value, caveat)


def _bad(caveat: str, wanted: str) -> None:
    raise InvalidInput(f"caveat {caveat!r}: expected {wanted}")


def _parse_time(value: str, caveat: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(f"caveat {caveat!r}: expected an ISO 8601 time such as 2030-01-01T00:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _networks(value: str, caveat: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    try:
        return [ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",")]
    except ValueError:
        raise InvalidInput(f"caveat {caveat!r}: expected addresses or networks, comma-separated") from None


def _identity_caveat(identity: Identity) -> str:
    """The issuer as the macaroon carries it: never the register group, never the service."""
    data = {"dn": identity.dn, "kind": identity.kind, "vo": identity.vo,
            "groups": sorted(identity.groups - {REGISTER}), "limited": identity.limited}
    return "id:" + base64.urlsafe_b64encode(json.dumps(data, sort_keys=True).encode()).decode()


def _issuer_from(value: str) -> Identity:
    data = json.loads(base64.urlsafe_b64decode(value.encode()))
    kind = data["kind"] if data["kind"] in ("x509", "voms") else "x509"
    return Identity(data["dn"], kind, vo=data["vo"], groups=frozenset(data["groups"]) - {REGISTER},
                    limited=bool(data["limited"]))


class MacaroonAuthority:
    """Issues and verifies the site's macaroons; one per front end, all with the same root key."""

    def __init__(self, site_secret: bytes, location: str, max_lifetime: int) -> None:
        self._key = root_key(site_secret)
        self._location = location
        self.max_lifetime = max_lifetime

    def issue(self, identity: Identity, path: str, request: MacaroonRequest, now: datetime | None = None) -> str:
        """A serialized macaroon for ``identity`` (a certificate user: ``access.may_issue_macaroon``)."""
        now = now or datetime.now(UTC)
        macaroon = Macaroon(location=self._location, identifier=secrets.token_hex(16), key=self._key)
        macaroon.add_first_party_caveat(_identity_caveat(identity))
        before = (now + timedelta(seconds=request.validity)).strftime("%Y-%m-%dT%H:%M:%SZ")
        macaroon.add_first_party_caveat(f"before:{before}")
        if not any(c.startswith("path:") for c in request.caveats):
            macaroon.add_first_party_caveat(f"path:{normalize_path(path)}")
        if not any(c.startswith("activity:") for c in request.caveats):
            macaroon.add_first_party_caveat("activity:" + ",".join(ACTIVITIES))
        for caveat in request.caveats:
            macaroon.add_first_party_caveat(caveat)
        return macaroon.serialize()

    def identify(self, serialized: str, client_address: str | None, now: datetime | None = None) -> Identity:
        """The caller a macaroon stands for, or InvalidToken: bad signature, unknown or
        failing caveat, expired, or used from an address its ``ip:`` caveats exclude."""
        now = now or datetime.now(UTC)
        try:
            macaroon = Macaroon.deserialize(serialized)
            caveats = [c.caveat_id for c in macaroon.first_party_caveats()]
            verifier = Verifier()
            verifier.satisfy_general(lambda caveat: caveat.partition(":")[0] in CAVEATS)
            verifier.verify(macaroon, self._key)
        # pymacaroons' binary deserializer indexes and unpacks what it is given: a truncated or
        # random bearer string raises IndexError, struct.error or a bare Exception ("cannot read
        # uvarint") before any MacaroonException. Whatever it raises, the string is no macaroon.
        except Exception as exc:  # noqa: BLE001
            log.info("macaroon refused: %s", type(exc).__name__)
            raise InvalidToken("bearer token is neither a valid JWT nor a macaroon of this site") from None
        return _caller(caveats, client_address, now)


def _caller(caveats: Iterable[str], client_address: str | None, now: datetime) -> Identity:
    issuer: Identity | None = None
    paths: list[str] = []
    activities = set(ACTIVITIES)
    expires: datetime | None = None
    for caveat in caveats:
        name, _, value = caveat.partition(":")
        try:
            if name == "id":
                if issuer is not None:
                    raise InvalidToken("macaroon names two issuers")
                issuer = _issuer_from(value)
            elif name == "path":
                paths.append(normalize_path(value))
            elif name == "activity":
                activities &= set(value.split(","))
            elif name == "before":
                moment = _parse_time(value, caveat)
                expires = moment if expires is None else min(expires, moment)
            elif name == "ip":
                address = ipaddress.ip_address(client_address or "")
                if not any(address in network for network in _networks(value, caveat)):
                    raise InvalidToken("macaroon is not valid from this address (ip caveat)")
        except (InvalidInput, ValueError, KeyError, TypeError):
            raise InvalidToken(f"macaroon caveat {caveat[:60]!r} is malformed or does not hold") from None
    if issuer is None or expires is None:
        raise InvalidToken("macaroon carries no issuer or no expiry")
    if now >= expires:
        raise InvalidToken("macaroon expired")
    return Identity(f"macaroon of {issuer.subject}", "macaroon", on_behalf=issuer, paths=_narrowest(paths),
                    activities=frozenset(activities))


def _narrowest(paths: list[str]) -> tuple[str, ...]:
    """Every path caveat must hold: the deepest one if they nest, nothing if they do not."""
    if not paths:
        return ("/",)
    deepest = max(paths, key=len)
    return (deepest,) if all(covers(p, deepest) for p in paths) else ()
