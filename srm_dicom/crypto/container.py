"""Encrypted container of a served file: AES-256-GCM over fixed-size chunks (STREAM).

Chunks keep memory constant for a 1 GB volume and let a Range read decrypt only the
chunks it covers. Encryption is deterministic: the catalog records size and adler32 once
and restaging must reproduce those bytes, so the chunk key and the nonce prefix derive
from the file key and the content version instead of from randomness. That puts one rule
on callers: a (key, content version) pair never encrypts two different contents (GCM
nonces would repeat); whoever changes what a file holds bumps its content version.

Layout, integers big-endian::

    header, HEADER_SIZE (110) bytes:
        magic b"MDMENC" | format 1 (u8) | key id (16) | chunk size (u32)
        | content version (u32) | plaintext size (u64) | nonce prefix (7)
        | key commitment (32) | header tag (32)
    chunks, max(1, ceil(plaintext size / chunk size)) of them:
        AES-256-GCM ciphertext of chunk-size plaintext bytes (the last one may be
        shorter, or empty for an empty file) followed by its 16-byte tag;
        nonce = prefix | u32 chunk counter | last-chunk flag (0/1);
        associated data = the whole header.

The key commitment depends on the key alone, so a wrong key (or a wrong combination of
key shares) is told apart from tampered data before anything is decrypted. The header tag
authenticates the fields before the commitment, so a damaged header is reported as such
before its chunk size and plaintext size are trusted to read anything. The plaintext size
in the header is what tells a truncated file from an altered last chunk.
"""

from __future__ import annotations

import dataclasses
import hmac
import io
import secrets
import struct
import uuid
from collections.abc import Callable
from typing import IO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from srm_dicom.errors import MdmError

# What streams in and out: files, temporary files, sockets and io.RawIOBase adapters.
Stream = IO[bytes] | io.RawIOBase

MAGIC = b"MDMENC"
FORMAT_VERSION = 1
KEY_SIZE = 32
KEY_ID_SIZE = 16
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = (1 << 32) - 1
MAX_CHUNKS = 1 << 32

_FIELDS = struct.Struct(">6sB16sIIQ7s")
_DIGEST_SIZE = 32
HEADER_SIZE = _FIELDS.size + 2 * _DIGEST_SIZE
_NONCE_TAIL = struct.Struct(">IB")

_FILE_LABEL = b"srm-dicom container v1 key commitment and header key"
_CONTENT_LABEL = b"srm-dicom container v1 content "

ReadAt = Callable[[int, int], bytes]
Buffer = bytes | bytearray | memoryview


class ContainerError(MdmError):
    """An encrypted file that cannot be decrypted; the subclass says why."""


class NotAContainer(ContainerError):
    """Bad magic, or a container format this code does not read."""


class TruncatedContainer(ContainerError):
    """The bytes end inside the header or before the end of the final chunk."""


class TamperedHeader(ContainerError):
    """The header's fields do not match its tag under the right key."""


class TamperedChunk(ContainerError):
    """One chunk fails authentication at its own position and at every other one."""

    def __init__(self, index: int, count: int) -> None:
        super().__init__(f"chunk {index + 1} of {count} fails authentication: the file was altered")
        self.index = index


class ChunkOrderError(ContainerError):
    """A chunk authenticates at another position, or data follows the final chunk."""


class WrongKey(ContainerError):
    """The key does not match the header's commitment: wrong key or wrong key shares."""


@dataclasses.dataclass(frozen=True)
class Header:
    """The clear-text header: a client reads it to learn which key to fetch."""

    key_id: bytes
    chunk_size: int
    version: int
    plain_size: int
    nonce_prefix: bytes
    commitment: bytes
    tag: bytes

    @property
    def chunk_count(self) -> int:
        return _chunk_count(self.plain_size, self.chunk_size)

    @property
    def encrypted_size(self) -> int:
        return encrypted_size(self.plain_size, self.chunk_size)

    @property
    def key_uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.key_id)

    def fields(self) -> bytes:
        """The bytes the header tag authenticates: everything before the commitment."""
        return _FIELDS.pack(
            MAGIC,
            FORMAT_VERSION,
            self.key_id,
            self.chunk_size,
            self.version,
            self.plain_size,
            self.nonce_prefix,
        )

    def to_bytes(self) -> bytes:
        return self.fields() + self.commitment + self.tag

    def chunk_plain_size(self, index: int) -> int:
        return min(self.chunk_size, self.plain_size - index * self.chunk_size)

    def chunk_offset(self, index: int) -> int:
        return HEADER_SIZE + index * (self.chunk_size + TAG_SIZE)


def new_file_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def encrypted_size(plain_size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """Exact size of the container of ``plain_size`` bytes, known before encrypting."""
    _check_layout(plain_size, chunk_size)
    return HEADER_SIZE + plain_size + TAG_SIZE * _chunk_count(plain_size, chunk_size)


def read_header(source: Buffer | Stream) -> Header:
    """Parse the header from bytes (at least the header) or a file at its current position.

    Nothing is authenticated here: no key is needed, and the key id tells a client which
    key shares to fetch. Decryption authenticates the header before trusting it.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        raw = bytes(memoryview(source).cast("B")[:HEADER_SIZE])
    else:
        buffer = bytearray(HEADER_SIZE)
        raw = bytes(buffer[: _read_full(source, memoryview(buffer))])
    if not raw.startswith(MAGIC) and not MAGIC.startswith(raw):
        raise NotAContainer("not an encrypted srm-dicom file (bad magic)")
    if len(raw) < HEADER_SIZE:
        raise TruncatedContainer(
            f"encrypted file truncated: it ends after {len(raw)} of the "
            f"{HEADER_SIZE} header bytes"
        )
    fields = raw[: _FIELDS.size]
    _, fmt, key_id, chunk_size, version, plain_size, prefix = _FIELDS.unpack(fields)
    if fmt != FORMAT_VERSION:
        raise NotAContainer(
            f"encrypted file format {fmt} is not supported (this version reads {FORMAT_VERSION})"
        )
    if chunk_size == 0 or _chunk_count(plain_size, chunk_size) > MAX_CHUNKS:
        raise TamperedHeader(
            f"header is damaged: chunk size {chunk_size} for {plain_size} bytes is impossible"
        )
    return Header(
        key_id=key_id,
        chunk_size=chunk_size,
        version=version,
        plain_size=plain_size,
        nonce_prefix=prefix,
        commitment=raw[_FIELDS.size : _FIELDS.size + _DIGEST_SIZE],
        tag=raw[_FIELDS.size + _DIGEST_SIZE :],
    )


def check_key(header: Header, key: bytes) -> bool:
    """Whether ``key`` is the file's key; tells the right combination of key shares."""
    return hmac.compare_digest(header.commitment, _FileSecrets.of(key).commitment)


def encrypt_stream(
    key: bytes,
    key_id: bytes,
    version: int,
    src: Stream,
    dst: Stream,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    size: int | None = None,
) -> Header:
    """Encrypt ``size`` bytes of ``src`` (default: up to its end, if seekable) into ``dst``.

    The plaintext size goes in the header, so an unseekable source needs ``size``.
    Memory: two buffers of one chunk each. Writes exactly ``encrypted_size(size)`` bytes.
    """
    if size is None:
        size = _remaining(src)
    chunks = _Chunks.sealing(key, key_id, version, size, chunk_size)
    header = chunks.header
    dst.write(chunks.associated_data)
    plain = memoryview(bytearray(min(chunk_size, size)))
    sealed = memoryview(bytearray(len(plain) + TAG_SIZE))
    for index in range(header.chunk_count):
        length = header.chunk_plain_size(index)
        if _read_full(src, plain[:length]) < length:
            raise ValueError(f"source ended before the {size} bytes it was said to hold")
        chunks.aead.encrypt_into(
            chunks.nonce(index),
            plain[:length],
            chunks.associated_data,
            sealed[: length + TAG_SIZE],
        )
        dst.write(sealed[: length + TAG_SIZE])
    if src.read(1):
        raise ValueError(f"source holds more than the {size} bytes it was said to hold")
    return header


def encrypt_bytes(
    key: bytes,
    key_id: bytes,
    version: int,
    data: Buffer,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytearray:
    """The container of ``data``, built in place.

    A bytearray, not bytes: turning the filled buffer into bytes would copy the whole
    file once more, which costs as much as the encryption itself (see the benchmark).
    """
    plain = memoryview(data).cast("B")
    chunks = _Chunks.sealing(key, key_id, version, len(plain), chunk_size)
    header = chunks.header
    out = bytearray(header.encrypted_size)
    out_view = memoryview(out)
    out_view[:HEADER_SIZE] = chunks.associated_data
    for index in range(header.chunk_count):
        start = index * chunk_size
        length = header.chunk_plain_size(index)
        offset = header.chunk_offset(index)
        chunks.aead.encrypt_into(
            chunks.nonce(index),
            plain[start : start + length],
            chunks.associated_data,
            out_view[offset : offset + length + TAG_SIZE],
        )
    return out


def decrypt_stream(key: bytes, src: Stream, dst: Stream) -> Header:
    """Decrypt ``src`` (at the header) into ``dst`` in constant memory.

    Chunks are written as they authenticate: on an error, ``dst`` holds the authentic
    chunks before the bad one and must be discarded by the caller.
    """
    header = read_header(src)
    chunks = _Chunks.opened(header, key)
    sealed = memoryview(bytearray(min(header.chunk_size, header.plain_size) + TAG_SIZE))
    plain = memoryview(bytearray(len(sealed) - TAG_SIZE))
    for index in range(header.chunk_count):
        length = header.chunk_plain_size(index)
        if _read_full(src, sealed[: length + TAG_SIZE]) < length + TAG_SIZE:
            raise _truncated(header, index)
        chunks.decrypt_into(index, sealed[: length + TAG_SIZE], plain[:length])
        dst.write(plain[:length])
    if src.read(1):
        raise _trailing_data()
    return header


def decrypt_bytes(key: bytes, data: Buffer) -> bytearray:
    """The plaintext of a whole container, decrypted in place (bytearray: as encrypt_bytes)."""
    sealed = memoryview(data).cast("B")
    header = read_header(sealed)
    chunks = _Chunks.opened(header, key)
    out = bytearray(header.plain_size)
    out_view = memoryview(out)
    for index in range(header.chunk_count):
        start = index * header.chunk_size
        length = header.chunk_plain_size(index)
        offset = header.chunk_offset(index)
        chunk = sealed[offset : offset + length + TAG_SIZE]
        if len(chunk) < length + TAG_SIZE:
            raise _truncated(header, index)
        chunks.decrypt_into(index, chunk, out_view[start : start + length])
    if len(sealed) > header.encrypted_size:
        raise _trailing_data()
    return out


def decrypt_range(key: bytes, source: ReadAt | Stream, offset: int, length: int) -> bytes:
    """Plaintext bytes ``offset`` to ``offset + length`` (clipped at the end of the file).

    ``source`` is a seekable file or ``read_at(offset, size) -> bytes`` (an HTTP Range
    fetch, a pread). It is asked for the header, then once for the span of chunks that
    cover the range, and for nothing else.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"invalid range: offset {offset}, length {length}")
    read_at = source if callable(source) else _file_reader(source)
    header = read_header(read_at(0, HEADER_SIZE))
    chunks = _Chunks.opened(header, key)
    end = min(offset + length, header.plain_size)
    if offset >= end:
        return b""
    first, last = offset // header.chunk_size, (end - 1) // header.chunk_size
    span_start = header.chunk_offset(first)
    span_end = header.chunk_offset(last) + header.chunk_plain_size(last) + TAG_SIZE
    span = memoryview(read_at(span_start, span_end - span_start)).cast("B")
    plain = bytearray((last - first) * header.chunk_size + header.chunk_plain_size(last))
    plain_view = memoryview(plain)
    for index in range(first, last + 1):
        size = header.chunk_plain_size(index)
        at = header.chunk_offset(index) - span_start
        if len(span) < at + size + TAG_SIZE:
            raise _truncated(header, index)
        start = (index - first) * header.chunk_size
        chunks.decrypt_into(index, span[at : at + size + TAG_SIZE], plain_view[start : start + size])
    skip = offset - first * header.chunk_size
    return bytes(plain_view[skip : skip + end - offset])


@dataclasses.dataclass(frozen=True)
class _Chunks:
    """The per-content cipher of one file: its chunk key, nonce prefix and header bytes."""

    header: Header
    aead: AESGCM
    prefix: bytes
    associated_data: bytes

    @classmethod
    def sealing(
        cls, key: bytes, key_id: bytes, version: int, plain_size: int, chunk_size: int
    ) -> _Chunks:
        """Validate what the header will say, then derive everything from the key once."""
        if len(key) != KEY_SIZE:
            raise ValueError(f"file key must be {KEY_SIZE} bytes, not {len(key)}")
        if len(key_id) != KEY_ID_SIZE:
            raise ValueError(f"key id must be {KEY_ID_SIZE} bytes, not {len(key_id)}")
        if not 0 <= version < 1 << 32:
            raise ValueError(f"content version must fit 32 bits, not {version}")
        _check_layout(plain_size, chunk_size)
        derived = _FileSecrets.of(key)
        aead, prefix = _content_keys(key, version)
        unsealed = Header(key_id, chunk_size, version, plain_size, prefix, b"", b"")
        header = dataclasses.replace(
            unsealed,
            commitment=derived.commitment,
            tag=derived.header_tag(unsealed.fields()),
        )
        return cls(header, aead, prefix, header.to_bytes())

    @classmethod
    def opened(cls, header: Header, key: bytes) -> _Chunks:
        """Check the key, then the header, before any chunk is read."""
        derived = _FileSecrets.of(key)
        tag_ok = hmac.compare_digest(header.tag, derived.header_tag(header.fields()))
        if not hmac.compare_digest(header.commitment, derived.commitment):
            if tag_ok:
                raise TamperedHeader("header key commitment was altered: the file was altered")
            raise WrongKey(
                f"wrong key for this file (key id {header.key_uuid}): "
                "the key or the key shares combined are not this file's"
            )
        if not tag_ok:
            raise TamperedHeader("header fails authentication: the file was altered")
        aead, prefix = _content_keys(key, header.version)
        return cls(header, aead, prefix, header.to_bytes())

    def nonce(self, index: int) -> bytes:
        return self.prefix + _NONCE_TAIL.pack(index, index == self.header.chunk_count - 1)

    def decrypt_into(self, index: int, sealed: memoryview, out: memoryview) -> None:
        try:
            self.aead.decrypt_into(self.nonce(index), sealed, self.associated_data, out)
        except InvalidTag:
            raise self._diagnose(index, sealed) from None

    def _diagnose(self, index: int, sealed: memoryview) -> ContainerError:
        """Tell a chunk moved from elsewhere in this file from an altered one.

        Runs only after a failure: tries the chunk at every other position of the file.
        """
        count = self.header.chunk_count
        for other in range(count):
            if other == index or self.header.chunk_plain_size(other) + TAG_SIZE != len(sealed):
                continue
            try:
                self.aead.decrypt(self.nonce(other), sealed, self.associated_data)
            except InvalidTag:
                continue
            return ChunkOrderError(
                f"chunk {index + 1} of {count} holds chunk {other + 1}: "
                "chunks were reordered or dropped"
            )
        return TamperedChunk(index, count)


def _check_layout(plain_size: int, chunk_size: int) -> None:
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size must be 1 to {MAX_CHUNK_SIZE} bytes, not {chunk_size}")
    if not 0 <= plain_size < 1 << 64 or _chunk_count(plain_size, chunk_size) > MAX_CHUNKS:
        raise ValueError(f"{plain_size} bytes do not fit a container of {chunk_size}-byte chunks")


def _chunk_count(plain_size: int, chunk_size: int) -> int:
    return max(1, -(-plain_size // chunk_size))


def _hkdf(key: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(key)


@dataclasses.dataclass(frozen=True)
class _FileSecrets:
    """What derives from the key alone: the commitment and the header's MAC key."""

    commitment: bytes
    header_key: bytes

    @classmethod
    def of(cls, key: bytes) -> _FileSecrets:
        material = _hkdf(key, _FILE_LABEL, 2 * _DIGEST_SIZE)
        return cls(material[:_DIGEST_SIZE], material[_DIGEST_SIZE:])

    def header_tag(self, fields: bytes) -> bytes:
        return hmac.digest(self.header_key, fields, "sha256")


def _content_keys(key: bytes, version: int) -> tuple[AESGCM, bytes]:
    material = _hkdf(key, _CONTENT_LABEL + version.to_bytes(4, "big"), KEY_SIZE + NONCE_PREFIX_SIZE)
    return AESGCM(material[:KEY_SIZE]), material[KEY_SIZE:]


def _read_full(src: Stream, view: memoryview) -> int:
    """Fill ``view`` unless the stream ends; raw files and pipes may return short reads."""
    filled = 0
    while filled < len(view):
        got = src.readinto(view[filled:])  # type: ignore[union-attr]  # IO lacks readinto; files have it
        if not got:
            break
        filled += got
    return filled


def _remaining(src: Stream) -> int:
    if not src.seekable():
        raise ValueError("the plaintext size is needed to encrypt an unseekable stream")
    here = src.tell()
    end = src.seek(0, io.SEEK_END)
    src.seek(here)
    return end - here


def _file_reader(file: Stream) -> ReadAt:
    def read_at(offset: int, size: int) -> bytes:
        file.seek(offset)
        return file.read(size)

    return read_at


def _truncated(header: Header, index: int) -> TruncatedContainer:
    return TruncatedContainer(
        f"encrypted file truncated: it ends inside chunk {index + 1} of {header.chunk_count} "
        f"({header.encrypted_size} bytes expected)"
    )


def _trailing_data() -> ChunkOrderError:
    return ChunkOrderError("data follows the final chunk: chunks were added or reordered")
