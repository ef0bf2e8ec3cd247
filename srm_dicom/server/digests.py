"""Digests of a file, as every transfer tool asks for them (README, "Digests").

- RFC 3230 ``Want-Digest`` → ``Digest``: ``adler32`` as 8 hex digits (what gfal2, FTS and
  davix compare), ``md5`` and ``sha-256`` in base64. Only what was asked, in the caller's
  order; unknown algorithms are ignored.
- RFC 9530 ``Want-Repr-Digest`` → ``Repr-Digest`` (the whole file) and ``Want-Content-Digest``
  → ``Content-Digest`` (the bytes of this answer: a range's bytes for a 206): ``sha-256``,
  ``sha-512`` and ``adler``, as structured-field byte sequences.

Size, adler32 and SHA-256 come from the catalog (recorded at registration or at a volume's
first assembly), so HEAD answers them without staging; md5 and sha-512 are read from the
cached file, when it is on disk.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from srm_dicom.catalog import Entry

BLOCK = 1 << 20
RFC3230 = ("adler32", "md5", "sha-256")
RFC9530 = ("sha-256", "sha-512", "adler")
_WEIGHT = re.compile(r"^\s*([A-Za-z0-9_.*-]+)\s*(?:=\s*([0-9]+))?\s*$")


def wanted_digests(header: str) -> list[str]:
    """Algorithms of a Want-Digest header we support, in the caller's order; q=0 refuses one."""
    algorithms = []
    for item in header.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if "q=0" in params.replace(" ", "") and not re.search(r"q=0\.\d*[1-9]", params):
            continue
        if name in RFC3230 and name not in algorithms:
            algorithms.append(name)
    return algorithms


def wanted_rfc9530(header: str) -> list[str]:
    """Algorithms of a Want-Repr-Digest or Want-Content-Digest header (an RFC 8941 dictionary of
    preferences 0–10; 0 means "not this one"), most preferred first; malformed members ignored."""
    weighted: dict[str, int] = {}
    for item in header.split(","):
        match = _WEIGHT.match(item.split(";", 1)[0])
        if not match:
            continue
        name, weight = match.group(1).lower(), int(match.group(2) or 1)
        if name in RFC9530 and 0 < weight <= 10 and name not in weighted:
            weighted[name] = weight
    return sorted(weighted, key=lambda n: -weighted[n])


def _hash_file(path: Path, make: Callable[[], Any], first: int = 0, last: int | None = None) -> bytes:
    digest = make()
    with path.open("rb") as source:
        source.seek(first)
        left = None if last is None else last - first + 1
        while left is None or left > 0:
            block = source.read(BLOCK if left is None else min(BLOCK, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            digest.update(block)
    return digest.digest()


def _adler_bytes(path: Path, first: int, last: int) -> bytes:
    value = 1
    with path.open("rb") as source:
        source.seek(first)
        left = last - first + 1
        while left > 0 and (block := source.read(min(BLOCK, left))):
            left -= len(block)
            value = zlib.adler32(block, value)
    return value.to_bytes(4, "big")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def digest_header(entry: Entry, path: Path | None, wanted: list[str]) -> str | None:
    """The RFC 3230 ``Digest`` value for ``wanted``; what cannot be known now is left out."""
    parts = []
    for algorithm in wanted:
        if algorithm == "adler32" and entry.adler32:
            parts.append(f"adler32={int(entry.adler32, 16):08x}")
        elif algorithm == "sha-256" and entry.sha256:
            parts.append(f"sha-256={_b64(bytes.fromhex(entry.sha256))}")
        elif algorithm == "md5" and path is not None:
            parts.append(f"md5={_b64(_hash_file(path, hashlib.md5))}")
    return ",".join(parts) or None


def repr_digest(entry: Entry, path: Path | None, wanted: list[str]) -> str | None:
    """The RFC 9530 ``Repr-Digest`` of the whole file."""
    parts = []
    for algorithm in wanted:
        value = None
        if algorithm == "sha-256" and entry.sha256:
            value = bytes.fromhex(entry.sha256)
        elif algorithm == "adler" and entry.adler32:
            value = int(entry.adler32, 16).to_bytes(4, "big")
        elif algorithm == "sha-512" and path is not None:
            value = _hash_file(path, hashlib.sha512)
        if value is not None:
            parts.append(f"{algorithm}=:{_b64(value)}:")
    return ", ".join(parts) or None


def content_digest(entry: Entry, path: Path | None, wanted: list[str], span: tuple[int, int] | None) -> str | None:
    """The RFC 9530 ``Content-Digest`` of this answer's bytes: the whole file, or ``span``
    (first, last) of a single-range 206, which is read from the cached file."""
    if span is None or (entry.size is not None and span == (0, entry.size - 1)):
        return repr_digest(entry, path, wanted)
    if path is None:
        return None
    first, last = span
    parts = []
    for algorithm in wanted:
        if algorithm == "adler":
            value = _adler_bytes(path, first, last)
        else:
            value = _hash_file(path, hashlib.sha256 if algorithm == "sha-256" else hashlib.sha512, first, last)
        parts.append(f"{algorithm}=:{_b64(value)}:")
    return ", ".join(parts) or None
