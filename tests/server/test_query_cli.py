"""``mdm query`` on both sides: the hospital's catalog directly, the grid's JSON API with a user's
certificate; its LFNs feed ``mdm get``."""

import json

import pydicom
import pytest
from searchsite import search_site

from srm_dicom.cli import main


@pytest.fixture(scope="module")
def site(key_servers, tmp_path_factory):
    with search_site(tmp_path_factory.mktemp("query-cli"), key_servers) as found:
        yield found


def user_config(site, key_servers, tmp_path, user):
    pki = key_servers.pki
    path = tmp_path / f"{user}.toml"
    path.write_text(f"""[site]
vo = "demo"

[storage]
url = "{site.running.url}"

[keystore]
urls = {json.dumps(key_servers.urls)}
ca = "{pki / "ca.pem"}"
cert = "{pki / "users" / user / "cert.pem"}"
key = "{pki / "users" / user / "key.pem"}"
""")
    return path


def mdm(config, *args):
    return main(["--config", str(config), *args])


def test_a_physician_finds_a_patients_images_and_gets_one_by_its_lfn(site, key_servers, tmp_path, capsys):
    bob = user_config(site, key_servers, tmp_path, "bob")
    assert mdm(bob, "query", "--json", "--select", "PatientName,Modality", 'PatientName="ROE^JANE"') == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert {r["lfn"] for r in rows} == site.lfns("roe_ct") and all(r["PatientName"] == "ROE^JANE" for r in rows)
    assert mdm(bob, "get", "-l", rows[0]["lfn"], str(tmp_path / "slice.dcm")) == 0
    assert str(pydicom.dcmread(tmp_path / "slice.dcm").SOPInstanceUID) == rows[0]["lfn"].rsplit("/", 1)[1]

    assert mdm(bob, "query", "Modality=MR") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["lfn", "guid", "PatientName", "Modality", "StudyInstanceUID", "SeriesInstanceUID",
                                "SOPInstanceUID"]
    assert {line.split()[0] for line in lines[1:]} == site.lfns("doe_mr")
    assert all(line.split()[2] == "DOE^JOHN" and line.split()[1].startswith("guid:") for line in lines[1:])


def test_a_mia_analyst_sees_no_patient_column_values(site, key_servers, tmp_path, capsys):
    carol = user_config(site, key_servers, tmp_path, "carol")
    assert mdm(carol, "query", "--json", "--select", "PatientName,Modality", "Modality=MR") == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert len(rows) == 2 and all("PatientName" not in r for r in rows)
    assert mdm(carol, "query", "--json", 'PatientName="DOE^JOHN"') == 0
    assert json.loads(capsys.readouterr().out)["results"] == []
    # Issue 12, finding 8: a query the rights reduce to nothing printed nothing at all.
    assert mdm(carol, "query", 'PatientName="DOE^JOHN"') == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "mdm query: no match among the images, and the attributes, your rights let you search\n"


def test_the_hospital_side_searches_its_catalog_with_full_rights(site, capsys):
    assert mdm(site.running.config_path, "query", "--json", "--limit", "3",
               "--select", "PatientName,OriginalStudyInstanceUID", "StudyDate < 20200101") == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["results"]
    assert len(rows) == 3 and "first 3 matches" in captured.err
    assert {r["PatientName"] for r in rows} <= {"ROE^JANE", "POE^ANON", "PUB^LIC"}
    assert all(r["OriginalStudyInstanceUID"].startswith("1.2.826.0.1.3680043") for r in rows)


def test_a_bad_query_is_one_line_and_exit_2(site, key_servers, tmp_path, capsys):
    bob = user_config(site, key_servers, tmp_path, "bob")
    for config in (bob, site.running.config_path):
        assert mdm(config, "query", "Modality=CT Rows=8") == 2
        err = capsys.readouterr().err
        assert err.startswith("mdm query: ") and "join conditions with 'and' or 'or'" in err
        assert err.count("\n") == 1
