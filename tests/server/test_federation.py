"""Federation: two storage elements on loopback (each with its own embedded PACS, catalog and
series; the same key servers and PKI), queried at once by one client config, one of them
stopped mid-test; ``mdm get`` follows the site of the entry."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

import peers
from conftest import CLIENT_AET
from sites import write_site_config
from srm_dicom import sites
from srm_dicom.cli import main
from srm_dicom.config import load_config
from srm_dicom.synthetic import FakePatient, make_series
from srm_dicom.uids import deidentify_uid
from storage import RunningStorageElement, register, start_storage_element

NORTH_PATIENT = FakePatient(name="NORTH^ANNA", patient_id="P-NORTH")
SOUTH_PATIENT = FakePatient(name="SOUTH^BORIS", patient_id="P-SOUTH")


@dataclass
class Hospital:
    name: str
    running: RunningStorageElement
    series: list

    def lfn(self, ds: pydicom.Dataset) -> str:
        secret = self.running.config.site.secret_bytes
        uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        return "/grid/demo/mdm/" + "/".join(deidentify_uid(secret, uid) for uid in uids)

    def lfns(self) -> set[str]:
        return {self.lfn(ds) for ds in self.series}


@contextmanager
def hospital(name: str, workdir: Path, key_servers, series: list) -> Iterator[Hospital]:  # type: ignore[no-untyped-def]
    pacs = peers.start_embedded(workdir / "pacs", CLIENT_AET, peers.free_port())
    try:
        config_path = write_site_config(workdir / "site", pacs, key_servers)
        register(config_path, series)
        running = start_storage_element(config_path)
        try:
            yield Hospital(name, running, series)
        finally:
            running.stop()
    finally:
        pacs.stop()


def _series(seed: str, patient: FakePatient, slices: int, modality: str) -> list:
    datasets = make_series(slices=slices, size=8, seed=seed, patient=patient)
    for ds in datasets:
        ds.Modality = modality
    return datasets


@pytest.fixture
def north(key_servers, tmp_path):  # type: ignore[no-untyped-def]
    with hospital("north", tmp_path / "north", key_servers, _series("north", NORTH_PATIENT, 3, "CT")) as site:
        yield site


@pytest.fixture
def south(key_servers, tmp_path):  # type: ignore[no-untyped-def]
    with hospital("south", tmp_path / "south", key_servers, _series("south", SOUTH_PATIENT, 2, "MR")) as site:
        yield site


def mdm(config: Path, *args: str) -> int:
    return main(["--config", str(config), *args])


@pytest.fixture
def bob(pki, key_servers, tmp_path, north, south):  # type: ignore[no-untyped-def]
    """Bob's client.toml from the PKI (a physician: nominative metadata under the default "group"
    mode), [storage] url the north site, with both sites added by `mdm site add`."""
    folder = tmp_path / "client" / "users" / "bob"
    folder.mkdir(parents=True)
    for name in ("cert.pem", "key.pem", "client.toml"):
        shutil.copy(pki / "users" / "bob" / name, folder / name)
    shutil.copy(pki / "ca.pem", tmp_path / "client" / "ca.pem")
    path = folder / "client.toml"
    text = path.read_text().replace('url = ""', f'url = "{north.running.url}"', 1)
    path.write_text(re.sub(r"urls = \[[^\]]*\]", f"urls = {json.dumps(key_servers.urls)}", text))
    assert mdm(path, "site", "add", "north", north.running.url) == 0
    assert mdm(path, "site", "add", "south", south.running.url) == 0
    return path


def by_site(rows: list[dict]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for row in rows:
        if not row["lfn"].endswith("/3D"):
            found.setdefault(row["site"], set()).add(row["lfn"])
    return found


def test_a_query_to_all_sites_merges_rows_tagged_with_their_site(bob, north, south):
    config = load_config(bob)
    chosen = sites.choose(config, "all")
    # [storage] url is north's too: asked once, under its name.
    assert [site.name for site in chosen] == ["north", "south"]
    answer = sites.query(config, chosen, {"q": "", "select": "PatientName,Modality"})
    assert answer.failures == []
    assert by_site(answer.rows) == {"north": north.lfns(), "south": south.lfns()}
    for row in answer.rows:
        patient, modality = (NORTH_PATIENT, "CT") if row["site"] == "north" else (SOUTH_PATIENT, "MR")
        assert row["PatientName"] == patient.name and row["Modality"] == modality
        assert row["guid"].startswith("guid:")

    only_south = sites.query(config, chosen, {"q": "Modality=MR"})
    assert by_site(only_south.rows) == {"south": south.lfns()}
    assert by_site(sites.query(config, sites.choose(config, "north"), {"q": ""}).rows) == {"north": north.lfns()}


def test_mdm_query_site_all_prints_each_row_with_its_site(bob, north, south, capsys):
    capsys.readouterr()
    assert mdm(bob, "query", "--site", "all", "--select", "PatientName", "PatientName like '*^*'") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["site", "lfn", "guid", "PatientName"]
    printed = {(line.split()[0], line.split()[1]) for line in out[1:] if not line.split()[1].endswith("/3D")}
    assert printed == {("north", lfn) for lfn in north.lfns()} | {("south", lfn) for lfn in south.lfns()}

    assert mdm(bob, "query", "--site", "south", "--json", "") == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert by_site(rows) == {"south": south.lfns()}


def test_a_site_stopped_mid_test_is_reported_and_the_other_still_answers_within_the_bound(bob, north, south, capsys):
    config = load_config(bob)
    chosen = sites.choose(config, "all")
    assert by_site(sites.query(config, chosen, {"q": ""}).rows).keys() == {"north", "south"}

    south.running.stop()
    started = time.monotonic()
    answer = sites.query(config, chosen, {"q": ""}, timeout=3.0)
    elapsed = time.monotonic() - started
    assert by_site(answer.rows) == {"north": north.lfns()}
    assert [failure.site for failure in answer.failures] == ["south"]
    assert south.running.url in answer.failures[0].reason
    assert elapsed < 3.5

    # The command: the other site's rows on stdout, one line on stderr naming the stopped one, exit 1.
    capsys.readouterr()
    assert mdm(bob, "query", "--site", "all", "--json", "") == 1
    printed = capsys.readouterr()
    assert by_site(json.loads(printed.out)["results"]) == {"north": north.lfns()}
    assert printed.err.count("\n") == 1 and printed.err.startswith("mdm query: site south: ")


def test_mdm_get_downloads_from_the_second_site(bob, north, south, tmp_path, capsys):
    source = south.series[1]
    lfn = south.lfn(source)
    dest = tmp_path / "south.dcm"
    assert mdm(bob, "get", "--site", "south", "-l", lfn, str(dest)) == 0
    served = pydicom.dcmread(dest)
    assert np.array_equal(served.pixel_array, source.pixel_array)
    assert served.PatientName != SOUTH_PATIENT.name

    # The default site (north) does not have it: asked there only, it is not found.
    capsys.readouterr()
    assert mdm(bob, "get", "--site", "north", "-l", lfn, str(tmp_path / "nowhere.dcm")) == 3
    assert "not found" in capsys.readouterr().err

    # A GUID found by a federated query needs no --site: the site that has it is found.
    config = load_config(bob)
    row = next(row for row in sites.query(config, sites.choose(config, "all"), {"q": "Modality=MR"}).rows
               if row["lfn"] == south.lfn(south.series[0]))
    assert row["site"] == "south"
    followed = tmp_path / "followed.dcm"
    assert mdm(bob, "get", row["guid"], str(followed)) == 0
    assert np.array_equal(pydicom.dcmread(followed).pixel_array, south.series[0].pixel_array)

    capsys.readouterr()
    assert mdm(bob, "get", "guid:00000000-0000-4000-8000-000000000000", str(tmp_path / "x.dcm")) == 3
    assert "at any site (asked north, south)" in capsys.readouterr().err
    assert mdm(bob, "get", "--site", "all", row["guid"], str(tmp_path / "x.dcm")) == 2
    assert mdm(bob, "get", "--site", "west", row["guid"], str(tmp_path / "x.dcm")) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "one site" in err[0] and "unknown site 'west'" in err[1]
