"""Throughput of the encrypted container next to raw AES-256-GCM of `cryptography`.

Run: python tests/bench/bench_container.py [MiB] [rounds]
The peer is `AESGCM.encrypt/decrypt` on the same buffer in one call (no chunks, no
header): the ratio shows what chunking, the header and the Python loop cost.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from srm_dicom.crypto.container import (
    DEFAULT_CHUNK_SIZE,
    decrypt_bytes,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    new_file_key,
)


class NullSink:
    """Discards what it is given, so a stream measures the container alone."""

    def write(self, data: bytes | memoryview) -> int:
        return len(data)


def best_rates(
    mebibytes: int, rounds: int, ours: Callable[[], object], peer: Callable[[], object]
) -> tuple[float, float]:
    """Best of ``rounds``, alternating the two so that load from other processes hits both."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for runs, run in zip(times, (ours, peer), strict=True):
            start = time.perf_counter()
            run()
            runs.append(time.perf_counter() - start)
    return mebibytes * (1 << 20) / min(times[0]) / 1e6, mebibytes * (1 << 20) / min(times[1]) / 1e6


def raw_chunked(aead: AESGCM, method: str, data: bytes, chunk: int) -> Callable[[], None]:
    """The crypto alone at the container's chunk size, into one reused buffer."""
    view = memoryview(data)
    out = memoryview(bytearray(chunk + 16))
    run = getattr(aead, method)
    step = chunk if method == "encrypt_into" else chunk + 16
    size = chunk + 16 if method == "encrypt_into" else chunk

    def loop() -> None:
        for index, start in enumerate(range(0, len(view), step)):
            run(index.to_bytes(12, "big"), view[start : start + step], None, out[:size])

    return loop


def main(mebibytes: int = 256, rounds: int = 3) -> None:
    key, key_id = new_file_key(), bytes(16)
    plain = bytes(range(256)) * (mebibytes << 12)
    raw = AESGCM(key)
    nonce = bytes(12)
    raw_sealed = raw.encrypt(nonce, plain, None)
    chunk = DEFAULT_CHUNK_SIZE
    raw_chunks = b"".join(
        raw.encrypt(index.to_bytes(12, "big"), plain[start : start + chunk], None)
        for index, start in enumerate(range(0, len(plain), chunk))
    )
    sealed = bytes(encrypt_bytes(key, key_id, 1, plain))
    assert decrypt_bytes(key, sealed) == plain

    # (container, its peer): bytes calls allocate their output like one raw call does;
    # streams reuse chunk buffers like the raw chunked loop does.
    pairs = [
        (
            "container encrypt_bytes",
            lambda: encrypt_bytes(key, key_id, 1, plain),
            "raw AESGCM.encrypt, one call",
            lambda: raw.encrypt(nonce, plain, None),
        ),
        (
            "container encrypt_stream -> null",
            lambda: encrypt_stream(key, key_id, 1, io.BytesIO(plain), NullSink()),
            "raw AESGCM.encrypt_into, 1 MiB chunks",
            raw_chunked(raw, "encrypt_into", plain, chunk),
        ),
        (
            "container decrypt_bytes",
            lambda: decrypt_bytes(key, sealed),
            "raw AESGCM.decrypt, one call",
            lambda: raw.decrypt(nonce, raw_sealed, None),
        ),
        (
            "container decrypt_stream -> null",
            lambda: decrypt_stream(key, io.BytesIO(sealed), NullSink()),
            "raw AESGCM.decrypt_into, 1 MiB chunks",
            raw_chunked(raw, "decrypt_into", raw_chunks, chunk),
        ),
    ]
    print(f"{mebibytes} MiB in memory, {chunk >> 20} MiB chunks, MB/s best of {rounds}")
    for name, ours, peer_name, peer in pairs:
        our_rate, peer_rate = best_rates(mebibytes, rounds, ours, peer)
        print(
            f"{name:34s} {our_rate:6.0f}  vs {peer_name:38s} {peer_rate:6.0f}"
            f"  ratio {our_rate / peer_rate:.2f}"
        )


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:]))
