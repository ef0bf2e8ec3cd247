"""``mdm get`` and the real HTTP clients against a small real HTTPS server speaking the storage
element's GET contract (DESIGN.md, HTTP contracts), until end-to-end tests run against ``mdm serve``.

The server is stdlib http.server over TLS with the demo PKI's host certificate; it serves
real containers whose keys are on the real key servers, and it can answer 503 while
"staging", 403/404 problems, or break a transfer: faults a real server has, caused on
the wire rather than mocked.
"""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import pydicom
import pytest

import clients
from clients import Credential
from sites import mdm
from srm_dicom.cli import main
from srm_dicom.crypto.container import encrypt_bytes
from srm_dicom.entry_key import key_name
from srm_dicom.keystore import Acl, AclEntry
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pki import USERS, make_proxy

STUDY, SERIES, SOP = "2.25.1001", "2.25.1002", "2.25.1003"
LFN = f"/grid/demo/mdm/{STUDY}/{SERIES}/{SOP}"
VOLUME_LFN = f"/grid/demo/mdm/{STUDY}/{SERIES}/3D"
TOKEN = "test-bearer-token"
DN = {user.name: user.dn for user in USERS}


@dataclass
class Served:
    """One file on the server: its encrypted bytes and how the server misbehaves for it."""

    data: bytes
    staging: int = 0  # 503 answers left before the file is "on disk"
    retry_after: str = "0"
    cut_after: int | None = None  # close the connection after this many body bytes
    status: int = 200


@dataclass
class TinyStorage:
    """An HTTPS server with client-certificate or bearer-token auth over in-memory files."""

    pki: Path
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, who

    def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki / "ca.pem"))
        host = self.pki / "hosts" / "storage-element"
        context.load_cert_chain(str(host / "cert.pem"), str(host / "key.pem"))
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        # Handshakes that clients abort on purpose (untrusted CA) are the client's outcome to assert.
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server.server_address[1]}"

    def hits(self, path: str) -> int:
        return sum(1 for method, p, _ in self.requests if method == "GET" and p == path)


def _handler(storage: TinyStorage) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _who(self) -> str | None:
            cert = self.connection.getpeercert()  # type: ignore[attr-defined]
            if cert:
                return dict(item[0] for item in cert["subject"])["commonName"]
            if self.headers.get("Authorization") == f"Bearer {TOKEN}":
                return "token"
            return None

        def _problem(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None) -> None:
            body = json.dumps({"status": status, "title": title, "detail": detail}).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/problem+json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self) -> bool:
            who = self._who()
            storage.requests.append((self.command, self.path, who or "-"))
            if who is None:
                self._problem(401, "Unauthorized", "a client certificate or a bearer token is needed")
            elif who == "eve":
                self._problem(403, "Forbidden", "/C=XX/O=srm-dicom/CN=eve may not read this file")
            return who not in (None, "eve")

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            if not self._authorized():
                return
            served = storage.files.get(self.path)
            if served is None:
                self._problem(404, "Not Found", f"no such file: {self.path}")
                return
            if served.staging:
                served.staging -= 1
                self._problem(503, "Service Unavailable", "staging from the PACS",
                              {"Retry-After": served.retry_after})
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(served.data)))
            if self.headers.get("Want-Digest", "").lower().startswith("adler32"):
                self.send_header("Digest", f"adler32={zlib.adler32(served.data):08x}")
            self.end_headers()
            if self.command == "HEAD":
                return
            if served.cut_after is None:
                self.wfile.write(served.data)
                return
            self.wfile.write(served.data[: served.cut_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)

        def do_PROPFIND(self) -> None:  # noqa: N802 - a minimal one: rclone, davix and gfal stat first
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self._authorized():
                return
            path = self.path.rstrip("/") or "/"
            found = [(p, s) for p, s in storage.files.items() if p == path]
            children = sorted({p[len(path):].strip("/").split("/")[0] for p in storage.files
                               if p.startswith(path.rstrip("/") + "/")})
            if not found and not children:
                self._problem(404, "Not Found", f"no such file: {self.path}")
                return
            entries = [(path, found[0][1] if found else None)]
            if not found and self.headers.get("Depth", "1") != "0":
                for name in children:
                    child = f"{path.rstrip('/')}/{name}"
                    entries.append((child, storage.files.get(child)))
            body = _multistatus(entries).encode()
            self.send_response(207)
            self.send_header("Content-Type", 'application/xml; charset="utf-8"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def _multistatus(entries: list[tuple[str, Served | None]]) -> str:
    responses = []
    for path, served in entries:
        kind = (f"<D:resourcetype/><D:getcontentlength>{len(served.data)}</D:getcontentlength>"
                if served else "<D:resourcetype><D:collection/></D:resourcetype>")
        href = escape(path if served else path.rstrip("/") + "/")
        responses.append(
            f"<D:response><D:href>{href}</D:href><D:propstat><D:prop>{kind}"
            f"<D:getlastmodified>{formatdate(usegmt=True)}</D:getlastmodified></D:prop>"
            "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response>"
        )
    return f'<?xml version="1.0" encoding="utf-8"?><D:multistatus xmlns:D="DAV:">{"".join(responses)}</D:multistatus>'


@dataclass(frozen=True)
class Image:
    guid: str
    plain: bytes
    container: bytes


def store_image(key_servers, plain: bytes, version: int = 1, chunk_size: int = 1 << 20) -> Image:  # type: ignore[no-untyped-def]
    """A container of ``plain`` whose key shares the service identity put on the real key servers
    with an ACL for bob, as registration does."""
    pki = key_servers.pki
    service = KeystoreClient(key_servers.urls, ca=pki / "ca.pem", cert=pki / "service" / "cert.pem",
                             key=pki / "service" / "key.pem", timeout=5)
    guid = str(uuid.uuid4())
    key = os.urandom(32)
    service.put_key(key_name(guid, version), key, Acl(owner=DN["alice"], entries=(AclEntry("r", dn=DN["bob"]),)))
    return Image(guid, plain, bytes(encrypt_bytes(key, uuid.UUID(guid).bytes, version, plain, chunk_size)))


@pytest.fixture(scope="module")
def storage(pki: Path) -> Iterator[TinyStorage]:
    server = TinyStorage(pki)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image(storage: TinyStorage, key_servers) -> Image:  # type: ignore[no-untyped-def]
    """A slice of several chunks on the server, under its LFN and its GUID."""
    image = store_image(key_servers, b"DICM-like slice bytes " * 5000, chunk_size=16384)
    storage.files[LFN] = Served(image.container)
    storage.files[f"/guid/{image.guid}"] = Served(image.container)
    return image


@pytest.fixture(scope="module")
def volume(storage: TinyStorage, key_servers) -> Image:  # type: ignore[no-untyped-def]
    volume = store_image(key_servers, os.urandom(300_000))
    storage.files[VOLUME_LFN] = Served(volume.container)
    return volume


def client_config(tmp_path: Path, key_servers, storage_url: str, user: str = "bob",  # type: ignore[no-untyped-def]
                  timeout: float = 10, ca: Path | None = None) -> Path:
    """A grid user's client config: [site] vo, [storage] url, [keystore] with the user's credential."""
    pki = key_servers.pki
    path = tmp_path / f"{user}.toml"
    path.write_text(
        f"""[site]
vo = "demo"

[storage]
url = "{storage_url}"
timeout = {timeout}

[keystore]
urls = {json.dumps(key_servers.urls)}
ca = "{ca or pki / "ca.pem"}"
cert = "{pki / "users" / user / "cert.pem"}"
key = "{pki / "users" / user / "key.pem"}"
timeout = 5
"""
    )
    return path


@pytest.fixture
def bob(tmp_path: Path, key_servers, storage: TinyStorage) -> Path:  # type: ignore[no-untyped-def]
    return client_config(tmp_path, key_servers, storage.url)


def get(config: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    """``mdm get`` in this process (as the installed command does), stdin given; (code, out, err)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(stdin), out, err
    try:
        code = main(["--config", str(config), "get", *args])
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".mdm-get-"))


@pytest.mark.parametrize("selector", [
    ["-s", f"{STUDY},{SERIES},{SOP}"],
    ["--sop", f"{STUDY},{SERIES},{SOP}"],
    ["-s", STUDY, SERIES, SOP],
    ["-s", f"{STUDY} {SERIES} {SOP}"],
    ["-s", f"/{STUDY}/{SERIES}/{SOP}"],
    [f"/{STUDY}/{SERIES}/{SOP}"],
    [f"{STUDY}/{SERIES}/{SOP}"],
    [STUDY, SERIES, SOP],
    ["-l", LFN],
    ["--lfn", LFN + "/"],
    [LFN],
    ["-g", "guid:{guid}"],
    ["--guid", "{guid}"],
    ["guid:{guid}"],
    ["/guid/{guid}"],
], ids=lambda s: " ".join(s).replace(STUDY, "S").replace(SERIES, "SE").replace(SOP, "SOP"))
def test_every_form_of_the_seeds_names_the_same_file(selector, image, bob, tmp_path):
    out = tmp_path / "slice.dcm"
    code, stdout, stderr = get(bob, *[s.format(guid=image.guid) for s in selector], str(out))
    assert (code, stdout, stderr) == (0, "", "")  # silent on success
    assert out.read_bytes() == image.plain
    assert leftovers(tmp_path) == []


def test_3d_in_place_of_the_sop_gets_the_volume(volume, bob, tmp_path):
    for n, selector in enumerate(([f"{STUDY},{SERIES},3D"], [f"/{STUDY}/{SERIES}/3D"], ["-l", VOLUME_LFN])):
        out = tmp_path / f"volume{n}.nii"
        assert get(bob, *selector, str(out))[0] == 0
        assert out.read_bytes() == volume.plain


def test_the_installed_command_verbose_says_what_it_got(image, bob, tmp_path):
    out = tmp_path / "slice.dcm"
    result = mdm("get", "-v", "-g", f"guid:{image.guid}", str(out), config=bob)
    assert result.returncode == 0, result.stderr
    assert f"guid:{image.guid} -> {out}: {len(image.plain)} bytes" in result.stdout
    assert out.read_bytes() == image.plain


def test_a_grid_proxy_works_as_the_credential(storage, image, key_servers, tmp_path):
    user = key_servers.pki / "users" / "bob"
    chain, key = make_proxy((user / "cert.pem").read_bytes(), (user / "key.pem").read_bytes())
    proxy = tmp_path / "x509up"
    proxy.write_bytes(chain + key)  # as voms-proxy-init writes it: one file, cert chain and key
    config = client_config(tmp_path, key_servers, storage.url)
    config.write_text(config.read_text().replace(str(user / "cert.pem"), str(proxy))
                      .replace(str(user / "key.pem"), str(proxy)))
    out = tmp_path / "slice.dcm"
    assert get(config, LFN, str(out)) == (0, "", "")
    assert out.read_bytes() == image.plain


def test_an_existing_destination_is_refused_unless_forced(image, bob, tmp_path):
    out = tmp_path / "slice.dcm"
    out.write_bytes(b"precious")
    code, _, stderr = get(bob, "-s", f"{STUDY},{SERIES},{SOP}", str(out))
    assert code == 2 and stderr == f"mdm get: {out} exists (use -f to overwrite, -i to be asked)\n"
    assert out.read_bytes() == b"precious"
    assert get(bob, "-f", LFN, str(out))[0] == 0
    assert out.read_bytes() == image.plain


@pytest.mark.parametrize(("answer", "overwritten"), [("y\n", True), ("yes\n", True), ("n\n", False), ("", False)])
def test_interactive_asks_before_overwriting(answer, overwritten, image, bob, tmp_path):
    out = tmp_path / "slice.dcm"
    out.write_bytes(b"precious")
    code, _, stderr = get(bob, "-i", LFN, str(out), stdin=answer)
    assert stderr.startswith(f"mdm get: overwrite {out}? [y/N] ")
    assert out.read_bytes() == (image.plain if overwritten else b"precious")
    assert code == (0 if overwritten else 1)


def test_interactive_does_not_ask_when_nothing_is_overwritten(image, bob, tmp_path):
    out = tmp_path / "new.dcm"
    assert get(bob, "-i", LFN, str(out)) == (0, "", "")
    assert out.read_bytes() == image.plain


def test_staging_503_is_retried_as_retry_after_says(storage, image, bob, tmp_path):
    path = f"/grid/demo/mdm/{STUDY}/{SERIES}/2.25.2001"
    storage.files[path] = Served(image.container, staging=2, retry_after="1")
    started = time.monotonic()
    code, _, stderr = get(bob, "-l", path, str(tmp_path / "out.dcm"))
    elapsed = time.monotonic() - started
    assert (code, stderr) == (0, "")
    assert storage.hits(path) == 3
    assert 2.0 <= elapsed < 6.0  # two waits of Retry-After: 1
    assert (tmp_path / "out.dcm").read_bytes() == image.plain


def test_retry_after_as_an_http_date_is_honoured(storage, image, bob, tmp_path):
    path = f"/grid/demo/mdm/{STUDY}/{SERIES}/2.25.2002"
    storage.files[path] = Served(image.container, staging=1, retry_after=formatdate(time.time() + 2, usegmt=True))
    started = time.monotonic()
    assert get(bob, "-l", path, str(tmp_path / "out.dcm"))[0] == 0
    assert time.monotonic() - started >= 1.0  # HTTP dates have whole seconds


def test_staging_that_never_ends_gives_up_within_the_timeout(storage, image, bob, tmp_path):
    path = f"/grid/demo/mdm/{STUDY}/{SERIES}/2.25.2003"
    storage.files[path] = Served(image.container, staging=10**6, retry_after="1")
    started = time.monotonic()
    code, _, stderr = get(bob, "--timeout", "2.5", "-l", path, str(tmp_path / "out.dcm"))
    assert time.monotonic() - started < 4.0
    assert code == 4 and len(stderr.splitlines()) == 1
    assert f"still staging after 3 attempts in 2.5 s: {path}: staging from the PACS; try again later" in stderr
    assert list(tmp_path.iterdir()) == [bob]


def test_not_found_and_forbidden_are_one_line_with_their_exit_code(storage, image, key_servers, tmp_path):
    bob = client_config(tmp_path, key_servers, storage.url)
    missing = f"/grid/demo/mdm/{STUDY}/{SERIES}/2.25.9"
    code, _, stderr = get(bob, "-s", f"{STUDY},{SERIES},2.25.9", str(tmp_path / "x"))
    assert code == 3 and stderr == f"mdm get: not found: no such file: {missing}\n"
    eve = client_config(tmp_path, key_servers, storage.url, user="eve")
    code, _, stderr = get(eve, LFN, str(tmp_path / "x"))
    assert code == 5 and f"access denied (403): {LFN}: /C=XX/O=srm-dicom/CN=eve may not read this file" in stderr
    assert not (tmp_path / "x").exists()


def test_a_reader_the_key_servers_refuse_gets_exit_6_and_no_file(storage, image, key_servers, tmp_path):
    dave = client_config(tmp_path, key_servers, storage.url, user="dave")
    out = tmp_path / "slice.dcm"
    code, _, stderr = get(dave, LFN, str(out))
    assert code == 6 and len(stderr.splitlines()) == 1 and "CN=dave may not read key" in stderr
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["cut in the header", "cut in a chunk", "altered byte", "not a container"])
def test_a_broken_download_leaves_the_old_destination_untouched(fault, storage, image, bob, tmp_path):
    path = f"/grid/demo/mdm/{STUDY}/{SERIES}/2.25.3{len(fault)}"
    data = bytearray(image.container)
    served = Served(bytes(data))
    if fault == "cut in the header":
        served.cut_after = 50
    elif fault == "cut in a chunk":
        served.cut_after = len(data) // 2
    elif fault == "altered byte":
        data[len(data) // 2] ^= 1
        served.data = bytes(data)
    else:
        served.data = b"<html>proxy error page</html>"
    storage.files[path] = served
    out = tmp_path / "slice.dcm"
    out.write_bytes(b"precious")
    code, _, stderr = get(bob, "-f", "-l", path, str(out))
    assert code == 1 and len(stderr.splitlines()) == 1, stderr
    expected = {"cut in the header": "broken after 50 of", "cut in a chunk": "broken after",
                "altered byte": "fails authentication", "not a container": "not an encrypted srm-dicom file"}
    assert expected[fault] in stderr
    assert out.read_bytes() == b"precious" and leftovers(tmp_path) == []


def test_an_untrusted_server_or_none_at_all(image, key_servers, storage, tmp_path):
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes((key_servers.pki / "users" / "bob" / "cert.pem").read_bytes())
    untrusting = client_config(tmp_path, key_servers, storage.url, ca=other_ca)
    code, _, stderr = get(untrusting, LFN, str(tmp_path / "x"))
    # The key servers are checked against the same CA, but the storage element is asked first.
    assert code == 5 and "server certificate not trusted" in stderr
    nobody = client_config(tmp_path, key_servers, "https://127.0.0.1:9")
    code, _, stderr = get(nobody, LFN, str(tmp_path / "x"))
    assert code == 1 and stderr.startswith("mdm get: https://127.0.0.1:9 unreachable: ")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["-s", "1.2,3.4", "out"], "is not a study, series, sop triple"),
    (["-s", "1.2,3.4,PATIENT^NAME", "out"], "is not a DICOM UID"),
    (["-g", "guid:not-a-uuid", "out"], "is not a GUID"),
    (["-l", "/grid/demo/mdm/1.2", "out"], "names a directory, not an image"),
    (["-l", LFN, "extra", "out"], "unexpected argument(s) before DEST: extra"),
    (["out"], "name the file (-s S,SE,SOP, -l LFN or -g GUID) before DEST"),
    ([LFN, "missing-dir/out"], "does not exist"),
])
def test_bad_usage_is_one_line_and_exit_2(args, message, bob, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = get(bob, *args)
    assert code == 2 and len(stderr.splitlines()) == 1 and message in stderr, stderr


def test_a_config_without_storage_url_says_so(image, key_servers, tmp_path):
    config = client_config(tmp_path, key_servers, "")
    code, _, stderr = get(config, LFN, str(tmp_path / "x"))
    assert code == 2 and "[storage] url is not set" in stderr


# The real clients grid jobs use, with the flags tests/clients.py gives them for a client
# certificate or a token and the demo CA: each downloads the encrypted bytes as bob.

@pytest.fixture
def bob_cred(pki: Path) -> Credential:
    return Credential.of_user(pki, "bob")


def _served_as(storage: TinyStorage, path: str) -> set[str]:
    return {who for _, p, who in storage.requests if p.rstrip("/") == path}


def test_curl_with_certificate_and_with_token(storage, image, bob_cred, pki, tmp_path):
    out = tmp_path / "enc"
    result = clients.curl(storage.url + LFN, bob_cred, "-f", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == image.container
    token = Credential.of_token(pki / "ca.pem", TOKEN)
    head = clients.curl(storage.url + LFN, token, "-f", "-I", "-H", "Want-Digest: adler32")
    assert head.returncode == 0, head.stderr
    assert f"digest: adler32={zlib.adler32(image.container):08x}" in head.stdout.lower()
    assert {"bob", "token"} <= _served_as(storage, LFN)


def test_davix_get_and_ls(storage, image, volume, bob_cred, tmp_path):
    out = tmp_path / "enc"
    result = clients.davix_get(storage.url + LFN, out, bob_cred)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == image.container
    listing = clients.davix_ls(storage.url + f"/grid/demo/mdm/{STUDY}/{SERIES}", bob_cred)
    assert listing.returncode == 0, listing.stderr
    assert {SOP, "3D"} <= set(listing.stdout.split())


def test_gfal_copy_ls_and_sum(storage, image, volume, bob_cred, tmp_path):
    out = tmp_path / "enc"
    result = clients.gfal("copy", storage.url + LFN, f"file://{out}", cred=bob_cred)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == image.container
    listing = clients.gfal("ls", storage.url + f"/grid/demo/mdm/{STUDY}/{SERIES}", cred=bob_cred)
    assert listing.returncode == 0, listing.stderr
    assert {SOP, "3D"} <= set(listing.stdout.split())
    checksum = clients.gfal("sum", storage.url + LFN, "ADLER32", cred=bob_cred)
    assert checksum.returncode == 0, checksum.stderr
    assert checksum.stdout.split()[-1] == f"{zlib.adler32(image.container):08x}"


def test_rclone_copy_and_ls_while_staging(storage, image, bob_cred, tmp_path):
    path = f"/grid/demo/mdm/{STUDY}/2.25.4/2.25.5"
    storage.files[path] = Served(image.container, staging=1, retry_after="1")
    result = clients.rclone("copy", f"mdm:{path}", str(tmp_path / "dl"), "--retries", "1",
                            "--low-level-retries", "5", url=storage.url, cred=bob_cred)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dl" / "2.25.5").read_bytes() == image.container
    assert storage.hits(path) == 2
    listing = clients.rclone("ls", f"mdm:/grid/demo/mdm/{STUDY}/{SERIES}", url=storage.url, cred=bob_cred)
    assert listing.returncode == 0, listing.stderr
    assert f"{len(image.container)} {SOP}" in " ".join(listing.stdout.split())


def test_a_large_download_on_a_terminal_shows_a_progress_bar(storage, key_servers, bob, tmp_path):
    big = store_image(key_servers, os.urandom(12 * 1024 * 1024))
    path = f"/grid/demo/mdm/{STUDY}/{SERIES}/2.25.6"
    storage.files[path] = Served(big.container)
    out = tmp_path / "big.dcm"
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [shutil.which("mdm") or "mdm", "get", "-l", path, str(out)],
        env={**os.environ, "MDM_CONFIG": str(bob), "TERM": "xterm"},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary,
    )
    os.close(secondary)
    terminal = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the program exited and closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(primary)
    assert process.wait(timeout=60) == 0 and process.stdout.read() == b""  # type: ignore[union-attr]
    assert "━".encode() in terminal and b"MB" in terminal
    assert out.read_bytes() == big.plain


def test_a_connection_the_storage_element_hangs_up_on_is_asked_again(storage_element, key_servers, tmp_path):
    """Issue 12, finding 7 (client.py): a connection closed before any answer was an
    ssl.SSLError, caught as "refused the TLS handshake" (exit 5) instead of asked again."""
    from proxy import FaultyProxy

    running, series = storage_element
    entry = next(e for e in running.catalog.namespace.list_dir(
        running.catalog.namespace.list_dir(running.catalog.namespace.list_dir("/grid/demo/mdm").directories[0]).directories[0]
    ).entries if e.kind == "slice")
    port = int(running.url.rsplit(":", 1)[1])
    with FaultyProxy(("127.0.0.1", port), drop_first=1) as proxy:
        config = client_config(tmp_path, key_servers, f"https://127.0.0.1:{proxy.port}")
        out = tmp_path / "slice.dcm"
        code, _, stderr = get(config, "-l", entry.lfn, str(out))
        assert code == 0, stderr
        assert proxy.accepted == 2
        assert pydicom.dcmread(out).SOPInstanceUID == entry.sop_uid
    with FaultyProxy(("127.0.0.1", port), drop_first=2) as proxy:
        config = client_config(tmp_path, key_servers, f"https://127.0.0.1:{proxy.port}")
        code, _, stderr = get(config, "-f", "-l", entry.lfn, str(out))
        assert code == 1 and "closed the connection before answering" in stderr, stderr
