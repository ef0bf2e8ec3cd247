"""HTTP third-party copy with this storage element as the source, against a real XRootD 5.5.

gfal2 (as FTS does) asks us for a macaroon (POST application/macaroon-request), hands it to
XRootD in a COPY (TransferHeaderAuthorization), and XRootD pulls from us with it; -K ADLER32
makes gfal2 compare our checksum with XRootD's. Multi-stream pulls are ranged GETs; a
streamed copy goes through gfal2 itself.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clients import Credential, gfal
from https import request
from sites import write_site_config
from srm_dicom.server.webdav import IDENTITY
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element
from xrootd import XRootD, running_xrootd

BIG = 3072  # one slice of 3072² 16-bit pixels: ~18 MiB, above XRootD's 16 MiB TPC block


@dataclass
class Seen:
    """What the storage element was asked: (method, path, Range, identity kind) per request."""

    requests: list[tuple[str, str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, app):  # type: ignore[no-untyped-def]
        def recorded(environ, start_response):  # type: ignore[no-untyped-def]
            answer = app(environ, start_response)
            identity = environ.get(IDENTITY)
            with self.lock:
                self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                      environ.get("HTTP_RANGE", ""), identity.kind if identity else ""))
            return answer
        return recorded

    def gets(self, path: str) -> list[tuple[str, str, str, str]]:
        with self.lock:
            return [r for r in self.requests if r[0] == "GET" and r[1] == path]


@dataclass
class Copy:
    se: RunningStorageElement
    xrootd: XRootD
    pki: Path
    seen: Seen
    small: str
    big: str

    def source(self, lfn: str) -> str:
        return "davs://" + self.se.url.removeprefix("https://") + lfn

    def served(self, lfn: str) -> bytes:
        answer = request(self.se.url, self.pki, "bob", "GET", lfn)
        assert answer.status == 200
        return answer.body


@pytest.fixture(scope="module")
def copy(orthanc, key_servers, tmp_path_factory) -> Iterator[Copy]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("tpc")
    config_path = write_site_config(workdir, orthanc, key_servers, wait_timeout=60.0)
    small = make_series(slices=2, size=32, seed="tpc small")
    big = make_series(slices=1, size=BIG, seed="tpc big")
    register(config_path, small + big)
    se = start_storage_element(config_path)
    seen = Seen()
    se._server.wsgi_app = seen.wrap(se._server.wsgi_app)  # type: ignore[attr-defined]  # noqa: SLF001
    secret = se.config.site.secret_bytes

    def lfn(ds) -> str:  # type: ignore[no-untyped-def]
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        return "/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u) for u in uids)

    # XRootD runs as nobody when we are root: its directory is not under pytest's 0700 tmp.
    xrootd_dir = Path(tempfile.mkdtemp(prefix="srm-dicom-xrootd-"))
    try:
        with running_xrootd(xrootd_dir, key_servers.pki) as xrootd:
            yield Copy(se, xrootd, key_servers.pki, seen, lfn(small[0]), lfn(big[0]))
    finally:
        se.stop()
        shutil.rmtree(xrootd_dir, ignore_errors=True)


def test_gfal_pull_copy_to_xrootd_with_our_macaroon(copy):
    bob = Credential.of_user(copy.pki, "bob")
    done = gfal("copy", "--copy-mode", "pull", "-K", "ADLER32", copy.source(copy.small),
                f"{copy.xrootd.url}/pulled.enc", cred=bob)
    assert done.returncode == 0, done.stdout + done.stderr
    assert copy.xrootd.path("pulled.enc").read_bytes() == copy.served(copy.small)
    with copy.seen.lock:
        asked = [r for r in copy.seen.requests if r[0] == "POST" and r[1] == copy.small]
    assert asked and asked[0][3] == "x509"  # gfal2 asked for a macaroon with bob's certificate
    assert any(kind == "macaroon" for *_, kind in copy.seen.gets(copy.small))  # XRootD pulled with it


def test_multi_stream_pull_is_ranged_gets_with_identical_bytes(copy):
    bob = Credential.of_user(copy.pki, "bob")
    done = gfal("copy", "--copy-mode", "pull", "--nbstreams", "4", "-K", "ADLER32", copy.source(copy.big),
                f"{copy.xrootd.url}/multi.enc", cred=bob, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    ranged = [r for r in copy.seen.gets(copy.big) if r[2] and r[3] == "macaroon"]
    assert len(ranged) >= 2, copy.seen.gets(copy.big)
    assert copy.xrootd.path("multi.enc").read_bytes() == copy.served(copy.big)


def test_streamed_gfal_copy_goes_through_gfal2(copy):
    bob = Credential.of_user(copy.pki, "bob")
    done = gfal("copy", "--copy-mode", "streamed", "-K", "ADLER32", copy.source(copy.small),
                f"{copy.xrootd.url}/streamed.enc", cred=bob)
    assert done.returncode == 0, done.stdout + done.stderr
    assert copy.xrootd.path("streamed.enc").read_bytes() == copy.served(copy.small)
    assert any(kind == "x509" for *_, kind in copy.seen.gets(copy.small))  # gfal2 read with bob's certificate
