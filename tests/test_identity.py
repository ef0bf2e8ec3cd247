"""Who is calling: DNs from real certificates and proxies, the VO map, WLCG bearer tokens."""

from __future__ import annotations

import json
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from srm_dicom.errors import ConfigError
from srm_dicom.identity import (
    AuthenticationError,
    Identity,
    Issuer,
    VoMap,
    identity_from_bearer,
    identity_from_cert_chain,
    issuers_from_config,
    slash_dn,
)
from srm_dicom.pki import SERVICE_DN, init_pki, make_proxy

ISS = "https://iam.example.org/"
AUD = "https://se.example.org"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pki")
    init_pki(root)
    return root


@pytest.fixture(scope="module")
def vomap(pki) -> VoMap:
    return VoMap.load(pki / "vomap.toml")


def _user(pki: Path, name: str) -> tuple[bytes, bytes]:
    return (pki / "users" / name / "cert.pem").read_bytes(), (pki / "users" / name / "key.pem").read_bytes()


def test_dn_in_slash_form_in_certificate_order(pki, vomap):
    cert, _ = _user(pki, "bob")
    identity = identity_from_cert_chain([cert], vomap)
    assert identity == Identity(
        subject="/C=XX/O=srm-dicom/CN=bob", kind="x509", vo="demo", groups=frozenset({"physician"})
    )


def test_dn_keeps_the_certificate_rdn_order_and_multivalued_rdns():
    name = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "org")]),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "cern")]),
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, "jdoe"),
                    x509.NameAttribute(NameOID.USER_ID, "12345"),
                ]
            ),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.EMAIL_ADDRESS, "j@example.org")]),
        ]
    )
    assert slash_dn(name).startswith("/DC=org/DC=cern/")
    assert slash_dn(name).endswith("/emailAddress=j@example.org")
    assert "CN=jdoe+UID=12345" in slash_dn(name) or "UID=12345+CN=jdoe" in slash_dn(name)


@pytest.mark.parametrize("legacy", [False, True], ids=["rfc3820", "legacy"])
def test_proxy_chain_gives_the_end_entity_dn(pki, vomap, legacy):
    cert, key = _user(pki, "carol")
    chain, _ = make_proxy(cert, key, legacy=legacy)
    proxy = x509.load_pem_x509_certificates(chain)[0]
    assert slash_dn(proxy.subject).startswith("/C=XX/O=srm-dicom/CN=carol/CN=")
    identity = identity_from_cert_chain([chain], vomap)
    assert identity.subject == "/C=XX/O=srm-dicom/CN=carol"
    assert identity.groups == {"mia"}


def test_proxy_of_a_proxy_and_der_items(pki, vomap):
    cert, key = _user(pki, "alice")
    first, first_key = make_proxy(cert, key)
    first_proxy = x509.load_pem_x509_certificates(first)[0]
    second, _ = make_proxy(first_proxy.public_bytes(Encoding.PEM), first_key)
    second_proxy = x509.load_pem_x509_certificates(second)[0]
    ders = [c.public_bytes(Encoding.DER) for c in (second_proxy, first_proxy)] + [cert]
    identity = identity_from_cert_chain(ders, vomap)
    assert identity.subject == "/C=XX/O=srm-dicom/CN=alice"
    assert identity.groups == {"register"}


def test_chain_of_proxies_only_is_refused(pki, vomap):
    cert, key = _user(pki, "alice")
    chain, _ = make_proxy(cert, key)
    proxy_only = chain[: chain.index(b"-----END CERTIFICATE-----") + 26]
    with pytest.raises(AuthenticationError, match="no end-entity"):
        identity_from_cert_chain([proxy_only], vomap)


def test_vo_map_members_unknowns_and_services(pki, vomap):
    dave = identity_from_cert_chain([_user(pki, "dave")[0]], vomap)
    assert (dave.vo, dave.groups, dave.fqans) == ("demo", frozenset(), {"/demo"})
    eve = identity_from_cert_chain([_user(pki, "eve")[0]], vomap)
    assert (eve.vo, eve.fqans) == ("other", {"/other"})
    service = identity_from_cert_chain([(pki / "service" / "cert.pem").read_bytes()], vomap, services=[SERVICE_DN])
    assert (service.subject, service.kind, service.vo) == (SERVICE_DN, "service", None)


def test_garbage_chain_is_one_clear_error(vomap):
    with pytest.raises(AuthenticationError, match="not valid X.509"):
        identity_from_cert_chain([b"not a certificate"], vomap)


def test_vo_map_rejects_unknown_groups(tmp_path):
    path = tmp_path / "vomap.toml"
    path.write_text('[[user]]\ndn = "/C=XX/CN=x"\nvo = "demo"\ngroups = ["admin"]\n')
    with pytest.raises(ConfigError, match="unknown group 'admin'"):
        VoMap.load(path)


# --- WLCG bearer tokens ---------------------------------------------------------------


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


def test_certificates_are_not_limited_by_scopes(pki, vomap):
    identity = identity_from_cert_chain([_user(pki, "dave")[0]], vomap)
    assert identity.may_scope("read", "/grid/demo/anything")


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
    with pytest.raises(ConfigError, match="takes jwks and audience"):
        issuers_from_config({ISS: {"jwks": "j", "audience": AUD, "x": 1}}, tmp_path)
