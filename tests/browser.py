"""Headless Chromium for the page tests, and where their screenshots go.

Chromium loads pages from the real storage element. Headless Chromium cannot pick a TLS
client certificate without a system-wide policy, so a page that needs a user's identity is
fetched through ``CertForwarder``: a loopback HTTP server that forwards each GET to the
storage element over mutual TLS with that user's certificate, as the user's browser would.
"""

from __future__ import annotations

import os
import struct
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import require_program
from https import request

OUTPUT = Path(os.environ.get("MDM_TEST_OUTPUT", Path(__file__).resolve().parents[1] / "test-output"))


def output_dir(name: str) -> Path:
    """The folder of the test output (``$MDM_TEST_OUTPUT``, default test-output/) for ``name``."""
    folder = OUTPUT / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _chromium(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    program = require_program("chromium")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [program, "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
             f"--user-data-dir={profile}", "--window-size=1280,1000", *args, url],
            capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
        )


def dump_dom(url: str) -> str:
    """The DOM Chromium built from the page (after parsing, as a person's browser shows it)."""
    done = _chromium(url, "--dump-dom")
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


def screenshot(url: str, path: Path) -> tuple[int, int]:
    """Save a PNG of the page; returns its width and height (from the PNG header)."""
    path.unlink(missing_ok=True)
    done = _chromium(url, f"--screenshot={path}")
    assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


class CertForwarder:
    """http://127.0.0.1:PORT/PATH → the storage element's PATH as ``user`` (see the module docstring)."""

    def __init__(self, url: str, pki: Path, user: str) -> None:
        target = (url, pki, user)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                answer = request(*target, "GET", self.path, headers={"Accept": self.headers.get("Accept", "*/*")})
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.headers.get("content-type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CertForwarder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
