"""A PHI corpus made afresh by each run (random marker prefixes, so nothing is tuned to it):
synthetic patients with several studies, every identifying attribute a unique marker, checked
after anonymization with the checks a data-protection officer asks for: text_removed,
uid_changed, uid_consistent, date_shifted and patid_consistent."""

import secrets
import string
from collections import defaultdict
from datetime import date
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID_dictionary

from phi import make_phi_dataset
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import anonymize, to_bytes
from srm_dicom.uids import deidentify_uid

SECRET = secrets.token_bytes(32)
PATIENTS, STUDIES, SLICES = 3, 2, 2
LONGITUDINAL = AnonymizationOptions(retain_longitudinal_modified_dates=True, retain_patient_characteristics=True)


def _prefix() -> str:
    return "Q" + "".join(secrets.choice(string.ascii_uppercase) for _ in range(5))


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, Dataset, list[str]]]:
    """(patient prefix, dataset, markers) of every slice."""
    made = []
    for prefix in [_prefix() for _ in range(PATIENTS)]:
        for study in range(1, STUDIES + 1):
            for instance in range(1, SLICES + 1):
                ds, markers = make_phi_dataset(prefix, instance, study)
                made.append((prefix, ds, markers))
    return made


def _served(ds: Dataset, options: AnonymizationOptions) -> tuple[bytes, Dataset]:
    data = to_bytes(anonymize(ds, SECRET, options))
    return data, dcmread(BytesIO(data))


def _values(ds: Dataset, vr: str) -> list[tuple[str, str]]:
    """(keyword path, value) of every element of ``vr``, file meta and nested sequences included."""
    found = []
    for elem in [*ds.file_meta, *ds.iterall()]:
        if vr != elem.VR or elem.value in (None, ""):
            continue
        values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
        found += [(elem.keyword, str(v)) for v in values]
    return found


@pytest.mark.parametrize(
    "options", [AnonymizationOptions(), AnonymizationOptions(retain_longitudinal_modified_dates=True)],
    ids=["basic", "longitudinal"],
)
def test_text_removed_and_uid_changed(corpus, options):
    assert len(corpus) == PATIENTS * STUDIES * SLICES
    assert min(len(markers) for _, _, markers in corpus) >= 60  # attribute kinds with a marker
    for _, ds, markers in corpus:
        data, served = _served(ds, options)
        assert [m for m in markers if m.encode() in data] == []  # text_removed
        originals = {v for _, v in _values(ds, "UI") if v not in UID_dictionary}
        assert originals and [u for u in originals if u.encode() in data] == []  # uid_changed
        assert {v for _, v in _values(served, "UI")} & originals == set()


def test_uid_consistent_across_slices_and_references(corpus):
    mapped: dict[str, set[str]] = defaultdict(set)
    for _, ds, _ in corpus:
        _, served = _served(ds, AnonymizationOptions())
        pairs = [("StudyInstanceUID", ds, served), ("SeriesInstanceUID", ds, served),
                 ("SOPInstanceUID", ds, served), ("FrameOfReferenceUID", ds, served)]
        pairs.append(("ReferencedSOPInstanceUID", ds.SourceImageSequence[0], served.SourceImageSequence[0]))
        for keyword, source, out in pairs:
            original = str(source[keyword].value)
            mapped[original].add(str(out[keyword].value))
            assert str(out[keyword].value) == deidentify_uid(SECRET, original)
        assert served.file_meta.MediaStorageSOPInstanceUID == served.SOPInstanceUID
    assert all(len(values) == 1 for values in mapped.values())
    studies = {original for original, _ in mapped.items() if original.endswith(".11")}
    assert len(studies) == PATIENTS * STUDIES


def test_date_shifted_by_one_offset_per_patient_and_times_kept(corpus):
    offsets: dict[str, set[int]] = defaultdict(set)
    for prefix, ds, _ in corpus:
        _, served = _served(ds, LONGITUDINAL)
        originals = dict(_values(ds, "DA"))
        shifted = dict(_values(served, "DA"))
        assert shifted.keys() >= {"StudyDate", "SeriesDate", "ContentDate"}
        for keyword, value in shifted.items():
            if keyword in originals:
                assert value != originals[keyword], keyword  # date_shifted
                offsets[prefix].add((date.fromisoformat(originals[keyword]) - date.fromisoformat(value)).days)
        assert served.StudyTime == ds.StudyTime  # times are kept
        assert served.PatientAge == ds.PatientAge  # an age stays true when every date moves alike
        assert served.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "113107" in [item.CodeValue for item in served.DeidentificationMethodCodeSequence]
    assert all(len(days) == 1 and 1 <= next(iter(days)) <= 3650 for days in offsets.values())
    assert len({next(iter(days)) for days in offsets.values()}) > 1 or PATIENTS == 1


def test_patid_consistent_per_patient_and_distinct_across_patients(corpus):
    ids: dict[str, set[str]] = defaultdict(set)
    for prefix, ds, _ in corpus:
        _, served = _served(ds, AnonymizationOptions())
        assert served.PatientID != ds.PatientID
        ids[prefix].add(str(served.PatientID))
    assert all(len(found) == 1 for found in ids.values())
    assert len(set().union(*ids.values())) == PATIENTS
