"""What an MIA analyst sees of a PHI corpus through every search interface is what the served
file says: every attribute shown at the anonymous level equals its value in the file the
analyst may download, or is absent; no marker of the corpus appears in any answer."""

import json
from urllib.parse import urlencode

import pydicom
import pytest
from pydicom.datadict import tag_for_keyword
from test_query_cli import mdm, user_config

from conftest import CLIENT_AET
from https import request
from peers import free_port, start_embedded
from phi import make_phi_dataset
from srm_dicom.metadata import _value
from srm_dicom.query import ANONYMOUS, ATTRIBUTES
from storage import start_site

ANONYMOUS_KEYWORDS = sorted(k for k, a in ATTRIBUTES.items() if a.level == ANONYMOUS)
PATIENTS = ("QVA", "QVB")  # prefixes of the corpus's markers


@pytest.fixture(scope="module")
def corpus():
    datasets, markers = [], []
    for prefix in PATIENTS:
        for instance in (1, 2):
            ds, found = make_phi_dataset(prefix, instance)
            datasets.append(ds)
            markers += found
    return datasets, sorted(set(markers))


@pytest.fixture(scope="module")
def running(corpus, key_servers, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("anonymous-level")
    pacs = start_embedded(workdir / "pacs", CLIENT_AET, free_port())
    try:
        site = start_site(workdir / "site", pacs, key_servers, corpus[0], extra="")
        try:
            yield site
        finally:
            site.stop()
    finally:
        pacs.stop()


def _leaks(text: str, markers: list[str]) -> list[str]:
    return [m for m in markers if m in text]


def served_file(running, key_servers, tmp_path, lfn: str) -> pydicom.Dataset:
    carol = user_config(running_site(running), key_servers, tmp_path, "carol")
    out = tmp_path / (lfn.rsplit("/", 1)[1] + ".dcm")
    assert mdm(carol, "get", "-l", lfn, str(out)) == 0
    return pydicom.dcmread(out)


class running_site:  # noqa: N801 - the shape test_query_cli.user_config expects
    def __init__(self, running) -> None:
        self.running = running


def test_the_json_api_shows_at_the_anonymous_level_only_what_the_served_file_says(running, corpus, key_servers,
                                                                                    tmp_path):
    markers = corpus[1]
    query = urlencode({"q": "Modality=MR", "select": ",".join(ANONYMOUS_KEYWORDS)})
    answer = request(running.url, key_servers.pki, "carol", path=f"/api/v1/metadata?{query}")
    assert answer.status == 200, answer.body
    assert _leaks(answer.body.decode(), markers) == []
    rows = answer.json()["results"]
    assert len(rows) == len(corpus[0])
    for row in rows:
        served = served_file(running, key_servers, tmp_path, row["lfn"])
        for keyword, shown in row.items():
            if keyword in ("lfn", "guid") or shown is None:
                continue
            source = served.file_meta if keyword == "TransferSyntaxUID" else served
            assert shown == _value(source, keyword), keyword


def test_qido_rs_includefield_all_shows_only_what_the_served_file_says(running, corpus, key_servers, tmp_path):
    markers = corpus[1]
    answer = request(running.url, key_servers.pki, "carol", path="/dicom-web/instances?includefield=all",
                     headers={"Accept": "application/dicom+json"})
    assert answer.status == 200, answer.body
    assert _leaks(answer.body.decode(), markers) == []
    instances = answer.json()
    assert len(instances) == len(corpus[0])
    lfns = {}
    for study in {i["0020000D"]["Value"][0] for i in instances}:
        listing = running.catalog.namespace.list_dir(f"/grid/demo/mdm/{study}")
        for series in listing.directories:
            lfns.update({e.sop_uid: e.lfn for e in running.catalog.namespace.list_dir(series).entries})
    for instance in instances:
        lfn = lfns[instance["00080018"]["Value"][0]]
        served = served_file(running, key_servers, tmp_path, lfn)
        for tag, element in instance.items():
            if "Value" not in element:
                continue
            if tag == "00081190":  # RetrieveURL: where the file is (its LFN), not an attribute of it
                assert element["Value"] == [running.url + lfn]
                continue
            source = served.file_meta if tag == "00020010" else served
            expected = source[int(tag, 16)].value
            values = expected if isinstance(expected, pydicom.multival.MultiValue) else [expected]
            shown = element["Value"]
            assert [str(v) for v in shown] == [str(v) for v in values] or \
                [float(v) for v in shown] == [float(v) for v in values], tag


def test_mdm_query_propfind_and_errors_carry_no_marker(running, corpus, key_servers, tmp_path, capsys):
    markers = corpus[1]
    carol = user_config(running_site(running), key_servers, tmp_path, "carol")
    assert mdm(carol, "query", "--json", "--select", ",".join(ANONYMOUS_KEYWORDS), "Modality=MR") == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)["results"]) == len(corpus[0])
    assert _leaks(out.out + out.err, markers) == []
    # Filters on what carol may not see, and unknown names: empty answers and errors, no marker.
    for q in ('PatientName like "QVA*"', 'ProtocolName like "*QVA*"', "Nonsense=1"):
        mdm(carol, "query", "--json", q)
        out = capsys.readouterr()
        assert _leaks(out.out + out.err, markers) == []
    study = running.catalog.namespace.list_dir("/grid/demo/mdm").directories[0]
    answer = request(running.url, key_servers.pki, "carol", method="PROPFIND", path=study,
                     headers={"Depth": "1"})
    assert answer.status == 207
    missing = request(running.url, key_servers.pki, "carol", path=study + "/2.25.1")
    assert missing.status == 404
    assert _leaks((answer.body + missing.body).decode(), markers) == []
    assert tag_for_keyword("ProtocolName")  # the attribute the issue saw leak is among those checked
    assert "ProtocolName" in ANONYMOUS_KEYWORDS
