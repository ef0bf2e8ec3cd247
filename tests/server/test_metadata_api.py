"""GET /api/v1/metadata: the metadata search over HTTPS, every answer filtered by the caller's rights."""

from urllib.parse import urlencode

import pytest
from searchsite import search_site

from https import request


@pytest.fixture(scope="module")
def site(key_servers, tmp_path_factory):
    with search_site(tmp_path_factory.mktemp("search"), key_servers) as found:
        yield found


def search(site, pki, user, q, **params):
    answer = request(site.running.url, pki, user, path="/api/v1/metadata?" + urlencode({"q": q, **params}))
    return answer


def results(site, pki, user, q, **params):
    answer = search(site, pki, user, q, **params)
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"] == "application/json"
    return answer.json()["results"]


def test_a_physician_finds_all_images_of_a_patient_with_lfn_guid_and_name(site, pki):
    found = results(site, pki, "bob", 'PatientName="DOE^JOHN"', select="PatientName,Modality,StudyDate")
    assert {r["lfn"] for r in found} == site.lfns("doe_ct") | site.lfns("doe_mr")
    for row in found:
        assert row["guid"].startswith("guid:")
        assert site.running.catalog.namespace.lookup(row["lfn"]).guid == row["guid"].removeprefix("guid:")
        assert row["PatientName"] == "DOE^JOHN" and row["StudyDate"] == "20240315"
    assert {r["Modality"] for r in found} == {"CT", "MR"}


def test_filters_combine_and_wildcards_match(site, pki):
    ct = results(site, pki, "bob", "PatientName like 'doe*' and Modality=CT and StudyDate>=20200101")
    assert {r["lfn"] for r in ct} == site.lfns("doe_ct")
    either = results(site, pki, "bob", "(Modality = MR or PatientName = 'ROE^JANE') and Rows = 8")
    assert {r["lfn"] for r in either} == site.lfns("doe_mr") | site.lfns("roe_ct")
    question = results(site, pki, "bob", "PatientName like 'ROE^JAN?'")
    assert {r["lfn"] for r in question} == site.lfns("roe_ct")


def test_a_mia_analyst_sees_the_series_but_not_the_patient(site, pki):
    found = results(site, pki, "carol", "Modality=MR", select="PatientName,PatientID,Modality,SeriesInstanceUID")
    assert {r["lfn"] for r in found} == site.lfns("doe_mr")
    for row in found:
        assert "PatientName" not in row and "PatientID" not in row  # absent, not blanked
        assert row["Modality"] == "MR"
        assert row["SeriesInstanceUID"] == site.deidentified(site.series["doe_mr"][0].SeriesInstanceUID)
    # A filter on what carol may not see never matches, so it tells her nothing.
    assert results(site, pki, "carol", 'PatientName="DOE^JOHN"') == []
    assert results(site, pki, "carol", 'PatientName!="nobody" and Modality=MR') == []


def test_a_vo_member_without_group_and_another_vo_see_nothing_in_group_mode(site, pki):
    group_mode = site.lfns("doe_ct") | site.lfns("doe_mr") | site.lfns("roe_ct")
    for user in ("dave", "eve"):
        assert not group_mode & {r["lfn"] for r in results(site, pki, user, "Modality=CT or Modality=MR")}, user


@pytest.mark.parametrize(
    ("user", "anonymous_mode", "public_mode"),
    [
        ("bob", "anonymous", "all"),
        ("carol", "anonymous", "all"),
        ("dave", "anonymous", "all"),
        ("eve", "none", "none"),  # rwxr-x---: another VO may not even list them
        ("alice", "all", "all"),  # the register group sees everything
    ],
)
def test_metadata_modes_anonymous_and_public(site, pki, user, anonymous_mode, public_mode):
    for series, expected in (("poe_ct", anonymous_mode), ("pub_ct", public_mode)):
        study = site.deidentified(site.series[series][0].StudyInstanceUID)
        found = results(site, pki, user, f"StudyInstanceUID={study}", select="PatientName,Modality")
        if expected == "none":
            assert found == [], (user, series)
            continue
        assert {r["lfn"] for r in found} == site.lfns(series), (user, series)
        assert all(("PatientName" in r) == (expected == "all") for r in found), (user, series)
        assert all(r["Modality"] == "CT" for r in found)


def test_limit_select_and_default_attributes(site, pki):
    two = results(site, pki, "alice", "Modality=CT", limit="2")
    assert len(two) == 2
    assert set(two[0]) == {"lfn", "guid", "PatientName", "Modality", "StudyInstanceUID", "SeriesInstanceUID",
                           "SOPInstanceUID"}
    everything = results(site, pki, "alice", "")
    assert len(everything) == 11
    original = results(site, pki, "alice", "Modality=MR", select="OriginalSeriesInstanceUID,ProtocolName")
    assert {r["OriginalSeriesInstanceUID"] for r in original} == {site.series["doe_mr"][0].SeriesInstanceUID}
    # The served file replaces the protocol name, so the Protocol table has none; the
    # original ("demo-phantom") is among the erased values.
    assert {r.get("ProtocolName") for r in original} == {None}


@pytest.mark.parametrize(
    ("q", "params", "detail"),
    [
        ("Modality=", {}, "unexpected end"),
        ("Nonsense=1", {}, "unknown attribute 'Nonsense'"),
        ("Modality=CT Rows=1", {}, "join conditions with 'and' or 'or'"),
        ("Rows > many", {}, "Rows is a number"),
        ("Modality=CT", {"select": "Bogus"}, "unknown attribute 'Bogus'"),
        ("Modality=CT", {"limit": "lots"}, "limit must be a whole number"),
    ],
)
def test_a_bad_query_is_a_400_problem_in_one_line(site, pki, q, params, detail):
    answer = search(site, pki, "bob", q, **params)
    assert answer.status == 400 and answer.headers["content-type"] == "application/problem+json"
    assert detail in answer.json()["detail"] and "\n" not in answer.json()["detail"]


def test_injection_attempts_find_nothing_and_break_nothing(site, pki):
    before = site.running.catalog.namespace.count()
    for q in ('PatientName="x\' OR 1=1 --"', "PatientName='x\" OR \"1\"=\"1'",
              'Modality="CT\'; DROP TABLE entries; --"', "PatientName like '%' or 1=1"):
        answer = search(site, pki, "bob", q)
        assert answer.status in (200, 400), q
        if answer.status == 200:
            assert answer.json()["results"] == [] or q.startswith("PatientName like '%'"), q
    assert site.running.catalog.namespace.count() == before
    assert len(results(site, pki, "bob", "Modality=CT")) == 9


def test_no_certificate_is_401(site, pki):
    assert search(site, pki, None, "Modality=CT").status == 401


# -- hostile input (issue 12, finding 4): 400 with a problem body, never a 500 ---------------


@pytest.mark.parametrize("q", [
    "Rows=99999999999999999999",  # beyond SQLite's 64-bit integers
    "Rows>-9223372036854775809",
    "Rows=1e999",
    "Rows=nan",
    " or ".join(f"Rows={n}" for n in range(995)),  # SQLite's expression depth
    " and ".join(f"Modality=CT{n}" for n in range(300)),
])
def test_queries_the_catalog_cannot_run_are_400(site, pki, q):
    answer = search(site, pki, "bob", q)
    assert answer.status == 400 and answer.headers["content-type"] == "application/problem+json", answer.body
    assert answer.json()["status"] == 400 and answer.json()["detail"].startswith("query:")


def test_the_largest_integers_still_search(site, pki):
    assert results(site, pki, "bob", "Rows=9223372036854775807") == []
    assert results(site, pki, "bob", " or ".join(f"Rows={n}" for n in range(256)))
