"""WLCG tokens at the storage element: the demo's issuer (OpenID discovery on loopback), the
profile's scopes against real requests, and every refusal a 401/403 RFC 7807 problem with an
RFC 6750 ``WWW-Authenticate: Bearer`` challenge, never a 500 (a file out of a token's reach
is a 404, as for every caller who may not list it: its existence is not told)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from https import Answer, request
from peers import free_port
from sites import mdm, write_site_config
from srm_dicom.issuer import KEY_ID, DemoIssuer
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element

BOB = "/C=XX/O=srm-dicom/CN=bob"


@dataclass
class TokenSite:
    se: RunningStorageElement
    pki: Path
    issuer: DemoIssuer
    lfns: list[str]

    def call(self, token: str | None, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> Answer:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        return request(self.se.url, self.pki, None, method, path, data, headers)


@pytest.fixture(scope="module")
def site(orthanc, key_servers, tmp_path_factory) -> Iterator[TokenSite]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("tokens")
    config_path = write_site_config(workdir, orthanc, key_servers)
    port = free_port()
    issuer = DemoIssuer.create(workdir / "issuer", f"http://127.0.0.1:{port}", "https://se.tokens.test", "/grid/demo")
    issuer_server = issuer.serve("127.0.0.1", port)  # keys found by discovery: no jwks in the config
    entry = f'issuers = {{ "{issuer.iss}" = {{ audience = "{issuer.audience}", base_path = "/grid/demo" }} }}'
    config_path.write_text(config_path.read_text().replace("[identity]\n", f"[identity]\n{entry}\n", 1))
    series = make_series(slices=3, size=16, seed="tokens")
    register(config_path, series)
    se = start_storage_element(config_path)
    secret = se.config.site.secret_bytes
    lfns = ["/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u) for u in
                                         (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
            for ds in series]
    try:
        yield TokenSite(se, key_servers.pki, issuer, lfns)
    finally:
        se.stop()
        issuer_server.shutdown()
        issuer_server.server_close()


def assert_refused(answer: Answer, status: int, error: str | None) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/problem+json"
    if answer.body:  # a HEAD answer has none
        assert answer.json()["status"] == status  # type: ignore[index]
    challenge = answer.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="srm-dicom"')
    if error is None:
        assert "error=" not in challenge
    else:
        assert f'error="{error}"' in challenge


def test_a_discovered_issuers_token_reads_within_its_scope(site):
    token = site.issuer.mint("researcher", ("storage.read:/mdm",))
    answer = site.call(token, "GET", site.lfns[0])
    assert answer.status == 200 and len(answer.body) > 0


def test_scope_paths_are_matched_a_component_at_a_time(site):
    study = site.lfns[0].split("/")[4]
    assert site.call(site.issuer.mint("r", (f"storage.read:/mdm/{study}",)), "HEAD", site.lfns[0]).status == 200
    narrower = site.issuer.mint("r", (f"storage.read:/mdm/{study[:-1]}",))
    assert site.call(narrower, "GET", site.lfns[0]).status == 404  # out of its reach: as if absent


def test_stage_does_not_imply_read_nor_read_stage(site):
    stager = site.issuer.mint("s1", ("storage.stage:/",))
    reader = site.issuer.mint("s1", ("storage.read:/",))
    assert_refused(site.call(stager, "GET", site.lfns[1]), 403, "insufficient_scope")
    refused = site.call(reader, "POST", "/api/v1/tape/stage", {"files": [{"path": site.lfns[1]}]})
    assert_refused(refused, 403, "insufficient_scope")
    staged = site.call(stager, "POST", "/api/v1/tape/stage", {"files": [{"path": site.lfns[1]}]})
    assert staged.status == 201, staged.body
    request_id = staged.json()["requestId"]  # type: ignore[index]
    poller = site.issuer.mint("s1", ("storage.poll:/mdm",))
    assert site.call(poller, "GET", f"/api/v1/tape/stage/{request_id}").status == 200
    assert site.call(poller, "POST", "/api/v1/tape/archiveinfo", {"paths": [site.lfns[1]]}).json()[0]["locality"]
    # The same scopes for another sub, and a certificate user, are someone else.
    assert_refused(site.call(site.issuer.mint("s2", ("storage.poll:/",)), "GET", f"/api/v1/tape/stage/{request_id}"),
                   403, "insufficient_scope")


def test_a_token_whose_sub_is_a_dn_never_acts_as_that_dn(site):
    staged = request(site.se.url, site.pki, "bob", "POST", "/api/v1/tape/stage",
                     json.dumps({"files": [{"path": site.lfns[2]}]}).encode())
    assert staged.status == 201
    request_id = staged.json()["requestId"]  # type: ignore[index]
    impostor = site.issuer.mint(BOB, ("storage.stage:/", "storage.poll:/", "storage.read:/"),
                                ("/demo", "/demo/register", "/demo/physician"))
    assert site.call(impostor, "DELETE", f"/api/v1/tape/stage/{request_id}").status == 403
    assert site.call(impostor, "GET", f"/api/v1/tape/stage/{request_id}").status == 403
    rights = site.call(impostor, "POST", "/api/v1/rights", {"path": site.lfns[2], "mode": "rwxrwxrwx"})
    assert_refused(rights, 403, "insufficient_scope")
    assert request(site.se.url, site.pki, "bob", "GET", f"/api/v1/tape/stage/{request_id}").status == 200


def test_capability_scopes_win_over_groups(site):
    elsewhere = site.issuer.mint("g", ("storage.read:/elsewhere",), ("/demo", "/demo/physician"))
    assert site.call(elsewhere, "GET", site.lfns[0]).status == 404
    member = site.issuer.mint("g", ("openid",), ("/demo",))  # no storage scope: a VO member (rwxr-x---)
    assert site.call(member, "HEAD", site.lfns[0]).status == 200


def _forged(site: TokenSite, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": site.issuer.iss, "sub": "x", "aud": site.issuer.audience, "iat": now, "exp": now + 600,
            "scope": "storage.read:/", **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, site.issuer._key(),  # noqa: SLF001
                      algorithm="ES256", headers={"kid": KEY_ID})


@pytest.mark.parametrize(
    "case",
    ["expired", "exp as a string", "iat as a string", "wrong audience", "untrusted issuer", "not a JWT",
     "alg of another key type", "scope without a path", "not valid yet"],
)
def test_every_bad_token_is_a_401_with_invalid_token(site, case):
    now = int(time.time())
    token = {
        "expired": lambda: _forged(site, exp=now - 3600),
        "exp as a string": lambda: _forged(site, exp=str(now + 600)),
        "iat as a string": lambda: _forged(site, iat=str(now)),
        "wrong audience": lambda: _forged(site, aud="https://elsewhere.test"),
        "untrusted issuer": lambda: _forged(site, iss="https://rogue.test"),
        "not a JWT": lambda: "a.b.c",
        "alg of another key type": lambda: jwt.encode(
            {"iss": site.issuer.iss, "sub": "x", "aud": site.issuer.audience, "exp": now + 600},
            rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256",
            headers={"kid": KEY_ID}),
        "scope without a path": lambda: _forged(site, scope="storage.read"),
        "not valid yet": lambda: _forged(site, nbf=now + 3600),
    }[case]()
    for method, path in (("GET", site.lfns[0]), ("PROPFIND", "/grid/demo/mdm"), ("GET", "/api/v1/metadata?q=")):
        assert_refused(site.call(token, method, path, headers={"Depth": "0"}), 401, "invalid_token")


def test_no_credential_is_a_401_challenge_without_an_error_code(site):
    assert_refused(site.call(None, "GET", site.lfns[0]), 401, None)


def test_an_empty_bearer_is_a_400_invalid_request(site):
    answer = request(site.se.url, site.pki, None, "GET", site.lfns[0], None, {"Authorization": "Bearer "})
    assert_refused(answer, 400, "invalid_request")


def test_mdm_token_mints_what_the_site_accepts(site):
    config = site.se.config_path
    minted = mdm("token", "bob", "--scope", "storage.read:/mdm", "--lifetime", "PT5M", config=config)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["sub"] == "bob" and claims["wlcg.groups"] == ["/demo", "/demo/physician"]
    assert claims["exp"] - claims["iat"] == 300 and claims["scope"] == "storage.read:/mdm"
    assert site.call(token, "HEAD", site.lfns[0]).status == 200
    alice = mdm("token", "alice", config=config)
    assert jwt.decode(alice.stdout.strip(), options={"verify_signature": False})["wlcg.groups"] == ["/demo"]
    assert mdm("token", "bob", "--lifetime", "P30D", config=config).returncode == 2
