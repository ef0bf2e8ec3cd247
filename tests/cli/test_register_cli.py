import json
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pydicom.misc

from conftest import require_program
from sites import mdm, require_vendor_data, write_site_config
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.synthetic import FakePatient, make_series


def orthanc_instances(peer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.http_port}/statistics") as response:
        return json.load(response)["CountInstances"]


def series_dirs(catalog, root="/grid/demo/mdm"):
    return [s for study in catalog.list_dir(root).directories for s in catalog.list_dir(study).directories]


def test_vendor_tree_registers_into_orthanc_with_a_3d_per_series(orthanc, tmp_path, key_servers):
    vendor = require_vendor_data()
    config_path = write_site_config(tmp_path, orthanc, key_servers)
    result = mdm("register", str(vendor), config=config_path)
    assert result.returncode == 1, result.stderr  # the tree also holds NIfTI references and a LICENSE
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    # The RGB series is a secondary capture: refused by default ([anonymization] burned_in).
    burned_in = [line for line in failed if "/rgb/" in line and "not a DICOM file" not in line]
    assert burned_in and all(line.endswith(
        ": refused: a secondary capture commonly shows text burned into its pixels"
        ' ([anonymization] burned_in = "refuse")') for line in burned_in)
    not_dicom = [line for line in failed if line not in burned_in]
    assert not_dicom and all(line.endswith(": not a DICOM file") for line in not_dicom)
    assert all(Path(line.split(": ")[1]).suffix in (".gz", "") for line in not_dicom)
    assert "Traceback" not in result.stderr
    # The compressed variants re-encode the same images under the same SOP UIDs: updates.
    readable = [p for p in vendor.rglob("*") if p.is_file() and pydicom.misc.is_dicom(p) and "/rgb/" not in str(p)]
    distinct = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in readable}
    assert f"{len(distinct)} registered, " in result.stdout
    assert f"{len(failed)} failed" in result.stdout
    assert orthanc_instances(orthanc) == len(distinct)
    catalog = open_catalog(load_config(config_path))
    directories = series_dirs(catalog)
    assert len(directories) == 11
    for directory in directories:
        kinds = [e.kind for e in catalog.list_dir(directory).entries]
        assert kinds.count("volume") == 1 and kinds.count("slice") >= 2
    catalog.close()

    again = mdm("register", str(vendor / "siemens"), config=config_path)
    assert again.returncode == 1 and "0 registered, 0 updated, 4 already registered" in again.stdout


def test_from_pacs_indexes_a_study_stored_by_storescu_moving_nothing(orthanc, tmp_path, key_servers):
    storescu = require_program("/usr/bin/storescu")
    before = orthanc_instances(orthanc)
    files = []
    for patient, seed in ((FakePatient(patient_id="PAT-A"), "a"), (FakePatient(patient_id="PAT-B"), "b")):
        for i, ds in enumerate(make_series(slices=3, size=16, seed=seed, patient=patient)):
            path = tmp_path / f"{seed}{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    subprocess.run([storescu, "-aec", orthanc.aet, "127.0.0.1", str(orthanc.port), *map(str, files)], check=True,
                   capture_output=True, timeout=60)
    stored = orthanc_instances(orthanc)
    assert stored == before + 6
    config_path = write_site_config(tmp_path / "site", orthanc, key_servers)
    study_a = pydicom.dcmread(files[0]).StudyInstanceUID

    by_study = mdm("register", "--from-pacs", "--study", study_a, config=config_path)
    assert by_study.returncode == 0 and by_study.stdout.startswith("3 registered"), by_study
    by_patient = mdm("register", "--from-pacs", "--patient", "PAT-B", config=config_path)
    assert by_patient.returncode == 0 and by_patient.stdout.startswith("3 registered"), by_patient
    everything = mdm("register", "--from-pacs", "--all", config=config_path)
    assert f"{before} registered, 0 updated, 6 already registered, 0 failed" in everything.stdout
    assert orthanc_instances(orthanc) == stored
    catalog = open_catalog(load_config(config_path))
    slices = [e for d in series_dirs(catalog) for e in catalog.list_dir(d).entries if e.kind == "slice"]
    assert len(slices) == stored
    catalog.close()


def test_a_pacs_that_is_down_is_one_line_naming_it(embedded_pacs, tmp_path, key_servers):
    config_path = write_site_config(tmp_path, embedded_pacs, key_servers)
    embedded_pacs.stop()
    path = tmp_path / "one.dcm"
    make_series(slices=1, size=8)[0].save_as(path, enforce_file_format=True)
    result = mdm("register", str(path), config=config_path, timeout=60)
    assert result.returncode == 4
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("mdm register:")]
    assert len(error) == 1 and f"{embedded_pacs.aet}@127.0.0.1:{embedded_pacs.port}" in error[0]


def test_usage_mistakes_exit_2_with_a_hint(embedded_pacs, tmp_path, key_servers):
    config_path = write_site_config(tmp_path, embedded_pacs, key_servers)
    nothing = mdm("register", config=config_path)
    assert nothing.returncode == 2 and "give PATHs" in nothing.stderr
    half = mdm("register", "--from-pacs", config=config_path)
    assert half.returncode == 2 and "--study UID" in half.stderr
    assert mdm("register", "--help").stdout.count("--from-pacs") >= 2
