"""WLCG bearer tokens (srm_dicom.tokens): signatures, claims, scopes and groups as the profile says."""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from srm_dicom.errors import ConfigError
from srm_dicom.identity import AuthenticationError
from srm_dicom.tokens import Issuer, identity_from_bearer, issuers_from_config

ISS = "https://iam.example.org/"
AUD = "https://se.example.org"


class TokenIssuer:
    """A token issuer made in the test: an RSA key, its JWKS file, tokens on demand."""

    def __init__(self, folder: Path, iss: str = ISS, kid: str = "k1"):
        self.iss, self.kid = iss, kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = folder / f"jwks-{kid}.json"
        self.jwks.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig"}]}))

    def token(self, **claims) -> str:
        now = int(time.time())
        body = {
            "iss": self.iss,
            "sub": "a1b2c3",
            "aud": AUD,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "wlcg.ver": "1.0",
            "scope": "storage.read:/grid/demo storage.stage:/grid/demo/mdm",
            "wlcg.groups": ["/demo", "/demo/physician"],
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture(scope="module")
def issuer(tmp_path_factory) -> TokenIssuer:
    return TokenIssuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture()
def issuers(issuer) -> dict[str, Issuer]:
    return issuers_from_config({ISS: {"jwks": issuer.jwks.name, "audience": AUD}}, base_dir=issuer.jwks.parent)


def test_good_token_gives_subject_vo_groups_and_scopes(issuer, issuers):
    identity = identity_from_bearer(issuer.token(), issuers)
    assert identity.kind == "token"
    assert identity.subject == "a1b2c3" and identity.issuer == ISS
    assert identity.vo == "demo" and identity.groups == {"physician"}
    assert identity.scopes == (("read", "/grid/demo"), ("stage", "/grid/demo/mdm"))


def test_scope_paths_match_whole_components(issuer, issuers):
    identity = identity_from_bearer(issuer.token(), issuers)
    assert identity.may_scope("read", "/grid/demo")
    assert identity.may_scope("read", "/grid/demo/mdm/1.2/3.4/5.6")
    assert identity.may_scope("read", "/grid/demo/")
    assert not identity.may_scope("read", "/grid/demonstration")
    assert not identity.may_scope("read", "/grid")
    assert not identity.may_scope("stage", "/grid/demo/other")
    assert identity.may_scope("stage", "/grid/demo/mdm/x")
    assert not identity.may_scope("modify", "/grid/demo/mdm/x")
    with pytest.raises(AuthenticationError):
        identity.may_scope("read", "/grid/demo/../other")


def test_root_scope_covers_everything(issuer, issuers):
    identity = identity_from_bearer(issuer.token(scope="storage.read:/"), issuers)
    assert identity.may_scope("read", "/grid/other/x")


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "https://elsewhere.example.org"}, "not meant for this service"),
        ({"iss": "https://rogue.example.org/"}, "issuer .* is not trusted"),
        ({"scope": "storage.read"}, "scope 'storage.read' has no path"),
        ({"scope": "storage.stage: openid"}, "has no path"),
        ({"exp": None}, "exp"),
        ({"sub": None}, "sub"),
    ],
    ids=["expired", "wrong-aud", "wrong-iss", "scope-no-path", "scope-empty-path", "no-exp", "no-sub"],
)
def test_bad_tokens_are_refused(issuer, issuers, claims, message):
    with pytest.raises(AuthenticationError, match=message):
        identity_from_bearer(issuer.token(**claims), issuers)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_time_claims_must_be_numbers(issuer, issuers, claim):
    """PyJWT alone takes int("1700000000"); the WLCG profile says NumericDate."""
    with pytest.raises(AuthenticationError, match=f"'{claim}' must be a number"):
        identity_from_bearer(issuer.token(**{claim: str(int(time.time()) + 60)}), issuers)


def test_an_algorithm_that_does_not_fit_the_issuers_key_is_refused(issuer, issuers):
    """An ES256 header over the issuer's RSA key made PyJWT raise TypeError: a 500 before."""
    other = ec.generate_private_key(ec.SECP256R1())
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    forged = jwt.encode(claims, other, algorithm="ES256", headers={"kid": issuer.kid})
    with pytest.raises(AuthenticationError, match="does not fit the key"):
        identity_from_bearer(forged, issuers)


def test_a_token_never_carries_the_register_group_nor_a_dn(issuer, issuers):
    owner = "/C=XX/O=srm-dicom/CN=registration service"
    identity = identity_from_bearer(issuer.token(sub=owner, **{"wlcg.groups": ["/demo", "/demo/register"]}), issuers)
    assert identity.groups == frozenset() and identity.vo == "demo"
    assert identity.dn is None and identity.principal == f"token:{ISS}#{owner}"
    assert identity.principal != owner


def test_wlcg_any_audience_is_accepted(issuer, issuers):
    token = issuer.token(aud="https://wlcg.cern.ch/jwt/v1/any")
    assert identity_from_bearer(token, issuers).subject == "a1b2c3"


def test_token_signed_by_another_key_is_refused(issuer, issuers, tmp_path):
    impostor = TokenIssuer(tmp_path, kid=issuer.kid)
    with pytest.raises(AuthenticationError, match="signature"):
        identity_from_bearer(impostor.token(), issuers)


def test_tampered_token_is_refused(issuer, issuers):
    header, payload, signature = issuer.token().split(".")
    other = issuer.token(**{"wlcg.groups": ["/demo", "/demo/register"]}).split(".")[1]
    with pytest.raises(AuthenticationError, match="signature"):
        identity_from_bearer(f"{header}.{other}.{signature}", issuers)
    assert payload != other


def test_hmac_and_unsigned_tokens_are_refused(issuer, issuers):
    claims = jwt.decode(issuer.token(), options={"verify_signature": False})
    for token in (
        jwt.encode(claims, "s" * 32, algorithm="HS256", headers={"kid": issuer.kid}),
        jwt.encode(claims, None, algorithm="none", headers={"kid": issuer.kid}),
        "not.a.token",
    ):
        with pytest.raises(AuthenticationError):
            identity_from_bearer(token, issuers)


def test_jwks_from_a_url_is_fetched_once_and_cached(issuer):
    fetched = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            fetched.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(issuer.jwks.parent)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{issuer.jwks.name}"
        issuers = issuers_from_config({ISS: {"jwks": url, "audience": [AUD]}}, Path("."))
        for _ in range(3):
            assert identity_from_bearer(issuer.token(), issuers).vo == "demo"
        assert len(fetched) == 1
    finally:
        server.shutdown()
        server.server_close()


def test_issuer_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="audience"):
        issuers_from_config({ISS: {"jwks": "jwks.json"}}, tmp_path)
    with pytest.raises(ConfigError, match="takes jwks, audience and base_path"):
        issuers_from_config({ISS: {"jwks": "j", "audience": AUD, "x": 1}}, tmp_path)


def test_scope_paths_are_relative_to_the_issuers_base_path(issuer):
    issuers = issuers_from_config({ISS: {"jwks": str(issuer.jwks), "audience": AUD, "base_path": "/grid/demo"}},
                                  issuer.jwks.parent)
    identity = identity_from_bearer(issuer.token(scope="storage.read:/mdm storage.stage:/ storage.poll:/mdm/1.2"),
                                    issuers)
    assert identity.scopes == (("read", "/grid/demo/mdm"), ("stage", "/grid/demo"), ("poll", "/grid/demo/mdm/1.2"))
    assert identity.may_scope("read", "/grid/demo/mdm/1.2/3.4/5.6")
    assert not identity.may_scope("read", "/grid/demo/mdmx") and not identity.may_scope("read", "/mdm")
    with pytest.raises(AuthenticationError, match="must not contain"):
        identity_from_bearer(issuer.token(scope="storage.read:/../other"), issuers)


def test_a_token_not_valid_yet_is_refused(issuer, issuers):
    later = int(time.time()) + 3600
    with pytest.raises(AuthenticationError, match="not valid yet"):
        identity_from_bearer(issuer.token(nbf=later), issuers)


def test_create_and_modify_scopes_grant_nothing_but_make_a_capability_token(issuer, issuers):
    identity = identity_from_bearer(issuer.token(scope="storage.create:/grid/demo openid"), issuers)
    assert identity.scopes == (("create", "/grid/demo"),)
    assert not identity.may_scope("read", "/grid/demo/x")


def test_issuer_keys_are_discovered_through_openid_configuration_and_cached(issuer, tmp_path):
    """iss/.well-known/openid-configuration names jwks_uri; both are fetched once for many tokens."""
    fetched: list[str] = []
    (tmp_path / ".well-known").mkdir()
    (tmp_path / "keys.json").write_text(issuer.jwks.read_text())

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            fetched.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        iss = f"http://127.0.0.1:{server.server_port}"
        (tmp_path / ".well-known" / "openid-configuration").write_text(
            json.dumps({"issuer": iss, "jwks_uri": f"{iss}/keys.json"}))
        issuers = issuers_from_config({iss: {"audience": AUD}}, tmp_path)
        found = TokenIssuer.__new__(TokenIssuer)
        found.iss, found.kid, found.key, found.jwks = iss, issuer.kid, issuer.key, issuer.jwks
        for _ in range(3):
            assert identity_from_bearer(found.token(), issuers).issuer == iss
        assert fetched == ["/.well-known/openid-configuration", "/keys.json"]
    finally:
        server.shutdown()
        server.server_close()


def test_an_issuer_that_cannot_be_discovered_refuses_its_tokens(issuer):
    iss = "http://127.0.0.1:9"  # discard port: nothing answers
    issuers = issuers_from_config({iss: {"audience": AUD}}, Path("."))
    found = TokenIssuer.__new__(TokenIssuer)
    found.iss, found.kid, found.key, found.jwks = iss, issuer.kid, issuer.key, issuer.jwks
    with pytest.raises(AuthenticationError, match="cannot discover"):
        identity_from_bearer(found.token(), issuers)


def test_issuers_must_be_https_except_on_loopback(tmp_path):
    with pytest.raises(ConfigError, match="must be an https URL"):
        issuers_from_config({"http://iam.example.org": {"audience": AUD}}, tmp_path)
