"""The encrypted container: what the catalog, the HTTP server and the client rely on."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from srm_dicom.crypto.container import (
    HEADER_SIZE,
    TAG_SIZE,
    ChunkOrderError,
    ContainerError,
    NotAContainer,
    TamperedChunk,
    TamperedHeader,
    TruncatedContainer,
    WrongKey,
    check_key,
    decrypt_bytes,
    decrypt_range,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    encrypted_size,
    new_file_key,
    read_header,
)
from srm_dicom.errors import MdmError

CHUNK = 64
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 4 * CHUNK, 5 * CHUNK + 7]
KEY = bytes(range(32))
KEY_ID = bytes.fromhex("0f8fad5bd9cb469fa16570867728950e")


def plaintext(size: int) -> bytes:
    return hashlib.shake_256(b"plaintext %d" % size).digest(size) if size else b""


def sealed(size: int, version: int = 1) -> bytes:
    return encrypt_bytes(KEY, KEY_ID, version, plaintext(size), chunk_size=CHUNK)


def chunk_at(index: int) -> int:
    return HEADER_SIZE + index * (CHUNK + TAG_SIZE)


class RecordingFile:
    """A real file opened for reading that records every read a decryptor makes."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("rb")
        self.reads: list[tuple[int, int]] = []

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        self.reads.append((self.file.tell(), size))
        return self.file.read(size)

    def close(self) -> None:
        self.file.close()


class HashingSink:
    """A destination that keeps only a digest, so memory use shows the decryptor's own."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


class PatternStream(io.RawIOBase):
    """An unseekable source of ``size`` bytes (a pipe-like producer), made on the fly."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.block = hashlib.shake_256(b"pattern").digest(1 << 20)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        count = min(len(buffer), self.left, len(self.block))
        buffer[:count] = self.block[:count]
        self.left -= count
        return count


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_bytes_and_streams(size: int, tmp_path: Path) -> None:
    data = plaintext(size)
    encrypted = tmp_path / "file.mdmenc"
    with io.BytesIO(data) as src, encrypted.open("wb") as dst:
        header = encrypt_stream(KEY, KEY_ID, 7, src, dst, chunk_size=CHUNK)
    assert header.plain_size == size
    assert encrypted.read_bytes() == sealed(size, version=7)
    assert decrypt_bytes(KEY, encrypted.read_bytes()) == data
    out = io.BytesIO()
    with encrypted.open("rb") as src:
        assert decrypt_stream(KEY, src, out) == header
    assert out.getvalue() == data


@pytest.mark.parametrize("size", SIZES)
def test_encrypted_size_is_known_before_encrypting(size: int) -> None:
    assert len(sealed(size)) == encrypted_size(size, chunk_size=CHUNK)
    assert read_header(sealed(size)).encrypted_size == encrypted_size(size, chunk_size=CHUNK)


def test_encrypted_size_with_default_chunks() -> None:
    assert encrypted_size(0) == HEADER_SIZE + TAG_SIZE
    assert encrypted_size(1 << 20) == HEADER_SIZE + (1 << 20) + TAG_SIZE
    assert encrypted_size((1 << 20) + 1) == HEADER_SIZE + (1 << 20) + 1 + 2 * TAG_SIZE


def test_restaging_is_byte_identical_and_versions_differ() -> None:
    data = plaintext(5 * CHUNK + 7)
    first = encrypt_bytes(KEY, KEY_ID, 1, data, chunk_size=CHUNK)
    assert encrypt_bytes(KEY, KEY_ID, 1, data, chunk_size=CHUNK) == first
    second = encrypt_bytes(KEY, KEY_ID, 2, data, chunk_size=CHUNK)
    assert len(second) == len(first)
    assert second[HEADER_SIZE:] != first[HEADER_SIZE:]
    assert read_header(first).nonce_prefix != read_header(second).nonce_prefix
    assert decrypt_bytes(KEY, second) == data


def test_new_file_keys_are_32_random_bytes() -> None:
    keys = {new_file_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(key) == 32 for key in keys)


def test_header_tells_key_id_before_any_key(tmp_path: Path) -> None:
    path = tmp_path / "file.mdmenc"
    path.write_bytes(sealed(3 * CHUNK, version=9))
    with path.open("rb") as file:
        header = read_header(file)
    assert header.key_id == KEY_ID
    assert str(header.key_uuid) == "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert (header.version, header.chunk_size, header.plain_size) == (9, CHUNK, 3 * CHUNK)
    assert check_key(header, KEY)
    assert not check_key(header, new_file_key())
    assert not check_key(header, KEY[:16])


RANGES = [
    (0, CHUNK),
    (CHUNK - 1, 2),
    (CHUNK, CHUNK),
    (2 * CHUNK - 1, CHUNK + 2),
    (0, 5 * CHUNK + 7),
    (5 * CHUNK, 7),
    (5 * CHUNK + 6, 100),
]


@pytest.mark.parametrize(("offset", "length"), RANGES)
def test_range_reads_only_the_chunks_it_covers(offset: int, length: int, tmp_path: Path) -> None:
    data = plaintext(5 * CHUNK + 7)
    path = tmp_path / "file.mdmenc"
    path.write_bytes(sealed(len(data)))
    file = RecordingFile(path)
    try:
        assert decrypt_range(KEY, file, offset, length) == data[offset : offset + length]
    finally:
        file.close()
    end = min(offset + length, len(data))
    first, last = offset // CHUNK, (end - 1) // CHUNK
    last_end = chunk_at(last) + min(CHUNK, len(data) - last * CHUNK) + TAG_SIZE
    assert file.reads == [(0, HEADER_SIZE), (chunk_at(first), last_end - chunk_at(first))]


def test_range_through_a_read_at_function(tmp_path: Path) -> None:
    data = plaintext(5 * CHUNK + 7)
    path = tmp_path / "file.mdmenc"
    path.write_bytes(sealed(len(data)))
    fd = os.open(path, os.O_RDONLY)
    try:
        def read_at(offset: int, size: int) -> bytes:
            return os.pread(fd, size, offset)

        assert decrypt_range(KEY, read_at, 3 * CHUNK - 5, 10) == data[3 * CHUNK - 5 : 3 * CHUNK + 5]
        assert decrypt_range(KEY, read_at, len(data), 10) == b""
        assert decrypt_range(KEY, read_at, 2 * CHUNK, 0) == b""
        assert decrypt_range(KEY, read_at, len(data) + 50, 1) == b""
    finally:
        os.close(fd)


def test_range_of_an_empty_file() -> None:
    assert decrypt_range(KEY, io.BytesIO(sealed(0)), 0, 10) == b""


def decrypt_with_bytes(key: bytes, data: bytes) -> bytes:
    return decrypt_bytes(key, data)


def decrypt_with_stream(key: bytes, data: bytes) -> bytes:
    out = io.BytesIO()
    decrypt_stream(key, io.BytesIO(data), out)
    return out.getvalue()


def decrypt_with_range(key: bytes, data: bytes) -> bytes:
    return decrypt_range(key, io.BytesIO(data), 0, 1 << 30)


DECRYPTORS = [decrypt_with_bytes, decrypt_with_stream, decrypt_with_range]
Decrypt = Callable[[bytes, bytes], bytes]


def flip(data: bytes, position: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 1 << bit
    return bytes(changed)


def swap_chunks(data: bytes, one: int, other: int) -> bytes:
    chunks = [data[chunk_at(i) : chunk_at(i + 1)] for i in range(5)]
    chunks[one], chunks[other] = chunks[other], chunks[one]
    return data[:HEADER_SIZE] + b"".join(chunks) + data[chunk_at(5) :]


def raised(decrypt: Decrypt, key: bytes, data: bytes) -> ContainerError:
    with pytest.raises(ContainerError) as info:
        decrypt(key, data)
    assert isinstance(info.value, MdmError)
    assert "\n" not in str(info.value)
    return info.value


TRUNCATIONS = [
    ("empty file", 5 * CHUNK + 7, 0),
    ("inside the magic", 5 * CHUNK + 7, 3),
    ("inside the header", 5 * CHUNK + 7, HEADER_SIZE - 1),
    ("header only", 5 * CHUNK + 7, HEADER_SIZE),
    ("inside the first chunk", 5 * CHUNK + 7, HEADER_SIZE + 10),
    ("inside a middle tag", 5 * CHUNK + 7, chunk_at(3) - 1),
    ("one byte short", 5 * CHUNK + 7, encrypted_size(5 * CHUNK + 7, CHUNK) - 1),
    ("short last chunk dropped on a boundary", 5 * CHUNK + 7, chunk_at(5)),
    ("full last chunk dropped on a boundary", 4 * CHUNK, chunk_at(3)),
]


@pytest.mark.parametrize("decrypt", DECRYPTORS)
@pytest.mark.parametrize(("case", "size", "cut"), TRUNCATIONS)
def test_truncation_is_reported_as_truncation(
    decrypt: Decrypt, case: str, size: int, cut: int
) -> None:
    error = raised(decrypt, KEY, sealed(size)[:cut])
    assert type(error) is TruncatedContainer, case


@pytest.mark.parametrize("decrypt", [decrypt_with_bytes, decrypt_with_stream])
def test_empty_files_only_chunk_dropped(decrypt: Decrypt) -> None:
    assert type(raised(decrypt, KEY, sealed(0)[:HEADER_SIZE])) is TruncatedContainer


@pytest.mark.parametrize("decrypt", DECRYPTORS)
def test_swapped_chunks_are_reported_as_reordered(decrypt: Decrypt) -> None:
    error = raised(decrypt, KEY, swap_chunks(sealed(5 * CHUNK + 7), 1, 3))
    assert type(error) is ChunkOrderError
    assert "chunk 2 of 6 holds chunk 4" in str(error)


@pytest.mark.parametrize("decrypt", DECRYPTORS)
def test_dropped_middle_chunk_is_reported_as_reordered(decrypt: Decrypt) -> None:
    data = sealed(5 * CHUNK + 7)
    error = raised(decrypt, KEY, data[: chunk_at(2)] + data[chunk_at(3) :])
    assert type(error) is ChunkOrderError


@pytest.mark.parametrize("decrypt", [decrypt_with_bytes, decrypt_with_stream])
def test_appended_data_is_refused(decrypt: Decrypt) -> None:
    data = sealed(4 * CHUNK)
    error = raised(decrypt, KEY, data + data[chunk_at(1) : chunk_at(2)])
    assert type(error) is ChunkOrderError


HEADER_FLIPS = [
    ("magic", 0, NotAContainer),
    ("format", 6, NotAContainer),
    ("key id", 7, TamperedHeader),
    ("chunk size", 23 + 3, TamperedHeader),
    ("chunk size to zero", 23 + 3, TamperedHeader),
    ("chunk size high bit", 23, TamperedHeader),
    ("content version", 27 + 3, TamperedHeader),
    ("plaintext size", 31 + 7, TamperedHeader),
    ("plaintext size high byte", 31, TamperedHeader),
    ("nonce prefix", 39, TamperedHeader),
    ("key commitment", 46, TamperedHeader),
    ("header tag", HEADER_SIZE - 1, TamperedHeader),
]


@pytest.mark.parametrize("decrypt", DECRYPTORS)
@pytest.mark.parametrize(("field", "position", "expected"), HEADER_FLIPS)
def test_flipped_header_bit_is_reported_as_tampering(
    decrypt: Decrypt, field: str, position: int, expected: type[ContainerError]
) -> None:
    bit = 6 if field == "chunk size to zero" else 7 if "high" in field else 0
    error = raised(decrypt, KEY, flip(sealed(5 * CHUNK + 7), position, bit))
    assert type(error) is expected, field


@pytest.mark.parametrize("decrypt", DECRYPTORS)
@pytest.mark.parametrize(
    ("where", "position", "index"),
    [
        ("first ciphertext byte", chunk_at(0), 0),
        ("middle ciphertext", chunk_at(2) + 30, 2),
        ("a tag", chunk_at(4) - 1, 3),
        ("the last chunk", chunk_at(5) + 3, 5),
    ],
)
def test_flipped_chunk_bit_names_the_chunk(
    decrypt: Decrypt, where: str, position: int, index: int
) -> None:
    error = raised(decrypt, KEY, flip(sealed(5 * CHUNK + 7), position))
    assert type(error) is TamperedChunk, where
    assert error.index == index
    assert f"chunk {index + 1} of 6" in str(error)


@pytest.mark.parametrize("decrypt", DECRYPTORS)
def test_wrong_key_is_not_reported_as_tampering(decrypt: Decrypt) -> None:
    tampered = flip(sealed(5 * CHUNK + 7), chunk_at(1) + 5)
    error = raised(decrypt, new_file_key(), tampered)
    assert type(error) is WrongKey
    assert "0f8fad5b-d9cb-469f-a165-70867728950e" in str(error)


def test_wrong_key_is_found_from_the_header_alone(tmp_path: Path) -> None:
    path = tmp_path / "file.mdmenc"
    path.write_bytes(sealed(5 * CHUNK + 7))
    file = RecordingFile(path)
    try:
        with pytest.raises(WrongKey):
            decrypt_range(KEY[::-1], file, 0, 10)
    finally:
        file.close()
    assert file.reads == [(0, HEADER_SIZE)]


def test_another_files_container_is_not_a_container_of_ours() -> None:
    with pytest.raises(NotAContainer):
        decrypt_bytes(KEY, b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.raises(NotAContainer):
        read_header(io.BytesIO(b"DICM"))


def test_encrypting_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="unseekable"):
        encrypt_stream(KEY, KEY_ID, 1, PatternStream(10), io.BytesIO())
    with pytest.raises(ValueError, match="ended before"):
        encrypt_stream(KEY, KEY_ID, 1, PatternStream(10), io.BytesIO(), size=11)
    with pytest.raises(ValueError, match="more than"):
        encrypt_stream(KEY, KEY_ID, 1, PatternStream(10), io.BytesIO(), size=9)
    with pytest.raises(ValueError, match="32 bytes"):
        encrypt_bytes(KEY[:16], KEY_ID, 1, b"x")
    with pytest.raises(ValueError, match="key id"):
        encrypt_bytes(KEY, b"guid", 1, b"x")
    with pytest.raises(ValueError, match="chunk size"):
        encrypt_bytes(KEY, KEY_ID, 1, b"x", chunk_size=0)


def test_streaming_50_mib_uses_constant_memory(tmp_path: Path) -> None:
    size = 50 << 20
    path = tmp_path / "volume.mdmenc"
    expected = hashlib.sha256()
    source = PatternStream(size)
    for _ in range(50):
        expected.update(source.block)
    tracemalloc.start()
    try:
        with path.open("wb") as dst:
            encrypt_stream(KEY, KEY_ID, 1, PatternStream(size), dst, size=size)
        _, encrypt_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = HashingSink()
        with path.open("rb") as src:
            decrypt_stream(KEY, src, sink)
        _, decrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.stat().st_size == encrypted_size(size)
    assert sink.size == size
    assert sink.digest.digest() == expected.digest()
    assert encrypt_peak < 4 << 20
    assert decrypt_peak < 4 << 20
