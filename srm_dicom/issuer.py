"""The demo's WLCG token issuer: a key under ``issuer/``, OpenID discovery on loopback, tokens on demand.

``mdm demo`` creates it (``issuer/key.pem`` mode 0600, ``issuer/issuer.json``), trusts it
in ``[identity] issuers`` (keys found by discovery, as for a real issuer such as INDIGO
IAM) and serves ``/.well-known/openid-configuration`` and ``/jwks.json`` while it runs;
``mdm token USER`` mints tokens with the same key. A real site trusts its VO's issuer
instead (README, "Tokens"). PyJWT signs; nothing is written by hand.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from srm_dicom.errors import ConfigError, InvalidInput
from srm_dicom.tokens import DISCOVERY

KEY_ID = "demo-1"
DEFAULT_SCOPES = ("storage.read:/", "storage.stage:/", "storage.poll:/")
MAX_LIFETIME = 7 * 24 * 3600


@dataclass(frozen=True)
class DemoIssuer:
    """An issuer whose state is a directory: key.pem and issuer.json ({iss, audience, base_path})."""

    directory: Path
    iss: str
    audience: str
    base_path: str

    @classmethod
    def create(cls, directory: Path, iss: str, audience: str, base_path: str) -> DemoIssuer:
        """Make (or keep) the key, and record where the issuer answers and for whom."""
        directory.mkdir(parents=True, exist_ok=True)
        key_path = directory / "key.pem"
        if not key_path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as out:
                out.write(pem)
        issuer = cls(directory, iss, audience, base_path)
        (directory / "issuer.json").write_text(json.dumps({"iss": iss, "audience": audience, "base_path": base_path}))
        return issuer

    @classmethod
    def load(cls, directory: Path) -> DemoIssuer:
        try:
            data = json.loads((directory / "issuer.json").read_text())
            return cls(directory, data["iss"], data["audience"], data["base_path"])
        except (OSError, ValueError, KeyError):
            raise ConfigError(f"no demo token issuer in {directory} (run 'mdm demo' first)") from None

    def _key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key((self.directory / "key.pem").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key

    def jwks(self) -> dict:
        public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key().public_key()))
        return {"keys": [{**public, "kid": KEY_ID, "alg": "ES256", "use": "sig"}]}

    def mint(self, subject: str, scopes: tuple[str, ...] = DEFAULT_SCOPES, groups: tuple[str, ...] = (),
             lifetime: int = 3600) -> str:
        """A WLCG profile access token (wlcg.ver 1.0) for ``subject``."""
        if not 0 < lifetime <= MAX_LIFETIME:
            raise InvalidInput(f"token lifetime must be 1 to {MAX_LIFETIME} seconds")
        now = int(time.time())
        claims = {"wlcg.ver": "1.0", "iss": self.iss, "sub": subject, "aud": self.audience, "iat": now, "nbf": now,
                  "exp": now + lifetime, "jti": str(uuid.uuid4()), "scope": " ".join(scopes)}
        if groups:
            claims["wlcg.groups"] = list(groups)
        return jwt.encode(claims, self._key(), algorithm="ES256", headers={"kid": KEY_ID, "typ": "at+jwt"})

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        """Answer discovery and the key set on (host, port) from a daemon thread; stop with shutdown()."""
        documents = {
            DISCOVERY: {"issuer": self.iss, "jwks_uri": f"{self.iss}/jwks.json", "token_endpoint": None,
                        "id_token_signing_alg_values_supported": ["ES256"]},
            "/jwks.json": self.jwks(),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                document = documents.get(self.path)
                body = json.dumps(document if document is not None else {"error": "not found"}).encode()
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=server.serve_forever, name="token-issuer", daemon=True).start()
        return server
