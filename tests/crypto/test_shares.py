"""Shamir 2-of-3 shares of a file key: any two rebuild it, one alone tells nothing useful."""

import itertools
import os

import pytest
from Crypto.Protocol.SecretSharing import Shamir

from srm_dicom.crypto.shares import Share, combine_key, split_key
from srm_dicom.errors import InvalidInput


def test_every_two_of_three_rebuild_the_key():
    key = os.urandom(32)
    shares = split_key(key, 2, 3)
    assert [s.index for s in shares] == [1, 2, 3]
    assert all(len(s.data) == 32 for s in shares)
    for pair in itertools.combinations(shares, 2):
        assert combine_key(list(pair)) == key
    for pair in itertools.permutations(shares, 2):
        assert combine_key(list(pair)) == key


def test_one_share_does_not_rebuild_the_key():
    key = os.urandom(32)
    shares = split_key(key, 2, 3)
    for share in shares:
        assert combine_key([share]) != key
        assert key[:16] not in share.data and key[16:] not in share.data


def test_each_split_is_fresh_randomness():
    key = os.urandom(32)
    assert split_key(key)[0].data != split_key(key)[0].data


def test_three_of_five():
    key = os.urandom(32)
    shares = split_key(key, 3, 5)
    for subset in itertools.combinations(shares, 3):
        assert combine_key(list(subset)) == key
    assert combine_key(shares[:2]) != key


@pytest.mark.parametrize(("key", "k", "n"), [(b"short", 2, 3), (bytes(32), 0, 3), (bytes(32), 4, 3)])
def test_bad_parameters_are_refused(key, k, n):
    with pytest.raises(InvalidInput):
        split_key(key, k, n)


def test_duplicate_or_malformed_shares_are_refused():
    shares = split_key(os.urandom(32))
    with pytest.raises(InvalidInput):
        combine_key([shares[0], shares[0]])
    with pytest.raises(InvalidInput):
        Share(1, b"too short")


@pytest.mark.parametrize(("k", "n"), [(1, 1), (2, 3), (3, 5), (4, 7)])
def test_combining_gives_what_pycryptodome_gives_for_right_and_wrong_shares(k, n):
    # The combination is computed here (coefficients per set of indices), not by Shamir.combine:
    # it must be the same function, so that keys and the commitment check behave as before.
    key = os.urandom(32)
    shares = split_key(key, k, n)
    wrong = [Share(s.index, os.urandom(32)) for s in shares]
    for subset in itertools.combinations(shares, k):
        assert combine_key(list(subset)) == key
    for subset in [*itertools.combinations(wrong, k), *itertools.combinations(shares, max(1, k - 1))]:
        expected = b"".join(Shamir.combine([(s.index, s.data[start:start + 16]) for s in subset])
                            for start in (0, 16))
        assert combine_key(list(subset)) == expected
