"""A file key split k-of-n (Shamir) so that no single key server holds it, and any k rebuild it.

pycryptodome's Shamir works on 16-byte secrets over GF(2^128), so the 32-byte key is
shared as its two halves with the same indices; a share is the two half-shares joined.
Combining the wrong shares (tampered or too few) silently yields a wrong key: the
container's key commitment is what tells.
"""

from __future__ import annotations

from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir

from srm_dicom.errors import InvalidInput

KEY_SIZE = 32
_HALF = KEY_SIZE // 2


@dataclass(frozen=True)
class Share:
    index: int
    data: bytes

    def __post_init__(self) -> None:
        if not 1 <= self.index <= 255 or len(self.data) != KEY_SIZE:
            raise InvalidInput(f"key share #{self.index}: must be {KEY_SIZE} bytes, index 1..255")


def split_key(key: bytes, k: int = 2, n: int = 3) -> list[Share]:
    """n shares of a 32-byte key, indices 1..n; any k of them rebuild it."""
    if len(key) != KEY_SIZE:
        raise InvalidInput(f"a file key is {KEY_SIZE} bytes, not {len(key)}")
    if not 1 <= k <= n <= 255:
        raise InvalidInput(f"key sharing needs 1 <= k <= n <= 255, not k={k} n={n}")
    low = Shamir.split(k, n, key[:_HALF])
    high = Shamir.split(k, n, key[_HALF:])
    return [Share(i, a + b) for (i, a), (_, b) in zip(low, high, strict=True)]


def combine_key(shares: list[Share]) -> bytes:
    """The key from k shares (pass exactly k: more is harmless, fewer gives a wrong key)."""
    if len({s.index for s in shares}) != len(shares) or not shares:
        raise InvalidInput("key shares must be distinct and at least one")
    low = Shamir.combine([(s.index, s.data[:_HALF]) for s in shares])
    high = Shamir.combine([(s.index, s.data[_HALF:]) for s in shares])
    return low + high
