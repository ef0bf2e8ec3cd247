"""A file key split k-of-n (Shamir) so that no single key server holds it, and any k rebuild it.

pycryptodome's Shamir works on 16-byte secrets over GF(2^128), so the 32-byte key is
shared as its two halves with the same indices; a share is the two half-shares joined.
Combining the wrong shares (tampered or too few) silently yields a wrong key: the
container's key commitment is what tells.

Combining is done here, not by ``Shamir.combine``: the Lagrange coefficients at zero depend
only on the shares' indices (public, and the same for every key: 1..n), so they are worked
out once per set of indices, and a key costs k multiplications per half. pycryptodome
inverts a field element for every share of every key in pure Python (1.5 ms a key; a
100-slice staging spent 0.15 s of CPU on it); this is the same arithmetic in the same
field, so it gives the same bytes, for the right shares and for wrong ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from Crypto.Protocol.SecretSharing import Shamir

from srm_dicom.errors import InvalidInput

KEY_SIZE = 32
_HALF = KEY_SIZE // 2
_FIELD = (1 << 128) | 0x87  # x^128 + x^7 + x^2 + x + 1: pycryptodome's GF(2^128)


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
    coefficients = _lagrange_at_zero(tuple(s.index for s in shares))
    halves = []
    for start in (0, _HALF):
        value = 0
        for share, coefficient in zip(shares, coefficients, strict=True):
            value ^= _multiply(int.from_bytes(share.data[start:start + _HALF], "big"), coefficient)
        halves.append(value.to_bytes(_HALF, "big"))
    return b"".join(halves)


def _multiply(value: int, factor: int) -> int:
    """value · factor in GF(2^128); the loop runs over the bits of ``factor`` (a public coefficient)."""
    product = 0
    while factor:
        if factor & 1:
            product ^= value
        factor >>= 1
        value <<= 1
        value ^= _FIELD * (value >> 128)
    return product


def _inverse(value: int) -> int:
    """value^(2^128 - 2), the inverse of a non-zero element (Fermat)."""
    result, power, exponent = 1, value, (1 << 128) - 2
    while exponent:
        if exponent & 1:
            result = _multiply(result, power)
        power = _multiply(power, power)
        exponent >>= 1
    return result


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """For each share index x_j: the product over the others of x_m / (x_j + x_m) (addition is XOR)."""
    coefficients = []
    for j, x_j in enumerate(indices):
        numerator = denominator = 1
        for m, x_m in enumerate(indices):
            if m != j:
                numerator = _multiply(numerator, x_m)
                denominator = _multiply(denominator, x_j ^ x_m)
        coefficients.append(_multiply(numerator, _inverse(denominator)))
    return tuple(coefficients)
