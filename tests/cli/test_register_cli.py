import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pydicom.misc
import pytest

from conftest import require_program
from sites import mdm, require_vendor_data, write_site_config
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.synthetic import FakePatient, make_series


def orthanc_instances(peer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.http_port}/statistics") as response:
        return json.load(response)["CountInstances"]


def series_dirs(catalog, root="/grid/demo/mdm"):
    namespace = catalog.namespace
    return [s for study in namespace.list_dir(root).directories for s in namespace.list_dir(study).directories]


def test_vendor_tree_registers_into_orthanc_with_a_3d_per_series(orthanc, tmp_path, key_servers):
    vendor = require_vendor_data()
    config_path = write_site_config(tmp_path, orthanc, key_servers)
    result = mdm("register", str(vendor), config=config_path)
    # The tree also holds NIfTI references and a LICENSE: skipped, not failed (issue 12, finding 8).
    # The RGB series is a secondary capture: refused by default ([anonymization] burned_in).
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("failed: ")]
    assert failed and all("/rgb/" in line and line.endswith(
        ": refused: a secondary capture commonly shows text burned into its pixels"
        ' ([anonymization] burned_in = "refuse")') for line in failed)
    assert "Traceback" not in result.stderr
    not_dicom = [p for p in vendor.rglob("*") if p.is_file() and not pydicom.misc.is_dicom(p)]
    assert not_dicom and all(p.suffix in (".gz", "") for p in not_dicom)
    # The compressed variants re-encode the same images under the same SOP UIDs: updates.
    readable = [p for p in vendor.rglob("*") if p.is_file() and pydicom.misc.is_dicom(p) and "/rgb/" not in str(p)]
    distinct = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in readable}
    assert f"{len(distinct)} registered, " in result.stdout
    assert f"{len(failed)} failed, {len(not_dicom)} skipped (not DICOM)" in result.stdout
    assert orthanc_instances(orthanc) == len(distinct)
    catalog = open_catalog(load_config(config_path))
    directories = series_dirs(catalog)
    assert len(directories) == 11
    for directory in directories:
        kinds = [e.kind for e in catalog.namespace.list_dir(directory).entries]
        assert kinds.count("volume") == 2 and kinds.count("slice") >= 2  # 3D and 3D.json
    catalog.close()

    again = mdm("register", str(vendor / "siemens"), config=config_path)
    assert again.returncode == 0 and "0 registered, 0 updated, 4 already registered" in again.stdout


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
    slices = [e for d in series_dirs(catalog) for e in catalog.namespace.list_dir(d).entries if e.kind == "slice"]
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


def hostile_tree(folder: Path) -> dict[str, Path]:
    """A folder as users have them: one good image beside a README, a NIfTI file, a DICOMDIR,
    a FIFO, and DICOM files whose values pydicom cannot decode (lazily, on first access)."""
    from pydicom.data import get_testdata_file

    folder.mkdir()
    good = make_series(slices=1, size=8, seed="hostile tree")[0]
    files = {"good": folder / "good.dcm"}
    good.save_as(files["good"], enforce_file_format=True)
    data = files["good"].read_bytes()
    rows = data.find(b"\x28\x00\x10\x00US")  # (0028,0010) Rows, explicit VR little endian
    assert rows > 0
    files["readme"] = folder / "README"
    files["readme"].write_text("scans of the phantom, see the lab book\n")
    files["nifti"] = folder / "volume.nii.gz"
    files["nifti"].write_bytes(b"\x1f\x8b\x08\x00" + bytes(200))
    files["dicomdir"] = folder / "DICOMDIR"
    files["dicomdir"].write_bytes(Path(get_testdata_file("DICOMDIR")).read_bytes())
    files["fifo"] = folder / "pipe.dcm"
    os.mkfifo(files["fifo"])
    # NotImplementedError: an unknown VR; pydicom's BytesLengthException: 3 bytes for a US.
    files["unknown vr"] = folder / "unknown-vr.dcm"
    files["unknown vr"].write_bytes(data[: rows + 4] + b"ZZ" + data[rows + 6:])
    files["odd length"] = folder / "odd-length.dcm"
    files["odd length"].write_bytes(data[: rows + 6] + b"\x03\x00" + data[rows + 8: rows + 10] + b"\x00"
                                    + data[rows + 10:])
    return files


def test_a_folder_of_what_users_have_registers_its_images_and_skips_the_rest(embedded_pacs, tmp_path, key_servers):
    """Issue 12, findings 3 and 8: lazy decoding errors were tracebacks that ended the batch,
    a FIFO hung the walk, README/NIfTI/DICOMDIR were each a failure and exit 1."""
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    files = hostile_tree(tmp_path / "scans")
    corrupt = (files["unknown vr"], files["odd length"])
    for path in corrupt:
        path.rename(tmp_path / path.name)
    clean = mdm("register", "-v", str(tmp_path / "scans"), config=config_path, timeout=60)
    assert clean.returncode == 0, clean.stderr
    assert clean.stderr == ""
    # -v names the LFN each file received (issue 12, finding 8).
    (line,) = [line for line in clean.stdout.splitlines() if line.startswith("registered: ")]
    lfn = r"/grid/demo/mdm/2\.25\.\d+/2\.25\.\d+/2\.25\.\d+"
    assert re.fullmatch(rf"registered: {re.escape(str(files['good']))} -> {lfn}", line), line
    assert ("1 registered, 0 updated, 0 already registered, 0 failed, 1 skipped (DICOMDIR), "
            "2 skipped (not DICOM), 1 skipped (not a regular file)") in clean.stdout

    for path in corrupt:
        (tmp_path / path.name).rename(path)
    again = mdm("register", str(tmp_path / "scans"), config=config_path, timeout=60)
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    failed = sorted(line for line in again.stderr.splitlines())
    assert len(failed) == 2, again.stderr
    assert failed[0].startswith(f"failed: {files['odd length']}: corrupt DICOM element")
    assert failed[1].startswith(f"failed: {files['unknown vr']}: corrupt DICOM element")
    assert "0 registered, 0 updated, 1 already registered, 2 failed" in again.stdout


@pytest.mark.parametrize(("name", "reason"), [
    ("readme", "not a DICOM file"), ("nifti", "not a DICOM file"), ("dicomdir", "DICOMDIR"),
    ("fifo", "not a regular file"), ("unknown vr", "corrupt DICOM element"),
])
def test_a_named_file_that_is_no_image_fails_with_its_reason(name, reason, embedded_pacs, tmp_path, key_servers):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    files = hostile_tree(tmp_path / "scans")
    result = mdm("register", str(files[name]), config=config_path, timeout=60)
    assert result.returncode == 1, result
    assert result.stderr.startswith(f"failed: {files[name]}: {reason}") and len(result.stderr.splitlines()) == 1
