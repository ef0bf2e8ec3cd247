"""GET and HEAD of files: bytes true to the catalog, Range, Digest, rights, read-only, 503 while staging."""

import base64
import hashlib
import json
import time
import zlib

import pydicom
import pytest

from https import request
from sites import mdm, write_site_config
from srm_dicom.names import UidTriple
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import register, start_storage_element


def lfn_of(running, ds, sop=None):
    secret = running.config.site.secret_bytes
    triple = UidTriple(*(deidentify_uid(secret, u) for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID)),
                       sop or deidentify_uid(secret, ds.SOPInstanceUID))
    return triple.lfn("demo")


def test_get_stages_and_serves_the_bytes_the_catalog_describes(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[0])
    entry = running.catalog.namespace.lookup(lfn)
    assert running.stager.locality(entry) == "TAPE"
    answer = request(running.url, pki, "bob", path=lfn, headers={"Want-Digest": "adler32"})
    assert answer.status == 200, answer.body
    assert len(answer.body) == entry.size == int(answer.headers["content-length"])
    assert answer.headers["digest"] == f"adler32={zlib.adler32(answer.body):08x}" == f"adler32={entry.adler32}"
    assert running.stager.locality(entry) == "DISK_AND_TAPE"
    by_guid = request(running.url, pki, "bob", path=f"/guid/{entry.guid}")
    assert by_guid.body == answer.body


def test_head_answers_from_the_catalog_without_staging(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[1])
    entry = running.catalog.namespace.lookup(lfn)
    answer = request(running.url, pki, "bob", "HEAD", lfn, headers={"Want-Digest": "sha-512, ADLER32;q=0.9, md5;q=0"})
    assert answer.status == 200 and answer.body == b""
    assert answer.headers["content-length"] == str(entry.size)
    assert answer.headers["digest"] == f"adler32={entry.adler32}"  # md5 refused with q=0, sha-512 unknown
    assert running.stager.locality(entry) == "TAPE"


def test_md5_digest_on_a_staged_file(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[2])
    answer = request(running.url, pki, "bob", path=lfn, headers={"Want-Digest": "md5"})
    assert answer.headers["digest"] == "md5=" + base64.b64encode(hashlib.md5(answer.body).digest()).decode()


def test_ranges_single_suffix_multi_and_unsatisfiable(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[3])
    full = request(running.url, pki, "bob", path=lfn).body
    size = len(full)
    one = request(running.url, pki, "bob", path=lfn, headers={"Range": "bytes=10-19"})
    assert (one.status, one.body, one.headers["content-range"]) == (206, full[10:20], f"bytes 10-19/{size}")
    tail = request(running.url, pki, "bob", path=lfn, headers={"Range": "bytes=-5"})
    assert tail.body == full[-5:]
    multi = request(running.url, pki, "bob", path=lfn, headers={"Range": "bytes=0-3,100-103"})
    assert multi.status == 206 and multi.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(multi.headers["content-length"]) == len(multi.body)
    assert full[0:4] in multi.body and full[100:104] in multi.body
    assert f"Content-Range: bytes 100-103/{size}".encode() in multi.body
    beyond = request(running.url, pki, "bob", path=lfn, headers={"Range": f"bytes={size + 10}-"})
    assert beyond.status == 416 and beyond.headers["content-range"] == f"bytes */{size}"
    garbage = request(running.url, pki, "bob", path=lfn, headers={"Range": "bytes=abc"})
    assert garbage.status == 200 and garbage.body == full


def test_rights_decide_who_reads(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[4])
    for reader in ("bob", "carol", "dave", "alice"):
        assert request(running.url, pki, reader, "HEAD", lfn).status == 200, reader
    # eve (another VO) may not list it: she gets what a name that does not exist gets, no 403
    # that would tell her it does (issue 12, the existence oracle).
    refused = request(running.url, pki, "eve", path=lfn)
    missing = request(running.url, pki, "eve", path=lfn[:-3] + "999")
    assert refused.status == missing.status == 404 and refused.headers["content-type"] == "application/problem+json"
    assert json.loads(refused.body)["status"] == 404
    assert request(running.url, pki, "eve", "HEAD", lfn).status == 404
    for api, body in (("/api/v1/rights", {"path": lfn, "mode": "rwxrwxrwx"}), ("/api/v1/delete", {"paths": [lfn]})):
        refused = request(running.url, pki, "eve", "POST", api, json.dumps(body).encode())
        assert refused.status == 404, refused.body
    assert running.catalog.namespace.lookup(lfn) is not None
    anonymous = request(running.url, pki, None, path=lfn)
    assert anonymous.status == 401 and "certificate" in anonymous.json()["detail"]
    assert request(running.url, pki, "bob", path=lfn.replace("/grid/demo/", "/grid/demo/mdm/x/")).status == 404


@pytest.mark.parametrize("method", ["PUT", "DELETE", "MKCOL", "MOVE", "COPY", "PROPPATCH", "LOCK", "UNLOCK", "POST"])
def test_every_write_is_refused_and_changes_nothing(storage_element, pki, method):
    running, series = storage_element
    lfn = lfn_of(running, series[5])
    before = running.catalog.namespace.lookup(lfn)
    answer = request(running.url, pki, "alice", method, lfn, body=b"x", headers={"Destination": running.url + "/x"})
    assert answer.status == 405 and answer.headers["allow"] == "GET, HEAD, OPTIONS, PROPFIND"
    assert answer.json()["status"] == 405
    assert running.catalog.namespace.lookup(lfn) == before


def test_a_get_that_outlasts_the_wait_answers_503_with_retry_after_then_serves(embedded_pacs, key_servers, pki,
                                                                               tmp_path):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers, wait_timeout=0.0)
    series = make_series(slices=4, size=16, seed="slow")
    register(config_path, series)
    running = start_storage_element(config_path)
    try:
        lfn = lfn_of(running, series[0], sop="3D")
        first = request(running.url, pki, "bob", path=lfn)
        assert first.status == 503 and first.headers["retry-after"] == "1"
        assert first.headers["content-type"] == "application/problem+json"
        assert "being staged" in first.json()["detail"]
        for _ in range(100):
            later = request(running.url, pki, "bob", path=lfn)
            if later.status == 200:
                break
            time.sleep(0.1)
        assert later.status == 200 and len(later.body) == running.catalog.namespace.lookup(lfn).size
    finally:
        running.stop()


def test_a_volume_is_listed_with_its_true_size_before_its_first_assembly(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[0], sop="3D")
    announced = running.catalog.namespace.lookup(lfn)
    assert announced.size is not None and announced.adler32 is None
    head = request(running.url, pki, "bob", "HEAD", lfn)
    assert head.headers["content-length"] == str(announced.size)
    answer = request(running.url, pki, "bob", path=lfn, headers={"Want-Digest": "adler32"})
    assert answer.status == 200 and len(answer.body) == announced.size
    assert answer.headers["digest"] == f"adler32={zlib.adler32(answer.body):08x}"
    assert running.catalog.namespace.lookup(lfn).adler32 == f"{zlib.adler32(answer.body):08x}"


def test_a_grid_user_decrypts_a_download_named_by_its_lfn_or_uids(storage_element, key_servers, pki, tmp_path):
    running, series = storage_element
    ds = series[7]
    lfn = lfn_of(running, ds)
    encrypted = tmp_path / "download.enc"
    encrypted.write_bytes(request(running.url, pki, "bob", path=lfn).body)
    client = tmp_path / "bob.toml"
    bob = pki / "users" / "bob"
    client.write_text(
        f'[site]\nvo = "demo"\n[storage]\nurl = "{running.url}"\n[keystore]\nurls = {json.dumps(key_servers.urls)}\n'
        f'ca = "{pki / "ca.pem"}"\ncert = "{bob / "cert.pem"}"\nkey = "{bob / "key.pem"}"\n'
    )
    triple = ",".join(lfn.split("/")[-3:])
    for name, identifier in (("by-lfn.dcm", lfn), ("by-uids.dcm", triple)):
        result = mdm("decrypt", identifier, str(encrypted), str(tmp_path / name), config=client)
        assert result.returncode == 0, result.stderr
        assert pydicom.dcmread(tmp_path / name).PixelData == ds.PixelData
    other = lfn_of(running, series[6])
    mixed = mdm("decrypt", other, str(encrypted), str(tmp_path / "mixed.dcm"), config=client)
    assert mixed.returncode == 2 and "but the file belongs to" in mixed.stderr


def test_many_and_overlapping_ranges_cost_the_file_once_at_most(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[6])
    full = request(running.url, pki, "bob", path=lfn).body
    size = len(full)
    overlapping = request(running.url, pki, "bob", path=lfn, headers={"Range": "bytes=" + ",".join(["0-"] * 100)})
    assert overlapping.status == 206 and overlapping.body == full  # 100 times the whole file: one range
    assert overlapping.headers["content-range"] == f"bytes 0-{size - 1}/{size}"
    adjacent = request(running.url, pki, "bob", path=lfn, headers={"Range": "bytes=20-29,0-9,10-19,5-7"})
    assert adjacent.status == 206 and adjacent.body == full[0:30]
    many = ",".join(f"{n * 10}-{n * 10 + 1}" for n in range(40))  # 40 disjoint ranges: served whole instead
    whole = request(running.url, pki, "bob", path=lfn, headers={"Range": f"bytes={many}"})
    assert whole.status == 200 and whole.body == full
    huge = request(running.url, pki, "bob", path=lfn, headers={"Range": "bytes=99999999999999999999999-"})
    assert huge.status == 200 and huge.body == full  # malformed (beyond 19 digits): ignored


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_rfc_3230_and_9530_digests_on_head_and_get_from_the_catalog(storage_element, pki):
    running, series = storage_element
    lfn = lfn_of(running, series[7])
    entry = running.catalog.namespace.lookup(lfn)
    want = {"Want-Digest": "sha-256", "Want-Repr-Digest": "sha-512=3, sha-256=9, adler=1, md5=5",
            "Want-Content-Digest": "sha-256=1"}
    head = request(running.url, pki, "bob", "HEAD", lfn, headers=want)  # not staged: what the catalog knows
    assert running.stager.locality(entry) == "TAPE"
    got = request(running.url, pki, "bob", path=lfn, headers=want)
    body = got.body
    sha256, adler = hashlib.sha256(body).digest(), zlib.adler32(body).to_bytes(4, "big")
    assert entry.sha256 == sha256.hex()  # recorded at registration
    assert head.headers["digest"] == got.headers["digest"] == f"sha-256={b64(sha256)}"
    assert head.headers["repr-digest"] == f"sha-256=:{b64(sha256)}:, adler=:{b64(adler)}:"
    assert head.headers["content-digest"] == f"sha-256=:{b64(sha256)}:"
    sha512 = hashlib.sha512(body).digest()
    assert got.headers["repr-digest"] == f"sha-256=:{b64(sha256)}:, sha-512=:{b64(sha512)}:, adler=:{b64(adler)}:"
    part = request(running.url, pki, "bob", path=lfn, headers={**want, "Range": "bytes=10-99"})
    assert part.status == 206 and part.body == body[10:100]
    assert part.headers["content-digest"] == f"sha-256=:{b64(hashlib.sha256(body[10:100]).digest())}:"
    assert part.headers["repr-digest"] == got.headers["repr-digest"]  # the file's, not the range's
    alone = request(running.url, pki, "bob", "HEAD", lfn, headers={"Want-Digest": "adler32"})
    assert alone.headers["digest"] == f"adler32={zlib.adler32(body):08x}" and "repr-digest" not in alone.headers
    nothing = request(running.url, pki, "bob", "HEAD", lfn, headers={"Want-Repr-Digest": "sha-256=0, crc32c=5, ;;="})
    assert nothing.status == 200 and "repr-digest" not in nothing.headers


def test_a_volume_records_its_sha256_at_first_assembly(storage_element, pki):
    running, series = storage_element
    volume = lfn_of(running, series[0], sop="3D")
    assert running.catalog.namespace.lookup(volume).sha256 is None
    got = request(running.url, pki, "bob", path=volume, headers={"Want-Repr-Digest": "sha-256=1"})
    assert got.status == 200, got.body
    sha256 = hashlib.sha256(got.body).digest()
    assert running.catalog.namespace.lookup(volume).sha256 == sha256.hex()
    assert got.headers["repr-digest"] == f"sha-256=:{b64(sha256)}:"
