"""The PostgreSQL catalog going down under a running storage element: every front-end call
that needs it answers 503 with Retry-After and an RFC 7807 body (never a 500), and the
service recovers by itself when the database is back. The fault is real: PostgreSQL
refuses connections to the database and its sessions are terminated, as in a restart."""

import json
import time

import psycopg
import pytest

import postgres
from https import request
from sites import write_site_config
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import register, start_storage_element

SECRET = b"test site secret, not for production"


def set_database_up(name: str, up: bool) -> None:
    with psycopg.connect(postgres.SERVER, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(up).lower()}')
        if not up:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))


@pytest.fixture
def site_on_postgres(embedded_pacs, key_servers, tmp_path):
    with postgres.database() as url:
        config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
        text = config_path.read_text().replace('url = "catalog.db"', f'backend = "postgresql"\nurl = "{url}"')
        config_path.write_text(text)
        series = make_series(slices=2, size=16, seed="pg")
        register(config_path, series)
        running = start_storage_element(config_path)
        try:
            yield running, series, url.rsplit("/", 1)[1]
        finally:
            set_database_up(url.rsplit("/", 1)[1], True)
            running.stop()


def test_database_down_is_503_with_retry_after_and_recovery_needs_no_restart(site_on_postgres, pki):
    running, series, name = site_on_postgres
    ds = series[0]
    study, sop = (deidentify_uid(SECRET, u) for u in (ds.StudyInstanceUID, ds.SOPInstanceUID))
    lfn = f"/grid/demo/mdm/{study}/{deidentify_uid(SECRET, ds.SeriesInstanceUID)}/{sop}"
    first = request(running.url, pki, "bob", path=lfn)
    assert first.status == 200

    set_database_up(name, False)
    stage = json.dumps({"files": [{"path": lfn}]}).encode()
    for method, path, body in (("GET", lfn, None), ("HEAD", lfn, None), ("PROPFIND", lfn, None),
                               ("POST", "/api/v1/tape/stage", stage)):
        answer = request(running.url, pki, "bob", method=method, path=path, body=body, headers={"Depth": "0"})
        assert answer.status == 503, (method, answer.status, answer.body[:200])
        assert int(answer.headers["retry-after"]) > 0
        if method != "HEAD":
            problem = answer.json()
            assert answer.headers["content-type"] == "application/problem+json"
            assert problem["status"] == 503 and "catalog database" in problem["detail"]
            assert "postgres@" not in problem["detail"]  # no user names in answers

    set_database_up(name, True)
    deadline = time.monotonic() + 60
    while (again := request(running.url, pki, "bob", path=lfn)).status == 503 and time.monotonic() < deadline:
        time.sleep(float(again.headers["retry-after"]) / 5)  # a client retrying, a little faster than told
    assert again.status == 200 and again.body == first.body
