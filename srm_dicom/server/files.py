"""GET and HEAD of a file: rights, staging (or 503 while it runs), Range and RFC 3230 Digest.

Served here rather than by wsgidav because the contract real clients rely on goes beyond
what its GET offers: multi-range answers, ``Digest`` from the catalog, a 503 with
``Retry-After`` and a problem body while the PACS is being read.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Iterator
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path

from srm_dicom.access import may_list, may_read
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.config import Config
from srm_dicom.identity import Identity
from srm_dicom.server.observe import mark_transfer
from srm_dicom.server.problems import StartResponse, problem
from srm_dicom.stager import StageFailed, Stager, StagingPending

BLOCK = 1 << 20
_RANGE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """Byte ranges (first, last inclusive) of a Range header; None means "ignore the header"
    (not bytes, or malformed: RFC 9110 says serve the whole file), [] means unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec:
        return None
    ranges = []
    for part in spec.split(","):
        match = _RANGE.match(part)
        if not match or match.groups() == ("", ""):
            return None
        first, last = match.groups()
        if first == "":
            length = int(last)
            if length > 0 and size > 0:
                ranges.append((max(0, size - length), size - 1))
        else:
            start, end = int(first), int(last) if last else size - 1
            if last and end < start:
                return None
            if start < size:
                ranges.append((start, min(end, size - 1)))
    return ranges


def wanted_digests(header: str) -> list[str]:
    """Algorithms of a Want-Digest header we support, in the caller's order; others are ignored."""
    algorithms = []
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if "q=0" in params.replace(" ", "") and not re.search(r"q=0\.\d*[1-9]", params):
            continue
        if name in ("adler32", "md5") and name not in algorithms:
            algorithms.append(name)
    return algorithms


def _md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - RFC 3230 md5 is asked for by clients, not used for security
    with path.open("rb") as source:
        while block := source.read(BLOCK):
            digest.update(block)
    return base64.b64encode(digest.digest()).decode()


def _read(path: Path, first: int, last: int) -> Iterator[bytes]:
    with path.open("rb") as source:
        source.seek(first)
        left = last - first + 1
        while left > 0:
            block = source.read(min(BLOCK, left))
            if not block:
                return
            left -= len(block)
            yield block


class FileService:
    def __init__(self, config: Config, catalog: Catalog, stager: Stager) -> None:
        self._config = config
        self._catalog = catalog
        self._stager = stager

    def serve(self, environ: dict, start_response: StartResponse, entry: Entry, identity: Identity) -> Iterator[bytes]:
        if not may_list(identity, entry) or not may_read(identity, entry):
            return iter(problem(start_response, HTTPStatus.FORBIDDEN, f"{identity.subject} may not read {entry.lfn}"))
        head = environ["REQUEST_METHOD"] == "HEAD"
        path = self._stager.cached_path(entry)
        staged = path is None
        if path is None and not head:
            try:
                path = self._stager.fetch(entry, self._config.cache.wait_timeout)
            except StagingPending as exc:
                return iter(self._unavailable(start_response, str(exc)))
            except StageFailed as exc:
                if exc.reason.startswith("not a volume"):  # permanent: retrying cannot help
                    return iter(problem(start_response, HTTPStatus.UNPROCESSABLE_ENTITY, exc.reason))
                return iter(self._unavailable(start_response, exc.reason))
            entry = self._catalog.namespace.lookup_guid(entry.guid) or entry  # a volume's size is known now
        if entry.size is None:
            return iter(self._unavailable(start_response, f"{entry.lfn} has not been assembled yet; stage it first"))
        mark_transfer(environ, entry, staged)
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Accept-Ranges", "bytes"),
            ("ETag", f'"{entry.guid}-{entry.content_version}"'),
            ("Last-Modified", formatdate(entry.modified, usegmt=True)),
        ]
        digests = []
        for algorithm in wanted_digests(environ.get("HTTP_WANT_DIGEST", "")):
            if algorithm == "adler32" and entry.adler32:
                digests.append(f"adler32={entry.adler32}")
            elif algorithm == "md5" and path is not None:
                digests.append(f"md5={_md5(path)}")
        if digests:
            headers.append(("Digest", ",".join(digests)))
        size = entry.size
        ranges = parse_ranges(environ.get("HTTP_RANGE", ""), size) if environ.get("HTTP_RANGE") else None
        if ranges == []:
            start_response("416 Range Not Satisfiable", [("Content-Range", f"bytes */{size}"), *headers,
                                                         ("Content-Length", "0")])
            return iter([])
        if head:
            start_response("200 OK", [*headers, ("Content-Length", str(size))])
            return iter([])
        assert path is not None  # a GET staged the file above
        if not ranges:
            start_response("200 OK", [*headers, ("Content-Length", str(size))])
            return _read(path, 0, size - 1)
        if len(ranges) == 1:
            first, last = ranges[0]
            start_response("206 Partial Content", [*headers, ("Content-Range", f"bytes {first}-{last}/{size}"),
                                                   ("Content-Length", str(last - first + 1))])
            return _read(path, first, last)
        return self._multipart(start_response, headers, path, ranges, size)

    def _unavailable(self, start_response: StartResponse, detail: str) -> list[bytes]:
        """503 with Retry-After: rclone, davix and gfal2 come back later."""
        retry = str(self._config.cache.retry_after)
        return problem(start_response, HTTPStatus.SERVICE_UNAVAILABLE, detail, [("Retry-After", retry)])

    def _multipart(self, start_response: StartResponse, headers: list, path: Path,
                   ranges: list[tuple[int, int]], size: int) -> Iterator[bytes]:
        boundary = secrets.token_hex(16)
        parts = [
            (f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
             f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n").encode()
            for first, last in ranges
        ]
        closing = f"\r\n--{boundary}--\r\n".encode()
        length = sum(len(p) for p in parts) + sum(last - first + 1 for first, last in ranges)
        length += 2 * (len(ranges) - 1) + len(closing)
        kept = [h for h in headers if h[0] != "Content-Type"]
        start_response("206 Partial Content", [*kept, ("Content-Type", f"multipart/byteranges; boundary={boundary}"),
                                               ("Content-Length", str(length))])

        def body() -> Iterator[bytes]:
            for index, ((first, last), part) in enumerate(zip(ranges, parts, strict=True)):
                yield (b"\r\n" if index else b"") + part
                yield from _read(path, first, last)
            yield closing

        return body()
