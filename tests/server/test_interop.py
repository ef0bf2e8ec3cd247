"""The storage element (``srm_dicom.server`` behind cheroot, the real stager) against the
real clients grid jobs use: curl, davix, gfal2, rclone and ``mdm get``, with Orthanc and
with DCMTK dcmqrscp as the PACS. Every downloaded file is checked against the catalog
(size, adler32) and decrypted as a reader would, down to the pixels of the source series.
Grid users' VOMS proxies come from Debian's real ``voms-proxy-fake`` and go over HTTPS as
the tool writes them (curl's --cert and --key, ``mdm get``'s cert and key).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import nibabel
import numpy as np
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import clients
from clients import Credential
from sites import mdm, write_site_config
from srm_dicom.catalog import Entry
from srm_dicom.cli import main
from srm_dicom.pki import init_pki, init_voms
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element
from vomsfake import VO, VOMS_HOST, fake_proxy, trust_voms

SLICES = 8
SIZE = 32
ISSUER = "https://issuer.test"
AUDIENCE = "https://storage.test"


@dataclass
class Site:
    """A running storage element over a PACS holding one registered synthetic series."""

    se: RunningStorageElement
    series: list[pydicom.Dataset]
    slices: list[Entry]  # in the series' order
    volume: Entry
    pki: Path

    @property
    def series_dir(self) -> str:
        return self.volume.lfn.rsplit("/", 1)[0]

    def url(self, entry: Entry) -> str:
        return self.se.url + entry.lfn

    def recorded(self, entry: Entry) -> Entry:
        """The catalog's current view of ``entry`` (a volume's checksum appears at first assembly)."""
        found = self.se.catalog.namespace.lookup_guid(entry.guid)
        assert found is not None
        return found


def adler32(data: bytes) -> str:
    return f"{zlib.adler32(data):08x}"


def add_token_issuer(config_path: Path, workdir: Path) -> str:
    """Trust a new token issuer (an EC key, its JWKS in a file) in the site config; a WLCG
    token of that issuer for a demo VO member allowed to read the VO's files."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwks = workdir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "test-key", "alg": "ES256", "use": "sig"}]}))
    issuers = f'issuers = {{ "{ISSUER}" = {{ jwks = "{jwks}", audience = "{AUDIENCE}" }} }}'
    config_path.write_text(config_path.read_text().replace("[identity]\n", f"[identity]\n{issuers}\n", 1))
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "researcher-7", "exp": int(time.time()) + 3600,
              "scope": "storage.read:/grid/demo/mdm", "wlcg.groups": ["/demo"]}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "test-key"})


def start_site(config_path: Path, key_servers, seed: str, slices: int = SLICES) -> Site:  # type: ignore[no-untyped-def]
    series = make_series(slices=slices, size=SIZE, seed=seed)
    register(config_path, series)
    se = start_storage_element(config_path)
    secret = se.config.site.secret_bytes
    entries = []
    for ds in series:
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        entry = se.catalog.namespace.lookup("/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u) for u in uids))
        assert entry is not None
        entries.append(entry)
    volume = se.catalog.namespace.lookup(entries[0].lfn.rsplit("/", 1)[0] + "/3D")
    assert volume is not None
    return Site(se, series, entries, volume, key_servers.pki)


@pytest.fixture(scope="module", params=["orthanc", "dcmqrscp"])
def pacs(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def token_site(pacs, key_servers, tmp_path_factory) -> Iterator[tuple[Site, str]]:  # type: ignore[no-untyped-def]
    """The site most tests share (GETs wait for staging), and a bearer token it trusts."""
    workdir = tmp_path_factory.mktemp(f"site-{pacs.name}")
    config_path = write_site_config(workdir, pacs, key_servers)
    token = add_token_issuer(config_path, workdir)
    site = start_site(config_path, key_servers, seed=f"interop {pacs.name}")
    try:
        yield site, token
    finally:
        site.se.stop()


@pytest.fixture(scope="module")
def site(token_site: tuple[Site, str]) -> Site:
    return token_site[0]


def client_config(site: Site, user: str, folder: Path) -> Path:
    """A grid user's client config: where the storage element is, the key servers, the user's credential."""
    keystore = site.se.config.keystore
    user_dir = site.pki / "users" / user
    path = folder / f"{user}.toml"
    path.write_text(
        f'[site]\nvo = "demo"\n\n[storage]\nurl = "{site.se.url}"\ntimeout = 30\n\n'
        f"[keystore]\nurls = {json.dumps(keystore.urls)}\n"
        f'ca = "{site.pki / "ca.pem"}"\ncert = "{user_dir / "cert.pem"}"\nkey = "{user_dir / "key.pem"}"\n'
    )
    return path


def run_mdm(config: Path, *args: str) -> tuple[int, str]:
    """``mdm`` in this process, as the installed command runs (faster than a new interpreter); (code, stderr)."""
    err = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), err
    try:
        code = main(["--config", str(config), *args])
    finally:
        sys.stdout, sys.stderr = saved
    return code, err.getvalue()


def assert_served(site: Site, entry: Entry, data: bytes) -> None:
    """The bytes a client got are the catalog's: size and adler32."""
    recorded = site.recorded(entry)
    assert (len(data), adler32(data)) == (recorded.size, recorded.adler32), entry.lfn


def decrypt(site: Site, download: Path, entry: Entry, suffix: str) -> Path:
    """bob decrypts a downloaded file with ``mdm decrypt``, as a grid job would."""
    out = download.parent / f"{download.name}{suffix}"
    code, stderr = run_mdm(client_config(site, "bob", download.parent), "decrypt", f"guid:{entry.guid}",
                           str(download), str(out))
    assert code == 0, stderr
    return out


def assert_decrypts_to_source(site: Site, download: Path, entry: Entry, source: pydicom.Dataset) -> None:
    """A downloaded slice decrypts to an anonymized image with the source's pixels."""
    decrypted = pydicom.dcmread(decrypt(site, download, entry, ".dcm"))
    assert decrypted.PixelData == source.PixelData
    assert "PatientName" not in decrypted or str(decrypted.PatientName) != str(source.PatientName)


def assert_is_the_series_volume(path: Path, series: list[pydicom.Dataset]) -> None:
    """Every source pixel, placed in world space from its slice's DICOM geometry (LPS), is the
    voxel the NIfTI affine (RAS) puts there, rescaled: checked with nibabel, not dcm2niix."""
    image = nibabel.load(path)
    data = np.asarray(image.dataobj)
    assert data.shape == (SIZE, SIZE, len(series))
    to_voxel = np.linalg.inv(image.affine)
    rows, columns = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    for ds in series:
        orientation = np.array(ds.ImageOrientationPatient, dtype=float)
        row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
        lps = (np.array(ds.ImagePositionPatient, dtype=float)[:, None, None]
               + orientation[:3, None, None] * column_spacing * columns
               + orientation[3:, None, None] * row_spacing * rows)
        ras = np.stack([-lps[0], -lps[1], lps[2], np.ones_like(lps[0])]).reshape(4, -1)
        ijk = (to_voxel @ ras)[:3]
        index = np.rint(ijk).astype(int)
        assert np.allclose(ijk, index, atol=1e-3)
        slope, intercept = float(getattr(ds, "RescaleSlope", 1)), float(getattr(ds, "RescaleIntercept", 0))
        expected = ds.pixel_array.reshape(-1) * slope + intercept
        assert np.array_equal(data[index[0], index[1], index[2]], expected)


def problem_detail(body: str) -> str:
    found = json.loads(body)
    assert {"status", "title", "detail"} <= set(found)
    return found["detail"]


# -- curl ------------------------------------------------------------------------------


def test_curl_get_range_head_digest_and_bearer_token(site, token_site, tmp_path):
    _, token = token_site
    entry, bob = site.slices[0], Credential.of_user(site.pki, "bob")
    head = clients.curl(site.url(entry), bob, "-f", "-I", "-H", "Want-Digest: adler32")
    assert head.returncode == 0, head.stderr
    headers = head.stdout.lower()
    assert f"digest: adler32={entry.adler32}" in headers and f"content-length: {entry.size}" in headers

    whole = tmp_path / "slice.enc"
    got = clients.curl(site.url(entry), bob, "-f", "-o", str(whole))
    assert got.returncode == 0, got.stderr
    data = whole.read_bytes()
    assert_served(site, entry, data)
    assert_decrypts_to_source(site, whole, entry, site.series[0])

    part = tmp_path / "part"
    ranged = clients.curl(site.url(entry), bob, "-f", "-r", "100-1099", "-o", str(part), "-w", "%{http_code}")
    assert ranged.returncode == 0 and ranged.stdout == "206", ranged.stderr
    assert part.read_bytes() == data[100:1100]

    with_token = tmp_path / "token.enc"
    got = clients.curl(site.url(entry), Credential.of_token(site.pki / "ca.pem", token), "-f", "-o", str(with_token))
    assert got.returncode == 0, got.stderr
    assert with_token.read_bytes() == data


def test_eve_of_another_vo_is_refused_by_curl_and_by_mdm_get(site, tmp_path):
    entry = site.slices[1]
    refused = clients.curl(site.url(entry), Credential.of_user(site.pki, "eve"), "-w", "\n%{http_code}")
    body, _, status = refused.stdout.rpartition("\n")
    # eve may not list it: it does not exist for her (a 403 would tell her it does)
    assert status == "404" and "no such file" in problem_detail(body)
    out = tmp_path / "slice.dcm"
    code, stderr = run_mdm(client_config(site, "eve", tmp_path), "get", "-l", entry.lfn, str(out))
    assert code == 3 and "not found" in stderr and len(stderr.splitlines()) == 1
    assert not out.exists()


# -- davix -----------------------------------------------------------------------------


def test_davix_ls_and_get(site, tmp_path):
    bob = Credential.of_user(site.pki, "bob")
    listing = clients.davix_ls(site.se.url + site.series_dir, bob)
    assert listing.returncode == 0, listing.stderr
    assert set(listing.stdout.split()) == {e.lfn.rsplit("/", 1)[1] for e in site.slices} | {"3D", "3D.json"}
    entry, out = site.slices[2], tmp_path / "slice.enc"
    got = clients.davix_get(site.url(entry), out, bob)
    assert got.returncode == 0, got.stderr
    assert_served(site, entry, out.read_bytes())
    assert_decrypts_to_source(site, out, entry, site.series[2])


# -- gfal2 -----------------------------------------------------------------------------


def test_gfal_ls_status_bringonline_archivepoll_copy_sum_and_evict(site, tmp_path):
    bob = Credential.of_user(site.pki, "bob")
    entry = site.slices[3]
    url = site.url(entry)
    listing = clients.gfal("ls", site.se.url + site.series_dir, cred=bob)
    assert listing.returncode == 0, listing.stderr
    assert {e.lfn.rsplit("/", 1)[1] for e in site.slices} | {"3D", "3D.json"} == set(listing.stdout.split())

    # The PACS is the tape: TAPE is what gfal2 shows as NEARLINE, DISK_AND_TAPE as ONLINE_AND_NEARLINE.
    status = clients.gfal("xattr", url, "user.status", cred=bob)
    assert (status.returncode, status.stdout.strip()) == (0, "NEARLINE"), status.stderr
    archived = clients.gfal("archivepoll", url, cred=bob)
    assert archived.returncode == 0 and archived.stdout.split() == [url, "READY"], archived

    staged = clients.gfal("bringonline", "--polling-timeout", "30", url, cred=bob)
    assert staged.returncode == 0, staged.stderr
    assert f"{url} READY" in staged.stdout, staged.stdout
    status = clients.gfal("xattr", url, "user.status", cred=bob)
    assert status.stdout.strip() == "ONLINE_AND_NEARLINE", status
    assert entry.guid in site.se.catalog.stages.pinned_guids(int(time.time()))

    out = tmp_path / "slice.enc"
    copied = clients.gfal("copy", url, f"file://{out}", cred=bob)
    assert copied.returncode == 0, copied.stderr
    assert_served(site, entry, out.read_bytes())
    assert_decrypts_to_source(site, out, entry, site.series[3])
    checksum = clients.gfal("sum", url, "ADLER32", cred=bob)
    assert checksum.returncode == 0, checksum.stderr
    assert checksum.stdout.split() == [url, entry.adler32]

    evicted = clients.gfal("evict", url, cred=bob)
    assert evicted.returncode == 0, evicted.stderr
    assert entry.guid not in site.se.catalog.stages.pinned_guids(int(time.time()))


# -- mdm get ---------------------------------------------------------------------------


def test_mdm_get_of_a_slice_and_of_the_volume(site, tmp_path):
    bob = client_config(site, "bob", tmp_path)
    out = tmp_path / "slice.dcm"
    code, stderr = run_mdm(bob, "get", "-l", site.slices[4].lfn, str(out))
    assert code == 0, stderr
    assert pydicom.dcmread(out).PixelData == site.series[4].PixelData

    study, series = site.series_dir.split("/")[-2:]
    volume = tmp_path / "volume.nii"
    installed = mdm("get", "-s", f"{study},{series},3D", str(volume), config=bob)
    assert installed.returncode == 0 and installed.stdout == "", installed.stderr
    assert_is_the_series_volume(volume, site.series)
    assert site.recorded(site.volume).adler32 is not None


# -- rclone ----------------------------------------------------------------------------


@pytest.fixture
def fresh_site(pacs, key_servers, tmp_path) -> Iterator[Site]:  # type: ignore[no-untyped-def]
    """A site with nothing staged whose GETs never wait: every first GET answers 503 while staging
    (and rclone backs off up to 2 s: fewer slices keep the test short)."""
    config_path = write_site_config(tmp_path / "fresh", pacs, key_servers, wait_timeout=0.0)
    site = start_site(config_path, key_servers, seed=f"rclone {pacs.name} {tmp_path.name}", slices=6)
    try:
        yield site
    finally:
        site.se.stop()


def test_rclone_copies_a_series_still_staging(fresh_site, tmp_path):
    site, bob = fresh_site, Credential.of_user(fresh_site.pki, "bob")
    assert {site.se.stager.locality(e) for e in [*site.slices, site.volume]} == {"TAPE"}
    first = clients.curl(site.url(site.slices[0]), bob, "-D", "-", "-o", "/dev/null")
    assert first.stdout.startswith("HTTP/1.1 503") and "retry-after: 1" in first.stdout.lower(), first.stdout

    out = tmp_path / "series"
    slices = clients.rclone("copy", f"mdm:{site.series_dir}", str(out), "--exclude", "3D", "--retries", "1",
                            "--low-level-retries", "20", url=site.se.url, cred=bob)
    assert slices.returncode == 0, slices.stderr
    for entry, source in zip(site.slices, site.series, strict=True):
        download = out / entry.lfn.rsplit("/", 1)[1]
        assert_served(site, entry, download.read_bytes())
        assert_decrypts_to_source(site, download, entry, source)

    # The whole directory, the volume still on "tape": one attempt must do.
    whole = clients.rclone("copy", f"mdm:{site.series_dir}", str(out), "--retries", "1",
                           "--low-level-retries", "20", url=site.se.url, cred=bob)
    assert whole.returncode == 0, whole.stderr
    assert_served(site, site.volume, (out / "3D").read_bytes())
    assert_is_the_series_volume(decrypt(site, out / "3D", site.volume, ".nii"), site.series)


def test_listings_give_the_volume_size_before_its_first_assembly(fresh_site):
    """DESIGN: a volume's size is known before its first assembly, so listings are true from
    the start; rclone checks every size it downloads against them."""
    site, bob = fresh_site, Credential.of_user(fresh_site.pki, "bob")
    listing = clients.rclone("ls", f"mdm:{site.series_dir}", url=site.se.url, cred=bob)
    assert listing.returncode == 0, listing.stderr
    sizes = {name: int(size) for size, name in (line.split() for line in listing.stdout.splitlines())}
    assert sizes == {**{e.lfn.rsplit("/", 1)[1]: e.size for e in site.slices}, "3D": sizes["3D"],
                     "3D.json": sizes["3D.json"]}
    assert site.volume.size is not None and sizes["3D"] == site.volume.size, listing.stdout
    sidecar = site.se.catalog.namespace.lookup(site.volume.lfn + ".json")
    assert sidecar is not None and sizes["3D.json"] == sidecar.size, listing.stdout


# -- VOMS proxies of Debian's voms-proxy-fake, over HTTPS ---------------------------------


@dataclass
class VomsSite:
    site: Site
    proxies: dict[str, Path]  # name → proxy file (proxy certificate, its key, eve's certificate)

    def cred(self, name: str) -> Credential:
        """curl's --cert and --key: the proxy file holds both, as voms-proxy-init writes it."""
        proxy = self.proxies[name]
        return Credential(self.site.pki / "ca.pem", proxy, proxy)


@pytest.fixture(scope="module")
def voms_site(orthanc, key_servers, tmp_path_factory) -> Iterator[VomsSite]:  # type: ignore[no-untyped-def]
    """A site (and key servers) trusting the demo VO's VOMS server through ``[identity] vomsdir``,
    and eve's proxies (of VO "other" in the VO map) made by the real voms-proxy-fake."""
    workdir = tmp_path_factory.mktemp("voms-site")
    pki = key_servers.pki
    vomsdir = trust_voms(pki)
    rogue = workdir / "rogue-pki"
    init_pki(rogue)
    init_voms(rogue, VO, VOMS_HOST)  # a VOMS server of another CA, claiming the demo VO's host name
    proxies = {
        "physician": fake_proxy(pki, "eve", workdir / "physician.pem", "-fqan", "/demo/physician"),
        "register": fake_proxy(pki, "eve", workdir / "register.pem", "-fqan", "/demo/register"),
        "rogue": fake_proxy(pki, "eve", workdir / "rogue.pem", "-fqan", "/demo/physician", voms=rogue / "voms"),
        "expired": fake_proxy(pki, "eve", workdir / "expired.pem", "-fqan", "/demo/physician",
                              "-vomslife", "1", "-pastac", "3:00"),
    }
    config_path = write_site_config(workdir, orthanc, key_servers)
    config_path.write_text(config_path.read_text().replace("[identity]\n", f'[identity]\nvomsdir = "{vomsdir}"\n', 1))
    site = start_site(config_path, key_servers, seed="interop voms", slices=2)
    try:
        yield VomsSite(site, proxies)
    finally:
        site.se.stop()


def curl_status(url: str, cred: Credential, *args: str) -> tuple[str, str]:
    """(HTTP status, body) of a curl request."""
    done = clients.curl(url, cred, "-w", "\n%{http_code}", *args)
    assert done.returncode == 0, done.stderr
    body, _, status = done.stdout.rpartition("\n")
    return status, body


def test_eve_of_another_vo_reads_as_a_demo_physician_with_a_voms_proxy(voms_site, tmp_path):
    """curl with eve's voms-proxy-fake proxy (/demo/physician): the file, its nominative
    metadata; ``mdm get`` with the proxy fetches the key shares (the key servers read the AC
    too) and decrypts. Her plain certificate gets none of it."""
    site, eve = voms_site.site, voms_site.cred("physician")
    entry = site.slices[0]
    out = tmp_path / "slice.enc"
    got = clients.curl(site.url(entry), eve, "-f", "-o", str(out), "-H", "Want-Digest: adler32", "-D", "-")
    assert got.returncode == 0, got.stderr
    assert f"digest: adler32={entry.adler32}" in got.stdout.lower()
    assert_served(site, entry, out.read_bytes())
    sop = entry.lfn.rsplit("/", 1)[1]  # the de-identified UID, as the served file has it
    query = f"{site.se.url}/api/v1/metadata?q=SOPInstanceUID%3D%22{sop}%22&select=PatientName"
    status, body = curl_status(query, eve)
    assert status == "200" and "PatientName" in json.loads(body)["results"][0], body
    assert curl_status(site.url(entry), Credential.of_user(site.pki, "eve"))[0] == "404"

    config = client_config(site, "eve", tmp_path)
    config.write_text(config.read_text().replace(str(site.pki / "users" / "eve" / "cert.pem"),
                                                 str(voms_site.proxies["physician"]))
                      .replace(str(site.pki / "users" / "eve" / "key.pem"), str(voms_site.proxies["physician"])))
    dicom = tmp_path / "slice.dcm"
    code, stderr = run_mdm(config, "get", "-l", entry.lfn, str(dicom))
    assert code == 0, stderr
    assert pydicom.dcmread(dicom).PixelData == site.series[0].PixelData


def test_a_rogue_voms_server_gives_no_groups_and_the_log_says_so(voms_site, caplog):
    site = voms_site.site
    with caplog.at_level(logging.WARNING, logger="srm_dicom.voms"):
        status, body = curl_status(site.url(site.slices[0]), voms_site.cred("rogue"))
    assert status == "404" and "no such file" in problem_detail(body)  # eve of VO "other": nothing to list
    refusal = "VOMS AC of /C=XX/O=srm-dicom/CN=eve refused, no VOMS groups: its VOMS server certificate is not issued"
    assert f"{refusal} by a trusted CA" in caplog.text


def test_an_expired_ac_gives_no_groups_and_the_log_says_so(voms_site, caplog):
    site = voms_site.site
    with caplog.at_level(logging.WARNING, logger="srm_dicom.voms"):
        status, _ = curl_status(site.url(site.slices[0]), voms_site.cred("expired"))
    assert status == "404"
    assert "VOMS AC of /C=XX/O=srm-dicom/CN=eve refused, no VOMS groups: expired" in caplog.text


def test_browse_and_status_pages_honour_voms_groups(voms_site):
    """The directory page lists the series for eve's physician proxy (her plain certificate:
    404); /status is for operators ([operations] groups: ops, register): her /demo/register
    proxy reads it, her physician proxy does not."""
    site = voms_site.site
    page = site.se.url + site.series_dir + "/"
    status, body = curl_status(page, voms_site.cred("physician"), "-H", "Accept: text/html")
    assert status == "200" and all(e.lfn.rsplit("/", 1)[1] in body for e in site.slices), body
    assert curl_status(page, Credential.of_user(site.pki, "eve"), "-H", "Accept: text/html")[0] == "404"
    assert curl_status(site.se.url + "/status", voms_site.cred("register"))[0] == "200"
    assert curl_status(site.se.url + "/status", voms_site.cred("physician"))[0] == "403"


def _curl_two_urls(site: Site, cred: Credential, tmp_path: Path) -> None:
    """curl fetching two slices in one call, the second on a new connection offering the
    first's TLS session: both 200 with the served bytes (before, the second was a 401)."""
    first, second = site.slices[0], site.slices[1]
    out1, out2 = tmp_path / "first.enc", tmp_path / "second.enc"
    done = clients.curl(site.url(second), cred, "-H", "Connection: close", "-w", "%{http_code} %{num_connects}\n",
                        "-o", str(out1), site.url(first), "-o", str(out2))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["200 1", "200 1"], done.stdout
    assert_served(site, first, out1.read_bytes())
    assert_served(site, second, out2.read_bytes())


def test_curl_with_two_urls_in_one_call_gets_both(site, tmp_path):
    _curl_two_urls(site, Credential.of_user(site.pki, "bob"), tmp_path)


def test_curl_with_two_urls_and_a_voms_proxy_gets_both(voms_site, tmp_path):
    _curl_two_urls(voms_site.site, voms_site.cred("physician"), tmp_path)


def test_a_python_client_offering_its_tls_session_again_is_still_bob(site):
    """Python's ssl resuming explicitly (``session=``) on a second connection while the first
    is open: the server makes a full handshake (no resumption, so a verified chain) and
    serves bob, where it answered 401 to the resumed session."""
    import socket
    import ssl
    from urllib.parse import urlsplit

    context = ssl.create_default_context(cafile=str(site.pki / "ca.pem"))
    context.load_cert_chain(site.pki / "users" / "bob" / "cert.pem", site.pki / "users" / "bob" / "key.pem")
    parts = urlsplit(site.url(site.slices[0]))
    assert parts.hostname is not None
    request = f"HEAD {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()

    def head(session: ssl.SSLSession | None) -> tuple[ssl.SSLSocket, bytes]:
        tls = context.wrap_socket(socket.create_connection((parts.hostname, parts.port), timeout=60),
                                  server_hostname=parts.hostname, session=session)
        tls.sendall(request)
        return tls, tls.recv(65536).split(b"\r\n", 1)[0]

    first, status = head(None)
    assert status == b"HTTP/1.1 200 OK"
    second, status = head(first.session)
    assert (second.session_reused, status) == (False, b"HTTP/1.1 200 OK")
    first.close()
    second.close()
