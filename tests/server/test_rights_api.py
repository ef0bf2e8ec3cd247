"""The grid side's rights API and delete: owner and register group only, RFC 7807 refusals,
original UIDs never confirmed to others, and `mdm set-right` / `mdm del` from a grid client."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from https import request
from sites import write_site_config
from srm_dicom.cli import main
from srm_dicom.entry_key import key_name
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element

BOB = "/C=XX/O=srm-dicom/CN=bob"
DAVE = "/C=XX/O=srm-dicom/CN=dave"


@pytest.fixture(scope="module")
def site(orthanc, key_servers, tmp_path_factory) -> Iterator[tuple[RunningStorageElement, list]]:  # type: ignore[no-untyped-def]
    """A storage element whose images bob owns (he registered them)."""
    config_path = write_site_config(tmp_path_factory.mktemp("rights-api"), orthanc, key_servers)
    config_path.write_text(config_path.read_text().replace("[site]\n", f'[site]\nregistrar = "{BOB}"\n', 1))
    series = make_series(slices=6, size=16, seed="rights api")
    register(config_path, series)
    running = start_storage_element(config_path)
    try:
        yield running, series
    finally:
        running.stop()


def lfn(running: RunningStorageElement, ds, sop: str | None = None) -> str:  # type: ignore[no-untyped-def]
    secret = running.config.site.secret_bytes
    uids = [deidentify_uid(secret, u) for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID)]
    return "/grid/demo/mdm/" + "/".join([*uids, sop or deidentify_uid(secret, ds.SOPInstanceUID)])


def post(running: RunningStorageElement, pki: Path, user: str | None, path: str, body: object):  # type: ignore[no-untyped-def]
    return request(running.url, pki, user, "POST", path, json.dumps(body).encode(),
                   {"Content-Type": "application/json"})


def assert_problem(answer, status: int, words: str) -> None:  # type: ignore[no-untyped-def]
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/problem+json"
    problem = answer.json()
    assert problem["status"] == status and problem["title"] and words in problem["detail"]


def test_the_owner_changes_rights_and_they_hold_at_once(site, pki):
    running, series = site
    path = lfn(running, series[0])
    assert request(running.url, pki, "dave", "HEAD", path).status == 200
    answer = post(running, pki, "bob", "/api/v1/rights",
                  {"path": path, "mode": "rwx------", "metadata": "private",
                   "users": [{"dn": DAVE, "perms": "---", "metadata": "none"}]})
    assert answer.status == 200, answer.body
    assert answer.json() == {"entries": [{"path": path, "mode": "rwx------", "metadata": "private",
                                          "users": [{"dn": DAVE, "perms": "---", "metadata": "none"}]}]}
    assert request(running.url, pki, "dave", "HEAD", path).status == 404  # he may not list it: not there for him
    entry = running.catalog.namespace.lookup(path)
    assert (entry.mode, entry.metadata_mode) == (0o700, "private")


def test_others_are_refused_and_nothing_changes(site, pki):
    running, series = site
    path = lfn(running, series[1])
    for user in ("dave", "carol"):
        answer = post(running, pki, user, "/api/v1/rights", {"path": path, "mode": "rwxrwxrwx", "metadata": "public"})
        assert_problem(answer, 403, "owner and the register group only")
    # eve (another VO) may not list it: the answer is that of a name that does not exist
    answer = post(running, pki, "eve", "/api/v1/rights", {"path": path, "mode": "rwxrwxrwx", "metadata": "public"})
    assert_problem(answer, 404, "no such")
    assert_problem(post(running, pki, None, "/api/v1/rights", {"path": path, "mode": "rwxrwxrwx"}), 401, "required")
    entry = running.catalog.namespace.lookup(path)
    assert (entry.mode, entry.metadata_mode) == (0o750, "group")


def test_original_uids_are_mapped_for_the_owner_and_never_confirmed_to_others(site, pki):
    running, series = site
    ds = series[2]
    original = f"{ds.StudyInstanceUID},{ds.SeriesInstanceUID},{ds.SOPInstanceUID}"
    assert_problem(post(running, pki, "dave", "/api/v1/rights", {"path": original, "metadata": "public"}), 404,
                   "no such")
    named = ",".join(lfn(running, ds).split("/")[-3:])
    assert_problem(post(running, pki, "dave", "/api/v1/rights", {"path": named, "metadata": "public"}), 403, "may not")
    answer = post(running, pki, "bob", "/api/v1/rights", {"path": original, "metadata": "anonymous"})
    assert answer.status == 200 and answer.json()["entries"][0]["path"] == lfn(running, ds)
    assert ds.SOPInstanceUID not in answer.body.decode()


def test_a_whole_series_and_bad_requests(site, pki):
    running, series = site
    directory = lfn(running, series[0]).rsplit("/", 1)[0]
    answer = post(running, pki, "alice", "/api/v1/rights/", {"paths": [directory], "users": [
        {"dn": "/C=XX/O=srm-dicom/CN=eve", "perms": "r-x", "metadata": "anonymous"}]})
    assert answer.status == 200
    assert len(answer.json()["entries"]) == len(series) + 2  # every slice, the 3D and 3D.json
    assert_problem(post(running, pki, "bob", "/api/v1/rights", {"path": directory, "mode": "rwxrwxrw"}), 400,
                   "rwxr-x---")
    assert_problem(post(running, pki, "bob", "/api/v1/rights", {"path": directory}), 400, "nothing to change")
    assert_problem(post(running, pki, "bob", "/api/v1/rights", {"mode": "rwx------"}), 400, "'path'")
    assert_problem(request(running.url, pki, "bob", "GET", "/api/v1/rights"), 405, "POST")
    assert_problem(request(running.url, pki, "bob", "PUT", lfn(running, series[0]), b"x"), 405, "read-only")


def test_delete_by_the_register_group_only(site, pki, key_servers):
    running, series = site
    path = lfn(running, series[3])
    entry = running.catalog.namespace.lookup(path)
    assert_problem(post(running, pki, "dave", "/api/v1/delete", {"paths": [path]}), 403, "may not")
    answer = post(running, pki, "alice", "/api/v1/delete", {"paths": [path]})
    assert answer.status == 200 and answer.json() == {"deleted": [path]}
    assert running.catalog.namespace.lookup(path) is None
    assert request(running.url, pki, "alice", "HEAD", path).status == 404
    from srm_dicom.errors import NotFound
    from srm_dicom.keystore.client import KeystoreClient

    service = KeystoreClient.from_config(running.config)
    with pytest.raises(NotFound):
        service.fetch_key(key_name(entry.guid, entry.content_version), lambda key: True)


def client_config(running: RunningStorageElement, pki: Path, user: str, folder: Path) -> Path:
    path = folder / f"{user}.toml"
    path.write_text(
        f'[site]\nvo = "demo"\n\n[storage]\nurl = "{running.url}"\ntimeout = 30\n\n'
        f"[keystore]\nurls = {json.dumps(running.config.keystore.urls)}\n"
        f'ca = "{pki / "ca.pem"}"\ncert = "{pki / "users" / user / "cert.pem"}"\n'
        f'key = "{pki / "users" / user / "key.pem"}"\n'
    )
    return path


def run_mdm(config: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--config", str(config), *args])
    return code, out.getvalue(), err.getvalue()


def test_mdm_set_right_and_del_from_the_grid_side(site, pki, tmp_path):
    running, series = site
    bob, dave = client_config(running, pki, "bob", tmp_path), client_config(running, pki, "dave", tmp_path)
    local = tmp_path / "from-the-pacs.dcm"
    series[4].save_as(local, enforce_file_format=True)  # original UIDs: the storage element maps them
    code, out, err = run_mdm(bob, "set-right", "-f", str(local), "rwxr-xr-x", "public", "-u", DAVE, "--x", "none", "-v")
    assert code == 0, err
    assert out.startswith(f"{lfn(running, series[4])}  rwxr-xr-x public  {DAVE} --x none") and out.count("\n") == 1
    code, _, err = run_mdm(dave, "set-right", "-f", str(local), "rwxrwxrwx")
    assert code == 3 and "not found" in err  # dave may not learn that these original UIDs are here
    code, _, err = run_mdm(dave, "del", "-l", lfn(running, series[5]))
    assert code == 5 and "owner and the register group only" in err
    assert run_mdm(bob, "del", "-l", lfn(running, series[5]), "-v")[:2] == (0, f"removed {lfn(running, series[5])}"
                                                                                " (the image stays in the PACS)\n")
    assert running.catalog.namespace.lookup(lfn(running, series[5])) is None
