"""Macaroons at the storage element, as dCache answers them: requested by a certificate user
with POST application/macaroon-request, then used by anyone as a bearer credential within
their caveats and never beyond their issuer's rights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from https import Answer, request
from sites import write_site_config
from srm_dicom.rights import parse_mode
from srm_dicom.setright import RightsChange, RightsSetter
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element


@dataclass
class MacaroonSite:
    se: RunningStorageElement
    pki: Path
    lfns: list[str]  # lfns[-1] is private to its owner (rwx------)

    def ask(self, user: str, path: str, body: object, content_type: str = "application/macaroon-request") -> Answer:
        return request(self.se.url, self.pki, user, "POST", path, json.dumps(body).encode(),
                       {"Content-Type": content_type})

    def macaroon(self, user: str, path: str, caveats: list[str], validity: str = "PT10M") -> str:
        answer = self.ask(user, path, {"caveats": caveats, "validity": validity})
        assert answer.status == 200, answer.body
        return answer.json()["macaroon"]  # type: ignore[index]

    def bearer(self, macaroon: str, method: str, path: str, body: object = None,
               headers: dict[str, str] | None = None) -> Answer:
        data = None if body is None else json.dumps(body).encode()
        return request(self.se.url, self.pki, None, method, path, data,
                       {"Authorization": f"Bearer {macaroon}", **(headers or {})})


@pytest.fixture(scope="module")
def site(orthanc, key_servers, tmp_path_factory) -> Iterator[MacaroonSite]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("macaroons")
    config_path = write_site_config(workdir, orthanc, key_servers)
    config_path.write_text(config_path.read_text() + "\n[tokens]\nmacaroon_max_lifetime = 1800\n")
    series = make_series(slices=3, size=16, seed="macaroons")
    register(config_path, series)
    se = start_storage_element(config_path)
    secret = se.config.site.secret_bytes
    lfns = ["/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u) for u in
                                         (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
            for ds in series]
    private = se.catalog.namespace.lookup(lfns[-1])
    assert private is not None
    RightsSetter.from_config(se.config, se.catalog).apply([private], RightsChange(parse_mode("rwx------"), "private",
                                                                                   ()))
    try:
        yield MacaroonSite(se, key_servers.pki, lfns)
    finally:
        se.stop()


def test_a_macaroon_request_answers_as_dcache_does(site):
    answer = site.ask("bob", site.lfns[0], {"caveats": ["activity:DOWNLOAD,LIST"], "validity": "PT60M"})
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    data = answer.json()
    macaroon = data["macaroon"]  # type: ignore[index]
    target = urlsplit(data["uri"]["targetWithMacaroon"])  # type: ignore[index]
    base = urlsplit(data["uri"]["baseWithMacaroon"])  # type: ignore[index]
    assert target.path == site.lfns[0] and base.path == "/"
    assert target.query == base.query and target.query.startswith("authz=")
    served = site.bearer(macaroon, "GET", site.lfns[0])
    by_certificate = request(site.se.url, site.pki, "bob", "GET", site.lfns[0])
    assert served.status == 200 and served.body == by_certificate.body
    assert request(site.se.url, site.pki, None, "GET", f"{target.path}?{target.query}").body == served.body


def test_a_macaroon_reaches_only_its_path_and_activities(site):
    download = site.macaroon("bob", site.lfns[0], ["activity:DOWNLOAD"])
    assert site.bearer(download, "HEAD", site.lfns[0]).status == 200
    assert site.bearer(download, "GET", site.lfns[1]).status in (403, 404)
    assert site.bearer(download, "POST", "/api/v1/tape/stage", {"files": [{"path": site.lfns[0]}]}).status == 403
    directory = site.lfns[0].rsplit("/", 1)[0]
    lister = site.macaroon("bob", directory, ["activity:LIST"])
    listing = site.bearer(lister, "PROPFIND", directory, headers={"Depth": "1"})
    assert listing.status == 207 and site.lfns[1].encode() in listing.body
    assert site.bearer(lister, "GET", site.lfns[1]).status == 403
    stager = site.macaroon("bob", directory, ["activity:STAGE"])
    staged = site.bearer(stager, "POST", "/api/v1/tape/stage", {"files": [{"path": site.lfns[1]}]})
    assert staged.status == 201, staged.body
    request_id = staged.json()["requestId"]  # type: ignore[index]
    assert request(site.se.url, site.pki, "bob", "GET", f"/api/v1/tape/stage/{request_id}").status == 200
    assert site.bearer(stager, "GET", f"/api/v1/tape/stage/{request_id}").status == 200


def test_a_macaroon_never_gives_more_than_its_issuer_had(site):
    bobs = site.macaroon("bob", "/grid/demo/mdm", ["activity:DOWNLOAD,LIST,READ_METADATA"])
    assert site.bearer(bobs, "GET", site.lfns[-1]).status in (403, 404)  # private: bob may not read it
    alices = site.macaroon("alice", "/grid/demo/mdm", ["activity:DOWNLOAD,LIST,READ_METADATA"])
    assert request(site.se.url, site.pki, "alice", "GET", site.lfns[-1]).status == 200  # register reads all
    assert site.bearer(alices, "GET", site.lfns[-1]).status in (403, 404)  # a macaroon carries no register
    assert site.bearer(alices, "POST", "/api/v1/delete", {"paths": [site.lfns[0]]}).status == 403
    assert site.bearer(alices, "POST", site.lfns[0], {"caveats": []}, {"Content-Type":
                                                                       "application/macaroon-request"}).status == 403


def test_expired_or_tampered_macaroons_are_401(site):
    macaroon = site.macaroon("bob", site.lfns[0], ["activity:DOWNLOAD", "before:2020-01-01T00:00:00Z"])
    answer = site.bearer(macaroon, "GET", site.lfns[0])
    assert answer.status == 401 and 'error="invalid_token"' in answer.headers["www-authenticate"]
    good = site.macaroon("bob", site.lfns[0], ["activity:DOWNLOAD"])
    assert site.bearer(good[:-6] + "AAAAAA", "GET", site.lfns[0]).status == 401


def test_bad_macaroon_requests_are_problems(site):
    for body in ({"caveats": ["activity:UPLOAD"]}, {"validity": "soon"}, {"caveats": "x"}):
        answer = site.ask("bob", site.lfns[0], body)
        assert answer.status == 400 and answer.json()["status"] == 400  # type: ignore[index]
    assert site.ask("eve", site.lfns[0], {}).status == 404  # eve does not see the file
    assert site.ask(None, site.lfns[0], {}).status == 401  # type: ignore[arg-type]


def test_an_unknown_post_never_answers_with_file_bytes(site):
    served = request(site.se.url, site.pki, "bob", "GET", site.lfns[0]).body
    for content_type in ("application/octet-stream", "application/json", "text/plain", ""):
        answer = site.ask("bob", site.lfns[0], {"caveats": []}, content_type)
        assert answer.status == 405 and served not in answer.body
        assert answer.headers["content-type"] == "application/problem+json"


def test_the_openapi_document_describes_the_macaroon_request(site):
    """What a client author reads at /api/v1/openapi.json: the POST, its media type, and the
    body and answer schemas that a real request and answer fit."""
    document = request(site.se.url, site.pki, None, path="/api/v1/openapi.json").json()
    operation = document["paths"]["/{lfn}"]["post"]  # type: ignore[index]
    schema = operation["requestBody"]["content"]["application/macaroon-request"]["schema"]
    assert schema == {"$ref": "#/components/schemas/MacaroonRequest"}
    schemas = document["components"]["schemas"]  # type: ignore[index]
    body = {"caveats": ["activity:DOWNLOAD,LIST"], "validity": "PT60M"}
    assert set(body) == set(schemas["MacaroonRequest"]["properties"])
    answer = site.ask("bob", site.lfns[0], body)
    assert answer.status == 200, answer.body
    found = answer.json()
    macaroon, uri = schemas["Macaroon"], schemas["Macaroon"]["properties"]["uri"]
    assert set(found) == set(macaroon["required"]) and set(found["uri"]) == set(uri["required"])  # type: ignore[arg-type, index]
    assert {"200", "400", "401", "403", "404"} <= set(operation["responses"])
