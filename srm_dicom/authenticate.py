"""Who is calling an HTTP front end: one Identity from the request's credentials.

``Authorization: Bearer`` (or dCache's ``?authz=``) carries a WLCG JWT
(``srm_dicom.tokens``) or a macaroon this site issued (``srm_dicom.macaroons``); without
it, the verified TLS client chain (proxies included) names a certificate user. A request
showing both is judged by its bearer credential alone, as dCache and XRootD do.
Refusals are ``AuthenticationError`` (401) with an RFC 6750 ``WWW-Authenticate: Bearer``
challenge (``tokens.bearer_challenge``).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs

from srm_dicom.config import Config
from srm_dicom.identity import ENVIRON_PEER_CHAIN, AuthenticationError, Identity, VoMap, identity_from_cert_chain
from srm_dicom.tokens import InvalidRequest, InvalidToken, identity_from_bearer, issuers_from_config
from srm_dicom.voms import VomsTrust


class Authenticator:
    """The site's ways to authenticate, built once from the config; thread-safe."""

    def __init__(self, config: Config, services: tuple[str, ...],
                 macaroon: Callable[[str, str | None], Identity] | None = None) -> None:
        self._vomap = VoMap.load(config.path(config.identity.vomap))
        self._services = services
        self._issuers = issuers_from_config(config.identity.issuers, config.base_dir, config.path(config.identity.ca))
        self._macaroon = macaroon
        identity = config.identity
        self._voms = VomsTrust.from_config(config.path(identity.vomsdir), config.path(identity.ca),
                                           identity.voms_roles) if identity.vomsdir else None

    def identify(self, environ: dict) -> Identity:
        authorization = environ.get("HTTP_AUTHORIZATION", "").strip()
        scheme, _, credential = authorization.partition(" ")
        if not authorization and "authz=" in environ.get("QUERY_STRING", ""):
            # dCache's targetWithMacaroon URLs carry the macaroon as ?authz=
            scheme, credential = "bearer", parse_qs(environ["QUERY_STRING"]).get("authz", [""])[0]
        if scheme.lower() == "bearer":
            credential = credential.strip()
            if not credential:
                raise InvalidRequest("Authorization: Bearer without a token")
            if credential.count(".") == 2:  # a JWT's three base64url parts; macaroons have no dots
                return identity_from_bearer(credential, self._issuers)
            if self._macaroon is None:
                raise InvalidToken("bearer token is not a valid JWT")
            return self._macaroon(credential, environ.get("REMOTE_ADDR"))
        chain = environ.get(ENVIRON_PEER_CHAIN)
        if chain:
            return identity_from_cert_chain(chain, self._vomap, self._services, self._voms)
        raise AuthenticationError("a client certificate (or proxy) or a bearer token is required")
