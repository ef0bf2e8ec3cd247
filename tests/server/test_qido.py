"""DICOMweb QIDO-RS searched with the dicomweb-client package, as a user's certificate."""

import contextlib
from collections import Counter

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from searchsite import search_site

import postgres
from https import request
from srm_dicom.access import may_list, metadata_level
from srm_dicom.catalog import AclEntry
from srm_dicom.identity import VoMap
from srm_dicom.query import ATTRIBUTES, parse
from srm_dicom.server.qido import _dicom_json

PATIENT_NAME, STUDY_UID, SERIES_UID, SOP_UID, MODALITY = "00100010", "0020000D", "0020000E", "00080018", "00080060"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(request, key_servers, tmp_path_factory):
    """The search site on each backend: /studies and /series are counted in the catalog's SQL."""
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres.database()) if request.param == "postgresql" else None
        found = stack.enter_context(search_site(tmp_path_factory.mktemp("qido"), key_servers, url))
        assert type(found.running.catalog.backend).__module__ == f"mdm_catalog_{request.param}"
        yield found


def client(site, pki, user):
    session = requests.Session()
    session.cert = (str(pki / "users" / user / "cert.pem"), str(pki / "users" / user / "key.pem"))
    session.verify = str(pki / "ca.pem")
    session.trust_env = False  # else requests prefers $REQUESTS_CA_BUNDLE to the session's CA
    return DICOMwebClient(url=f"{site.running.url}/dicom-web", session=session)


def value(item, tag):
    return item[tag]["Value"][0] if tag in item and "Value" in item[tag] else None


def test_a_physician_gets_the_namespaces_uids_a_retrieve_url_and_the_originals_apart(site, pki, tmp_path):
    """Issue 12, finding 9: a physician got the PACS's original UIDs, which match no LFN, and
    no RetrieveURL."""
    bob = client(site, pki, "bob")
    doe = site.series["doe_ct"][0]
    studies = bob.search_for_studies(search_filters={"PatientName": "DOE^JOHN"})
    assert len(studies) == 1
    study = Dataset.from_json(studies[0])
    assert study.StudyInstanceUID == site.deidentified(doe.StudyInstanceUID)  # the namespace's, as for all
    (original,) = study.OriginalAttributesSequence
    assert original.ModifiedAttributesSequence[0].StudyInstanceUID == doe.StudyInstanceUID
    assert original.ModifyingSystem == "srm-dicom" and "SeriesInstanceUID" not in original.ModifiedAttributesSequence[0]
    assert str(study.PatientName) == "DOE^JOHN" and study.PatientID == "P-DOE" and study.StudyDate == "20240315"
    assert study.ModalitiesInStudy == ["CT", "MR"]
    assert (study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances) == (2, 5)
    assert study.RetrieveURL == f"{site.running.url}/grid/demo/mdm/{study.StudyInstanceUID}"

    # The original UIDs still find the study for her, the namespace's too; both answer the same.
    by_original = bob.search_for_series(study_instance_uid=doe.StudyInstanceUID)
    series = bob.search_for_series(study_instance_uid=study.StudyInstanceUID)
    assert by_original == series
    assert {value(s, MODALITY): value(s, "00201209") for s in series} == {"CT": 3, "MR": 2}
    ct = next(Dataset.from_json(s) for s in series if value(s, MODALITY) == "CT")
    assert ct.SeriesInstanceUID == site.deidentified(doe.SeriesInstanceUID)
    assert ct.RetrieveURL == f"{site.running.url}/grid/demo/mdm/{ct.StudyInstanceUID}/{ct.SeriesInstanceUID}"
    assert ct.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].SeriesInstanceUID == doe.SeriesInstanceUID

    instances = [Dataset.from_json(i) for i in bob.search_for_instances(
        study_instance_uid=doe.StudyInstanceUID, series_instance_uid=doe.SeriesInstanceUID)]
    assert {i.SOPInstanceUID for i in instances} == {site.deidentified(d.SOPInstanceUID) for d in site.series["doe_ct"]}
    assert all(i.Rows == 8 for i in instances)
    # Every UID in the answer leads to the file: RetrieveURL is its LFN, which the served file names.
    first = instances[0]
    lfn = f"/grid/demo/mdm/{first.StudyInstanceUID}/{first.SeriesInstanceUID}/{first.SOPInstanceUID}"
    assert first.RetrieveURL == site.running.url + lfn and lfn in site.lfns("doe_ct")
    originals = {i.OriginalAttributesSequence[0].ModifiedAttributesSequence[0].SOPInstanceUID for i in instances}
    assert originals == {d.SOPInstanceUID for d in site.series["doe_ct"]}


def test_a_mia_analyst_gets_deidentified_uids_and_no_patient(site, pki):
    carol = client(site, pki, "carol")
    doe = site.series["doe_mr"][0]
    series = carol.search_for_series(search_filters={"Modality": "MR"})
    assert len(series) == 1
    assert value(series[0], SERIES_UID) == site.deidentified(doe.SeriesInstanceUID)
    assert value(series[0], STUDY_UID) == site.deidentified(doe.StudyInstanceUID)
    assert "04000561" not in series[0]  # the originals only at the "all" level
    assert value(series[0], "00081190").endswith(f"/{value(series[0], STUDY_UID)}/{value(series[0], SERIES_UID)}")
    group_mode = {site.deidentified(site.series[n][0].StudyInstanceUID) for n in ("doe_ct", "roe_ct")}
    studies = [s for s in carol.search_for_studies(fields=["PatientName", "PatientID"])
               if value(s, STUDY_UID) in group_mode]
    assert len(studies) == 2 and all(PATIENT_NAME not in s and "00100020" not in s for s in studies)
    assert carol.search_for_studies(search_filters={"PatientName": "DOE*"}) == []
    # The original UID does not open the study to her; the de-identified one does.
    assert carol.search_for_series(study_instance_uid=doe.StudyInstanceUID) == []
    assert len(carol.search_for_series(study_instance_uid=site.deidentified(doe.StudyInstanceUID))) == 2


def test_a_vo_member_without_group_and_another_vo_see_no_group_mode_study(site, pki):
    hidden = {site.deidentified(site.series[n][0].StudyInstanceUID) for n in ("doe_ct", "roe_ct")}
    hidden |= {site.series[n][0].StudyInstanceUID for n in ("doe_ct", "roe_ct")}
    dave = {value(s, STUDY_UID) for s in client(site, pki, "dave").search_for_studies()}
    assert dave and not dave & hidden  # dave sees the anonymous and public studies only
    assert client(site, pki, "eve").search_for_studies() == []


def test_modes_anonymous_and_public_for_a_vo_member(site, pki):
    dave = client(site, pki, "dave")
    poe, pub = site.series["poe_ct"][0], site.series["pub_ct"][0]
    anonymous = dave.search_for_studies(search_filters={"StudyInstanceUID": site.deidentified(poe.StudyInstanceUID)})
    assert len(anonymous) == 1 and PATIENT_NAME not in anonymous[0]
    public = dave.search_for_studies(search_filters={"PatientName": "PUB^LIC"})
    assert len(public) == 1 and value(public[0], STUDY_UID) == site.deidentified(pub.StudyInstanceUID)
    # Public metadata is "all" metadata: the originals come apart, the UID is the namespace's.
    assert value(value(public[0], "04000561"), "04000550")[STUDY_UID]["Value"][0] == pub.StudyInstanceUID


def test_matching_keys_by_tag_ranges_lists_limit_offset(site, pki):
    alice = client(site, pki, "alice")
    by_tag = alice.search_for_studies(search_filters={PATIENT_NAME: "ROE^JANE"})
    assert [value(s, "00100020") for s in by_tag] == ["P-ROE"]
    recent = alice.search_for_studies(search_filters={"StudyDate": "20200101-20241231"})
    assert {value(s, "00100020") for s in recent} == {"P-DOE"}
    uids = "\\".join(site.series[n][0].StudyInstanceUID for n in ("poe_ct", "pub_ct"))
    assert len(alice.search_for_studies(search_filters={"StudyInstanceUID": uids})) == 2
    everything = alice.search_for_instances()
    assert len(everything) == 11
    page = alice.search_for_instances(limit=4, offset=8)
    assert [value(i, SOP_UID) for i in page] == [value(i, SOP_UID) for i in everything[8:]]
    assert alice.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})[0]["00080061"]["Value"] == ["MR"]


def test_answers_are_dicom_json_and_errors_are_problems(site, pki):
    answer = request(site.running.url, pki, "bob", path="/dicom-web/studies?AccessionNumber=1&fuzzymatching=true")
    assert answer.status == 200 and answer.headers["content-type"] == "application/dicom+json"
    assert answer.headers["warning"].startswith("299 ") and "AccessionNumber" in answer.headers["warning"]
    assert request(site.running.url, pki, "bob", path="/dicom-web/studies/not-a-uid/series").status == 400
    assert request(site.running.url, pki, "bob", path="/dicom-web/elsewhere").status == 404
    assert request(site.running.url, pki, None, path="/dicom-web/studies").status == 401


def test_each_caller_counts_only_the_images_they_may_see(site, pki):
    """/studies is counted by the catalog per study directory and rights class, each class
    decided once: the answer is the one srm_dicom.access gives image by image, for every user.
    Eve (another VO) sees one DOE CT slice through a per-DN entry: its study, one image, one
    series. Bob's own entry on that slice puts it in a class of its own: the DOE study is then
    three groups (two classes of CT, one of MR), and still two series."""
    catalog = site.running.catalog
    vomap = VoMap.load(pki / "vomap.toml")
    shared = catalog.namespace.lookup(sorted(site.lfns("doe_ct"))[0])
    eve, bob = "/C=XX/O=srm-dicom/CN=eve", "/C=XX/O=srm-dicom/CN=bob"
    catalog.namespace.set_rights([shared.guid], None, None,
                                 [AclEntry(eve, 0o5, "anonymous"), AclEntry(bob, 0o5, "all")])
    try:
        for user in ("alice", "bob", "carol", "dave", "eve"):
            identity = vomap.identity(f"/C=XX/O=srm-dicom/CN={user}")
            images: Counter = Counter()
            series: dict[str, set[str]] = {}
            for match in catalog.index.search(parse(""), [ATTRIBUTES["StudyInstanceUID"]]):
                if may_list(identity, match.entry) and metadata_level(identity, match.entry) != "none":
                    images[match.values["StudyInstanceUID"]] += 1
                    series.setdefault(match.values["StudyInstanceUID"], set()).add(match.entry.lfn.rsplit("/", 2)[1])
            studies = client(site, pki, user).search_for_studies()
            assert {value(s, STUDY_UID): value(s, "00201208") for s in studies} == images, user
            assert {value(s, STUDY_UID): value(s, "00201206") for s in studies} == {
                study: len(names) for study, names in series.items()}, user
        (seen,) = client(site, pki, "eve").search_for_studies()
        assert value(seen, STUDY_UID) == shared.study_uid and value(seen, "00201206") == 1
        assert PATIENT_NAME not in seen  # anonymous: no patient
        doe = [s for s in client(site, pki, "bob").search_for_studies() if value(s, STUDY_UID) == shared.study_uid]
        assert [(value(s, "00201206"), value(s, "00201208")) for s in doe] == [(2, 5)]
    finally:
        catalog.namespace.set_rights([shared.guid], None, None, [AclEntry(eve, 0, "none"), AclEntry(bob, 0, "none")])


# -- hostile input (issue 12, findings 1 and 4): 4xx with a problem body, never a 500 ---------


def test_unknown_keys_cannot_inject_headers_into_the_warning(site, pki):
    injected = request(site.running.url, pki, "bob", path="/dicom-web/instances?limit=1&x%0d%0aSet-Cookie:%20a%3Db=1"
                       "&y%0d%0a%0d%0a<html>")
    assert injected.status == 200, injected.body
    assert "set-cookie" not in injected.headers and b"<html>" not in injected.body
    warning = injected.headers["warning"]
    assert warning.startswith('299 srm-dicom "') and "\r" not in warning and "\n" not in warning
    assert "Set-Cookie" in warning  # named, escaped, so the caller learns what was ignored
    unicode = request(site.running.url, pki, "bob", path="/dicom-web/instances?limit=1&%D0%BA%D0%BB%D1%8E%D1%87=1")
    assert unicode.status == 200 and "\\u043a" in unicode.headers["warning"]


@pytest.mark.parametrize("query", [
    "StudyInstanceUID=1.2.3&StudyInstanceUID=4.5.6",  # two UID lists with nothing in common
    "offset=9223372036854775807",
    "offset=9223372036854775806&limit=10",
])
def test_searches_that_match_nothing_answer_an_empty_list(site, pki, query):
    answer = request(site.running.url, pki, "bob", path=f"/dicom-web/instances?{query}")
    assert answer.status == 200 and answer.json() == [], answer.body


@pytest.mark.parametrize("query", ["offset=9223372036854775808", "offset=%C2%B2", "offset=-1", "limit=%C2%B2",
                                   "StudyInstanceUID=" + "\\".join(f"1.2.{n}" for n in range(300))])
def test_bad_paging_and_oversized_uid_lists_are_400(site, pki, query):
    answer = request(site.running.url, pki, "bob", path=f"/dicom-web/instances?{query}")
    assert answer.status == 400 and answer.headers["content-type"] == "application/problem+json", answer.body


def test_catalog_columns_are_not_dicom_attributes(site, pki):
    for query in ("includefield=OriginalSOPInstanceUID", "OriginalSOPInstanceUID=1.2.3", "includefield=all"):
        answer = request(site.running.url, pki, "bob", path=f"/dicom-web/instances?limit=2&{query}")
        assert answer.status == 200, (query, answer.body)
        assert all(all(len(tag) == 8 for tag in item) for item in answer.json())


@pytest.mark.parametrize(("keyword", "tag", "text"), [
    ("InstanceNumber", "00200013", "abc"), ("InstanceNumber", "00200013", "1e999"),
    ("InstanceNumber", "00200013", "99999999999999999999"), ("SliceThickness", "00180050", "nan"),
])
def test_a_number_breaking_its_vr_is_answered_as_written(keyword, tag, text):
    """Registration keeps a value that breaks its VR as it was written (srm_dicom/metadata.py);
    QIDO-RS answered such an InstanceNumber or SliceThickness with a 500 (ValueError)."""
    vr, seven = ("IS", 7) if keyword == "InstanceNumber" else ("DS", 7.0)
    assert _dicom_json({keyword: f"7\\{text}"}) == {tag: {"vr": vr, "Value": [seven, text]}}
