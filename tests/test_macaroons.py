"""Macaroons (srm_dicom.macaroons): what a macaroon says, what its holder may add, what never holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pymacaroons import Macaroon

from srm_dicom.errors import InvalidInput
from srm_dicom.identity import Identity
from srm_dicom.macaroons import MacaroonAuthority, MacaroonRequest, root_key
from srm_dicom.tokens import InvalidToken

SECRET = b"test site secret, not for production"
ALICE = Identity("/C=XX/O=srm-dicom/CN=alice", "x509", vo="demo", groups=frozenset({"register", "physician"}))
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
FILE = "/grid/demo/mdm/1.2/3.4/5.6"


@pytest.fixture()
def authority() -> MacaroonAuthority:
    return MacaroonAuthority(SECRET, "srm-dicom-test", max_lifetime=3600)


def issue(authority: MacaroonAuthority, caveats: list[str], validity: str = "PT10M", path: str = FILE) -> str:
    return authority.issue(ALICE, path, MacaroonRequest.from_json({"caveats": caveats, "validity": validity}, 3600),
                           NOW)


def test_a_macaroon_acts_as_its_issuer_without_the_register_group(authority):
    caller = authority.identify(issue(authority, ["activity:DOWNLOAD,LIST"]), "127.0.0.1", NOW)
    assert caller.kind == "macaroon" and caller.dn is None
    assert caller.on_behalf == Identity(ALICE.subject, "x509", vo="demo", groups=frozenset({"physician"}))
    assert caller.paths == (FILE,) and caller.activities == {"DOWNLOAD", "LIST"}
    assert caller.principal == ALICE.subject


def test_validity_is_capped_and_expiry_refused(authority):
    serialized = issue(authority, [], validity="P30D")  # capped at an hour
    assert authority.identify(serialized, None, NOW + timedelta(minutes=59)).kind == "macaroon"
    with pytest.raises(InvalidToken, match="expired"):
        authority.identify(serialized, None, NOW + timedelta(minutes=61))


def test_the_holder_may_narrow_a_macaroon_but_never_widen_it(authority):
    macaroon = Macaroon.deserialize(issue(authority, ["activity:DOWNLOAD,LIST"], path="/grid/demo/mdm"))
    macaroon.add_first_party_caveat("path:/grid/demo/mdm/1.2")
    macaroon.add_first_party_caveat("activity:DOWNLOAD,STAGE")
    caller = authority.identify(macaroon.serialize(), None, NOW)
    assert caller.paths == ("/grid/demo/mdm/1.2",) and caller.activities == {"DOWNLOAD"}
    disjoint = Macaroon.deserialize(macaroon.serialize())
    disjoint.add_first_party_caveat("path:/grid/demo/other")
    assert authority.identify(disjoint.serialize(), None, NOW).paths == ()
    second_issuer = Macaroon.deserialize(macaroon.serialize())
    second_issuer.add_first_party_caveat("id:e30=")
    with pytest.raises(InvalidToken):
        authority.identify(second_issuer.serialize(), None, NOW)


def test_ip_caveats_bind_the_macaroon_to_addresses(authority):
    serialized = issue(authority, ["ip:10.0.0.0/8,127.0.0.1"])
    assert authority.identify(serialized, "127.0.0.1", NOW).kind == "macaroon"
    assert authority.identify(serialized, "10.1.2.3", NOW).kind == "macaroon"
    with pytest.raises(InvalidToken, match="ip caveat|does not hold"):
        authority.identify(serialized, "192.168.1.1", NOW)


def test_another_sites_or_a_tampered_macaroon_is_refused(authority):
    other = MacaroonAuthority(b"another site's secret, 32 bytes!", "elsewhere", 3600)
    with pytest.raises(InvalidToken):
        other.identify(issue(authority, []), None, NOW)
    forged = Macaroon(location="x", identifier="y", key=root_key(b"guessed secret............"))
    forged.add_first_party_caveat("path:/")
    with pytest.raises(InvalidToken):
        authority.identify(forged.serialize(), None, NOW)
    with pytest.raises(InvalidToken):
        authority.identify("not-a-macaroon", None, NOW)
    unknown = Macaroon.deserialize(issue(authority, []))
    unknown.add_first_party_caveat("home:/")  # a caveat nobody here understands never holds
    with pytest.raises(InvalidToken):
        authority.identify(unknown.serialize(), None, NOW)


def test_every_front_end_of_a_site_shares_the_root_key(authority):
    twin = MacaroonAuthority(SECRET, "srm-dicom-test", 3600)
    assert twin.identify(issue(authority, []), None, NOW).on_behalf is not None


@pytest.mark.parametrize("caveat", ["activity:UPLOAD", "activity:", "path:relative", "path:/a/../b", "before:soon",
                                    "ip:example.org", "id:forged", "home:/"])
def test_requests_with_caveats_this_site_cannot_honour_are_refused(caveat):
    with pytest.raises(InvalidInput):
        MacaroonRequest.from_json({"caveats": [caveat]}, 3600)


def test_request_bodies_are_checked():
    for body in ([], {"caveats": "activity:LIST"}, {"validity": "soon"}, {"validity": 0}):
        with pytest.raises(InvalidInput):
            MacaroonRequest.from_json(body, 3600)
    assert MacaroonRequest.from_json({}, 600).validity == 600


@pytest.mark.parametrize("garbage", ["", "AA", "AgE", "MDAxY2xvY2F0aW9u", "AgEAAAAA", "=" * 8, "AgEHZXhhbXBsZQIDAAA"])
def test_a_truncated_or_random_bearer_string_is_an_invalid_token_not_a_crash(authority, garbage):
    """Found by the HTTP fuzz run: pymacaroons raised IndexError and struct.error on these."""
    with pytest.raises(InvalidToken):
        authority.identify(garbage, None, NOW)
