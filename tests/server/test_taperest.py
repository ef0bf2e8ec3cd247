"""WLCG Tape REST API v1 as gfal2, dCache and StoRM clients use it; the PACS plays the tape."""

import json
import time

import pytest

from https import request
from srm_dicom.uids import deidentify_uid


def slice_lfns(running, series):
    secret = running.config.site.secret_bytes
    study, serie = (deidentify_uid(secret, series[0].StudyInstanceUID),
                    deidentify_uid(secret, series[0].SeriesInstanceUID))
    return [f"/grid/demo/mdm/{study}/{serie}/{deidentify_uid(secret, ds.SOPInstanceUID)}" for ds in series]


def call(running, pki, user, method, path, data=None):
    body = json.dumps(data).encode() if data is not None else None
    return request(running.url, pki, user, method, path, body=body, headers={"Content-Type": "application/json"})


def wait_completed(running, pki, user, request_id, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = call(running, pki, user, "GET", f"/api/v1/tape/stage/{request_id}").json()
        if "completedAt" in status:
            return status
        time.sleep(0.1)
    raise AssertionError(f"stage request {request_id} not completed: {status}")


def test_discovery_document(storage_element, pki):
    running, _ = storage_element
    answer = request(running.url, pki, None, path="/.well-known/wlcg-tape-rest-api")
    document = answer.json()
    assert answer.status == 200 and document["sitename"] == "srm-dicom"
    assert document["endpoints"] == [{"uri": f"{running.url}/api/v1/tape", "version": "v1"}]


@pytest.mark.parametrize("slash", ["", "/"])
def test_stage_status_archiveinfo_release_with_and_without_trailing_slash(storage_element, pki, slash):
    running, series = storage_element
    lfns = slice_lfns(running, series)[:3]
    info = call(running, pki, "bob", "POST", f"/api/v1/tape/archiveinfo{slash}", {"paths": lfns, "extra": 1}).json()
    assert [i["locality"] for i in info] == ["TAPE"] * 3
    created = call(running, pki, "bob", "POST", f"/api/v1/tape/stage{slash}",
                   {"files": [{"path": p, "diskLifetime": "PT1H", "targetedMetadata": {}} for p in lfns]})
    assert created.status == 201
    request_id = created.json()["requestId"]
    assert created.headers["location"] == f"/api/v1/tape/stage/{request_id}"
    status = wait_completed(running, pki, "bob", request_id)
    assert status["id"] == request_id and {"createdAt", "startedAt", "completedAt"} <= set(status)
    assert [f["path"] for f in status["files"]] == lfns
    assert all(f["state"] == "COMPLETED" and f["onDisk"] for f in status["files"])
    info = call(running, pki, "bob", "POST", "/api/v1/tape/archiveinfo", {"paths": [*lfns, "/grid/demo/mdm/1/2/3"]})
    assert [i.get("locality") for i in info.json()] == ["DISK_AND_TAPE"] * 3 + [None]
    assert info.json()[-1]["error"] == "no such file"
    assert call(running, pki, "bob", "POST", f"/api/v1/tape/release/{request_id}", {"paths": lfns[:1]}).status == 200
    assert call(running, pki, "bob", "DELETE", f"/api/v1/tape/stage/{request_id}").status == 200
    assert call(running, pki, "bob", "GET", f"/api/v1/tape/stage/{request_id}").status == 404


def test_cancel_and_the_gfal_evict_placeholder(storage_element, pki):
    running, series = storage_element
    lfns = slice_lfns(running, series)[3:6]
    request_id = call(running, pki, "bob", "POST", "/api/v1/tape/stage", {"files": [{"path": p} for p in lfns]}
                      ).json()["requestId"]
    assert call(running, pki, "bob", "POST", f"/api/v1/tape/stage/{request_id}/cancel", {"paths": lfns[2:]}
                ).status == 200
    status = wait_completed(running, pki, "bob", request_id)
    assert status["files"][2]["state"] in ("CANCELLED", "COMPLETED")
    evicted = call(running, pki, "bob", "POST", "/api/v1/tape/release/gfal2-placeholder-id", {"paths": lfns[:1]})
    assert evicted.status == 200


def test_others_requests_and_files_are_not_theirs_to_see(storage_element, pki):
    running, series = storage_element
    lfns = slice_lfns(running, series)[6:7]
    request_id = call(running, pki, "bob", "POST", "/api/v1/tape/stage", {"files": [{"path": lfns[0]}]}
                      ).json()["requestId"]
    assert call(running, pki, "carol", "GET", f"/api/v1/tape/stage/{request_id}").status == 403
    refused = call(running, pki, "eve", "POST", "/api/v1/tape/stage", {"files": [{"path": lfns[0]}]})
    assert refused.status == 404 and refused.json()["title"] == "Not Found"
    assert call(running, pki, "eve", "POST", "/api/v1/tape/archiveinfo", {"paths": lfns}).json()[0]["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/api/v1/tape/stage", b"{not json", 400),
        ("POST", "/api/v1/tape/stage", b"[]", 400),
        ("POST", "/api/v1/tape/stage", b'{"files": []}', 400),
        ("POST", "/api/v1/tape/stage", b'{"files": [{"path": 1}]}', 400),
        ("POST", "/api/v1/tape/stage", b'{"files": [{"path": "/grid/demo/mdm/1/2/3", "diskLifetime": "soon"}]}', 404),
        ("GET", "/api/v1/tape/stage/nope", None, 404),
        ("POST", "/api/v1/tape/archiveinfo", b'{"paths": "x"}', 400),
        ("PATCH", "/api/v1/tape/stage", b"{}", 404),
    ],
)
def test_bad_requests_get_problems_never_a_500(storage_element, pki, method, path, body, status):
    running, _ = storage_element
    answer = request(running.url, pki, "bob", method, path, body=body, headers={"Content-Type": "application/json"})
    assert answer.status == status
    assert answer.headers["content-type"] == "application/problem+json" and answer.json()["status"] == status


# -- hostile bodies (issue 12, finding 4): 400/413 with a problem body, never a 500 -----------


def raw_call(running, pki, path, body: bytes):
    return request(running.url, pki, "bob", "POST", path, body=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("path", ["/api/v1/tape/stage", "/api/v1/tape/archiveinfo", "/api/v1/tape/release/x",
                                  "/api/v1/rights", "/api/v1/delete"])
def test_deep_huge_and_malformed_json_bodies_are_refused(storage_element, pki, path):
    running, _ = storage_element
    deep = b'{"paths": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    nested = b'{"files": [' + b'{"a":' * 40 + b"1" + b"}" * 40 + b"]}"
    huge_number = b'{"paths": [' + b"9" * 5000 + b"]}"
    for body in (deep, nested, huge_number, b"\xff\xfe{", b"[]", b'{"paths": [1]}'):
        answer = raw_call(running, pki, path, body)
        assert answer.status == 400 and answer.headers["content-type"] == "application/problem+json", (
            path, body[:40], answer.body)
    # A body over [server] max_body_size is refused from its Content-Length, before it is sent.
    too_big = request(running.url, pki, "bob", "POST", path, headers={"Content-Length": str(9 << 20)})
    assert too_big.status == 413 and too_big.headers["content-type"] == "application/problem+json"


def test_disk_lifetime_beyond_any_clock_is_shortened_not_a_500(storage_element, pki):
    running, series = storage_element
    lfn = slice_lfns(running, series)[0]
    for lifetime in (10 ** 30, "P999999999D", f"PT{10 ** 12}S"):
        answer = call(running, pki, "bob", "POST", "/api/v1/tape/stage",
                      {"files": [{"path": lfn, "diskLifetime": lifetime}]})
        assert answer.status == 201, (lifetime, answer.body)
    for bad in (-1, True, 1.5, "P" + "9" * 5000 + "D", "forever"):
        answer = call(running, pki, "bob", "POST", "/api/v1/tape/stage",
                      {"files": [{"path": lfn, "diskLifetime": bad}]})
        assert answer.status == 400 and answer.json()["status"] == 400, (bad, answer.body)
