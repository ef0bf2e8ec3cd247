"""Fire the hostile inputs of issue 12's probe at a running ``mdm demo``, then read its log.

The demo runs the real storage element (``mdm serve`` with key servers, embedded PACS and
push listener) in a temporary directory. Each probe is one of the issue's findings, sent
as raw bytes over TLS as the demo physician bob (so nothing is normalized on the way):
header injection through QIDO keys, invalid UTF-8 in WebDAV paths, huge and non-ASCII
offsets, deeply nested JSON, ``Depth: infinity``, 100 overlapping ranges, a 32 MiB header,
a short body, 40 slow-header connections beside a normal client, and malformed DICOM
pushes. Each answer must be deliberate (no 5xx, no dropped connection, the limit the
issue asks for) and the demo's log must hold no ``Traceback``. A README command:

    python tests/fuzz/probe_demo.py [--workdir DIR]

and ``tests/fuzz/test_probe_demo.py`` runs it in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE, _config

from srm_dicom.synthetic import make_series

SLOW_ADDRESS = "127.0.0.2"  # the slow clients' own address: one client, held to its own connection limit


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


@dataclass
class Outcome:
    probe: str
    answer: str  # what came back, for the table
    ok: bool


class Demo:
    """A running ``mdm demo`` and bob's TLS context to it."""

    def __init__(self, workdir: Path, log: Path) -> None:
        self.workdir, self.log = workdir, log
        self.process = subprocess.Popen([shutil.which("mdm") or "mdm", "demo", "--workdir", str(workdir)],
                                        stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                                        stdin=subprocess.DEVNULL, env=dict(os.environ))
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("demo ready"):
                break
        else:
            raise RuntimeError(f"mdm demo did not start:\n{log.read_text()}")
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # never block its prints
        config = tomllib.loads((workdir / "mdm.toml").read_text())
        self.host, self.port = config["server"]["host"], int(config["server"]["port"])
        self.push = (config["listen"].get("host", "127.0.0.1"), int(config["listen"]["port"]), config["listen"]["aet"])
        bob = workdir / "users" / "bob"
        self.context = ssl.create_default_context(cafile=str(workdir / "ca.pem"))
        self.context.load_cert_chain(bob / "cert.pem", bob / "key.pem")
        self.slices = self._slices()

    def _slices(self) -> list[str]:
        """Slice LFNs, as ``mdm ls`` lists them (study, series, then its entries)."""
        directory = "/grid/demo/mdm"
        for _ in range(2):
            directory = self._ls(directory)[0]
        return [lfn for lfn in self._ls(directory) if "/3D" not in lfn]

    def _ls(self, directory: str) -> list[str]:
        listed = subprocess.run([shutil.which("mdm") or "mdm", "ls", directory], capture_output=True, text=True,
                                env={**os.environ, "MDM_CONFIG": str(self.workdir / "mdm.toml")}, check=True)
        return [name if name.startswith("/") else f"{directory}/{name.rstrip('/')}" for name in listed.stdout.split()]

    def connect(self, timeout: float = 60, address: str = "127.0.0.1") -> ssl.SSLSocket:
        """A connection from ``address`` (the server limits connections per client address)."""
        raw = socket.create_connection((self.host, self.port), timeout=timeout, source_address=(address, 0))
        return self.context.wrap_socket(raw, server_hostname="localhost")

    def request(self, data: bytes, timeout: float = 60) -> Answer:
        """One raw request on a connection of its own; the answer as read by http.client."""
        with self.connect(timeout) as tls:
            tls.sendall(data)
            response = http.client.HTTPResponse(tls, method=data.split(b" ", 1)[0].decode())
            response.begin()
            return Answer(response.status, response.headers, response.read())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _get(path: str, *headers: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode("latin-1")


def _post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _problem(answer: Answer, *statuses: int) -> bool:
    return answer.status in statuses and answer.headers.get_content_type() == "application/problem+json"


def _http_probes(demo: Demo) -> list[tuple[str, Callable[[], tuple[str, bool]]]]:
    lfn = demo.slices[0]
    series = lfn.rsplit("/", 1)[0]
    deep = b'{"files": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def answer(request: bytes, check: Callable[[Answer], bool]) -> Callable[[], tuple[str, bool]]:
        def probe() -> tuple[str, bool]:
            got = demo.request(request)
            return f"{got.status} {got.headers.get_content_type()}", got.status < 500 and check(got)
        return probe

    def no_cookie(got: Answer) -> bool:
        return "Set-Cookie" not in got.headers and not got.body.startswith(b"INJECTED")

    def ranges() -> tuple[str, bool]:
        size = len(demo.request(_get(lfn)).body)
        got = demo.request(_get(lfn, "Range: bytes=" + ",".join(f"{i}-{i + size // 2}" for i in range(100))))
        return f"{got.status}, {len(got.body)} bytes of a {size}-byte file", got.status < 500 and len(got.body) <= size

    def huge_header() -> tuple[str, bool]:
        with demo.connect() as tls:
            with contextlib.suppress(OSError):  # refused before the end: what the server answered is still there
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 << 20) + b"\r\n\r\n")
            response = http.client.HTTPResponse(tls)
            response.begin()
            return f"{response.status}", response.status in (400, 431)

    def short_body() -> tuple[str, bool]:
        started = time.monotonic()
        got = demo.request(b"POST /api/v1/tape/stage HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 1000\r\n\r\n{\"files\"")
        return f"{got.status} after {time.monotonic() - started:.0f} s", got.status in (400, 408)

    def slow_headers() -> tuple[str, bool]:
        stop, opened = threading.Event(), []

        def drip() -> None:
            try:
                with demo.connect(timeout=30, address=SLOW_ADDRESS) as tls:
                    opened.append(tls)
                    tls.sendall(b"GET /grid/ HTTP/1.1\r\nHost: x\r\n")
                    while not stop.wait(1.0):
                        tls.sendall(b"X")
            except OSError:
                pass

        threads = [threading.Thread(target=drip, daemon=True) for _ in range(40)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        started = time.monotonic()
        try:
            got = demo.request(_get(lfn), timeout=30)
        finally:
            stop.set()
        seconds = time.monotonic() - started
        return (f"{got.status} in {seconds:.1f} s beside {len(opened)} slow connections (of 40 tried; the rest refused"
                " by the per-client limit)", got.status == 200 and seconds < 10)

    return [
        ("QIDO key with CR LF (Set-Cookie)", answer(_get("/dicom-web/instances?limit=1&x%0d%0aSet-Cookie:%20a%3Db=1"),
                                                    no_cookie)),
        ("QIDO key with CR LF CR LF (a body)", answer(_get("/dicom-web/instances?limit=1&x%0d%0a%0d%0aINJECTED"),
                                                      no_cookie)),
        ("QIDO key not Latin-1", answer(_get("/dicom-web/instances?limit=1&%E2%82%AC=1"), lambda a: True)),
        ("QIDO empty UID intersection", answer(_get("/dicom-web/studies/1.2.3/instances?StudyInstanceUID=4.5.6"),
                                               lambda a: a.status == 200)),
        ("QIDO offset > 2^63-1", answer(_get("/dicom-web/instances?offset=99999999999999999999999"),
                                        lambda a: _problem(a, 400))),
        ("QIDO offset=²", answer(_get("/dicom-web/instances?offset=%C2%B2"), lambda a: _problem(a, 400))),
        ("QIDO includefield=OriginalSOPInstanceUID", answer(
            _get("/dicom-web/instances?limit=1&includefield=OriginalSOPInstanceUID"), lambda a: True)),
        ("metadata integer beyond SQLite", answer(_get("/api/v1/metadata?q=Rows%3D" + "9" * 40),
                                                  lambda a: a.status in (200, 400))),
        ("metadata 1000 terms", answer(_get("/api/v1/metadata?q=" + "%20or%20".join(["Rows%3D1"] * 1000)),
                                       lambda a: a.status in (200, 400, 413, 414))),
        ("Tape REST deep JSON", answer(_post("/api/v1/tape/stage", deep), lambda a: _problem(a, 400, 413))),
        ("rights deep JSON", answer(_post("/api/v1/rights", deep), lambda a: _problem(a, 400, 413))),
        ("delete deep JSON", answer(_post("/api/v1/delete", deep), lambda a: _problem(a, 400, 413))),
        ("Tape REST diskLifetime 10^30", answer(
            _post("/api/v1/tape/stage", json.dumps({"files": [{"path": lfn, "diskLifetime": 10**30}]}).encode()),
            lambda a: a.status in (201, 400))),
        ("WebDAV GET invalid UTF-8", answer(_get("/grid/demo/%ff%fe"), lambda a: _problem(a, 400, 404))),
        ("WebDAV PROPFIND raw invalid UTF-8", answer(
            b"PROPFIND /grid/demo/\xff\xfe/ HTTP/1.1\r\nHost: x\r\nDepth: 1\r\n\r\n", lambda a: _problem(a, 400, 404))),
        ("PROPFIND Depth: infinity", answer(
            f"PROPFIND {series}/ HTTP/1.1\r\nHost: x\r\nDepth: infinity\r\n\r\n".encode(),
            lambda a: _problem(a, 403) and b"propfind-finite-depth" in a.body)),
        ("100 overlapping ranges", ranges),
        ("a 32 MiB header", huge_header),
        ("a short body", short_body),
        ("40 slow-header connections", slow_headers),
    ]


def _malformed_pushes(demo: Demo, workdir: Path) -> list[tuple[str, Callable[[], tuple[str, bool]]]]:
    """Pushes whose data set cannot be decoded: a deflated one with a broken stream, a truncated one."""
    ds = make_series(slices=1, size=8, seed="probe push")[0]
    files = {}
    for name, syntax in (("deflated, stream broken", DeflatedExplicitVRLittleEndian),
                         ("explicit VR, truncated", ExplicitVRLittleEndian)):
        ds.file_meta.TransferSyntaxUID = syntax
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = bytearray(buffer.getvalue())
        if syntax == DeflatedExplicitVRLittleEndian:
            for at in range(len(data) - 200, len(data) - 100):
                data[at] ^= 0x5A
        else:
            del data[len(data) - 300:]
        files[name] = workdir / f"push-{len(files)}.dcm"
        files[name].write_bytes(bytes(data))

    def push(path: Path) -> Callable[[], tuple[str, bool]]:
        def probe() -> tuple[str, bool]:
            host, port, aet = demo.push
            ae = AE(ae_title="PROBE")
            for syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian):  # one syntax per context
                ae.add_requested_context(str(ds.SOPClassUID), syntax)
            chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
            association = ae.associate(host, port, ae_title=aet)
            try:
                if not association.is_established:
                    return "association refused", False
                status = association.send_c_store(path)
                code = int(status.Status) if "Status" in status else None
                return f"C-STORE status {code:#06x}" if code is not None else "no answer", code == 0xC000
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = chunked
                if association.is_established:
                    association.release()
        return probe

    return [(f"push of a malformed data set ({name})", push(path)) for name, path in files.items()]


def run(workdir: Path) -> tuple[list[Outcome], int]:
    """Every probe's outcome, and the count of tracebacks in the demo's log."""
    log = workdir / "demo.log"
    demo = Demo(workdir / "demo", log)
    outcomes = []
    try:
        for name, probe in _http_probes(demo) + _malformed_pushes(demo, workdir):
            try:
                answer, ok = probe()
            except Exception as exc:  # noqa: BLE001 - a dropped connection or a hang is the probe's finding
                answer, ok = f"{type(exc).__name__}: {exc}", False
            outcomes.append(Outcome(name, answer, ok))
    finally:
        demo.stop()
    return outcomes, log.read_text(errors="replace").count("Traceback")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep the demo and its log here (default: a temporary dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mdm-probe-"))
    workdir.mkdir(parents=True, exist_ok=True)
    outcomes, tracebacks = run(workdir)
    for outcome in outcomes:
        print(f"{'ok  ' if outcome.ok else 'FAIL'} {outcome.probe}: {outcome.answer}")
    print(f"{sum(o.ok for o in outcomes)} of {len(outcomes)} probes answered as they should;"
          f" tracebacks in the demo's log: {tracebacks} (log: {workdir / 'demo.log'})")
    return 0 if all(o.ok for o in outcomes) and not tracebacks else 1


if __name__ == "__main__":
    sys.exit(main())
