"""GET and HEAD of a file: rights, staging (or 503 while it runs), Range and RFC 3230 Digest.

Served here rather than by wsgidav because the contract real clients rely on goes beyond
what its GET offers: multi-range answers, ``Digest`` from the catalog, a 503 with
``Retry-After`` and a problem body while the PACS is being read.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

from srm_dicom.cache import discard, intact
from srm_dicom.catalog import Entry
from srm_dicom.config import Config
from srm_dicom.identity import Identity
from srm_dicom.names import COMPRESSED_VOLUME, SIDECARS, VOLUME
from srm_dicom.server.digests import content_digest, digest_header, repr_digest, wanted_digests, wanted_rfc9530
from srm_dicom.server.observe import mark_transfer
from srm_dicom.server.problems import StartResponse, problem
from srm_dicom.service import StorageService
from srm_dicom.stager import StageFailed, StagingPending

BLOCK = 1 << 20
_RANGE = re.compile(r"^\s*([0-9]{0,19})\s*-\s*([0-9]{0,19})\s*$")
# Ranges in one answer, once coalesced (multi-stream clients ask for one range per request);
# range specs in one header, before (a 64 KiB header holds thousands).
MAX_RANGES = 16
MAX_RANGE_SPECS = 256


def parse_ranges(header: str, size: int) -> list[tuple[int, int]] | None:
    """Byte ranges (first, last inclusive) of a Range header, in order, overlapping and adjacent
    ones coalesced; None means "ignore the header" (not bytes, malformed, or more than
    MAX_RANGES ranges once coalesced: RFC 9110 §14.2 lets a server serve the whole file
    then), [] means unsatisfiable. So a request never costs more than the file once."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or not spec or spec.count(",") >= MAX_RANGE_SPECS:
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
    coalesced: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if coalesced and first <= coalesced[-1][1] + 1:
            coalesced[-1] = (coalesced[-1][0], max(last, coalesced[-1][1]))
        else:
            coalesced.append((first, last))
    return None if len(coalesced) > MAX_RANGES else coalesced


def _read(source: BinaryIO, first: int, last: int) -> Iterator[bytes]:
    source.seek(first)
    left = last - first + 1
    while left > 0:
        block = source.read(min(BLOCK, left))
        if not block:
            return
        left -= len(block)
        yield block


def _read_all(source: BinaryIO, first: int, last: int) -> Iterator[bytes]:
    with source:
        yield from _read(source, first, last)


class FileService:
    """HTTP of file GET and HEAD; who may read and the staging are the StorageService's."""

    def __init__(self, config: Config, service: StorageService) -> None:
        self._config = config
        self._service = service

    def serve(self, environ: dict, start_response: StartResponse, entry: Entry, identity: Identity) -> Iterator[bytes]:
        head = environ["REQUEST_METHOD"] == "HEAD"
        try:
            opened = self._service.open(identity, entry, stage=not head)
        except StagingPending as exc:
            return iter(self._unavailable(start_response, str(exc)))
        except StageFailed as exc:
            if exc.reason.startswith("not a volume"):  # permanent: retrying cannot help
                return iter(problem(start_response, HTTPStatus.UNPROCESSABLE_ENTITY, exc.reason))
            if exc.reason.startswith("cache full"):  # reasons travel between front ends as text
                return iter(self._unavailable(start_response, exc.reason, HTTPStatus.INSUFFICIENT_STORAGE))
            return iter(self._unavailable(start_response, exc.reason))
        entry, path, staged = opened.entry, opened.path, opened.staged
        if entry.size is None:
            return iter(self._unavailable(start_response, f"{entry.lfn} has not been assembled yet; stage it first"))
        source = None if head else self._source(entry, path, staged)
        if isinstance(source, str):
            return iter(self._unavailable(start_response, source))
        mark_transfer(environ, entry, staged)
        headers = [
            ("Content-Type", "application/octet-stream"),
            ("Accept-Ranges", "bytes"),
            ("ETag", f'"{entry.guid}-{entry.content_version}"'),
            ("Last-Modified", formatdate(entry.modified, usegmt=True)),
        ]
        headers += self._sidecar_links(entry, identity)
        size = entry.size
        ranges = parse_ranges(environ.get("HTTP_RANGE", ""), size) if environ.get("HTTP_RANGE") else None
        headers += self._digests(environ, entry, path, ranges)
        if ranges == [] or source is None:
            if source is not None:
                source.close()
            if ranges == []:
                start_response("416 Range Not Satisfiable", [("Content-Range", f"bytes */{size}"), *headers,
                                                             ("Content-Length", "0")])
            else:  # a HEAD
                start_response("200 OK", [*headers, ("Content-Length", str(size))])
            return iter([])
        if not ranges:
            start_response("200 OK", [*headers, ("Content-Length", str(size))])
            return _read_all(source, 0, size - 1)
        if len(ranges) == 1:
            first, last = ranges[0]
            start_response("206 Partial Content", [*headers, ("Content-Range", f"bytes {first}-{last}/{size}"),
                                                   ("Content-Length", str(last - first + 1))])
            return _read_all(source, first, last)
        return self._multipart(start_response, headers, source, ranges, size)

    def _sidecar_links(self, entry: Entry, identity: Identity) -> list[tuple[str, str]]:
        """A series volume's sidecars the caller may list, by GUID (RFC 8288 Link,
        rel="describedby", titled with the sidecar's name): how ``mdm get -g`` finds them
        from the volume's GUID alone, without learning its LFN."""
        if entry.kind != "volume" or entry.sop_uid not in (VOLUME, COMPRESSED_VOLUME):
            return []
        volume = entry.lfn.removesuffix(COMPRESSED_VOLUME[len(VOLUME):])
        links = []
        for name in SIDECARS:
            sidecar = self._service.visible(identity, f"{volume}{name[len(VOLUME):]}")
            if sidecar is not None:
                links.append(f'</guid/{sidecar.guid}>; rel="describedby"; title="{name}"')
        return [("Link", ", ".join(links))] if links else []

    def _source(self, entry: Entry, path: Path | None, staged: bool) -> BinaryIO | str:
        """The open file to serve, or why not (a 503's detail). Opened now: once open, the cache
        evicting it cannot take the bytes away mid-answer. A file that was already on disk is
        checked against the catalog first (``cache.intact``: its size, and its adler32 if its
        stat signature changed since it was last verified); one that is not is removed and
        staged again from the PACS, never served."""
        assert path is not None  # a GET staged the file, or found it on disk
        try:
            source = path.open("rb")
            if staged or intact(source, entry.size or 0, entry.adler32):
                return source
            source.close()
            discard(path)
            why = "was corrupt in the cache"
        except FileNotFoundError:  # evicted since it was looked up: staged again (byte-identical)
            why = "was evicted meanwhile"
        try:
            return self._service.stager.fetch(entry, self._config.cache.wait_timeout).open("rb")
        except (StagingPending, StageFailed, FileNotFoundError) as exc:
            reason = exc.reason if isinstance(exc, StageFailed) else str(exc)
            return f"{entry.lfn} {why} and is being staged again: {reason}"

    @staticmethod
    def _digests(environ: dict, entry: Entry, path: Path | None,
                 ranges: list[tuple[int, int]] | None) -> list[tuple[str, str]]:
        """Digest (RFC 3230), Repr-Digest and Content-Digest (RFC 9530), as asked (server/digests.py)."""
        found = []
        if value := digest_header(entry, path, wanted_digests(environ.get("HTTP_WANT_DIGEST", ""))):
            found.append(("Digest", value))
        if value := repr_digest(entry, path, wanted_rfc9530(environ.get("HTTP_WANT_REPR_DIGEST", ""))):
            found.append(("Repr-Digest", value))
        wanted = wanted_rfc9530(environ.get("HTTP_WANT_CONTENT_DIGEST", ""))
        single = not ranges or len(ranges) == 1  # a multipart answer's content is not the file's
        if wanted and single and (value := content_digest(entry, path, wanted, ranges[0] if ranges else None)):
            found.append(("Content-Digest", value))
        return found

    def _unavailable(self, start_response: StartResponse, detail: str,
                     status: HTTPStatus = HTTPStatus.SERVICE_UNAVAILABLE) -> list[bytes]:
        """503 (or 507 for a full cache) with Retry-After: rclone, davix and gfal2 come back later."""
        retry = str(self._config.cache.retry_after)
        return problem(start_response, status, detail, [("Retry-After", retry)])

    def _multipart(self, start_response: StartResponse, headers: list, source: BinaryIO,
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
            with source:
                for index, ((first, last), part) in enumerate(zip(ranges, parts, strict=True)):
                    yield (b"\r\n" if index else b"") + part
                    yield from _read(source, first, last)
                yield closing

        return body()
