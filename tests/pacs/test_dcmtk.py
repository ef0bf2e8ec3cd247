"""The DCMTK engine ([pacs] engine = "dcmtk"): C-GET by /usr/bin/getscu against every real PACS."""

from __future__ import annotations

import stat
import tempfile
from pathlib import Path

import pytest
from pydicom import Dataset

from conftest import require_program
from peers import Peer
from srm_dicom.pacs.client import DCMTK_FROM, PacsClient, RetrieveRefused
from srm_dicom.pacs.dcmtk import GETSCU
from srm_dicom.synthetic import make_series


@pytest.fixture
def stored(any_pacs: Peer) -> list[Dataset]:
    require_program(GETSCU)
    series = make_series(slices=10, size=16, seed=f"dcmtk-{any_pacs.name}")
    with PacsClient(any_pacs.pacs_config()) as pacs:
        pacs.store_many(series)
    return series


def test_a_series_and_a_uid_list_arrive_whole(any_pacs: Peer, stored: list[Dataset]) -> None:
    study, series = stored[0].StudyInstanceUID, stored[0].SeriesInstanceUID
    with PacsClient(any_pacs.pacs_config(engine="dcmtk")) as pacs:
        whole = {ds.SOPInstanceUID: ds for ds in pacs.get(study, series)}
        asked = [ds.SOPInstanceUID for ds in stored[1:1 + DCMTK_FROM]]  # a batch getscu takes
        some = [ds.SOPInstanceUID for ds in pacs.get(study, series, asked)]
    assert set(whole) == {ds.SOPInstanceUID for ds in stored}
    for sent in stored:
        got = whole[sent.SOPInstanceUID]
        assert got.PixelData == sent.PixelData and got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert sorted(some) == sorted(asked)


def test_an_unknown_uid_is_missed_or_refused_as_by_the_pynetdicom_engine(any_pacs: Peer, stored: list[Dataset]) -> None:
    study, series = stored[0].StudyInstanceUID, stored[0].SeriesInstanceUID
    asked = [*(ds.SOPInstanceUID for ds in stored[:DCMTK_FROM - 1]), "1.2.3.4.5.6.7.8.9"]
    outcomes = {}
    for engine in ("pynetdicom", "dcmtk"):
        with PacsClient(any_pacs.pacs_config(engine=engine)) as pacs:
            try:
                outcomes[engine] = sorted(ds.SOPInstanceUID for ds in pacs.get(study, series, asked, partial=[]))
            except RetrieveRefused as exc:
                assert str(exc).startswith(pacs.name) and "\n" not in str(exc)
                outcomes[engine] = "refused"
    assert outcomes["dcmtk"] == outcomes["pynetdicom"]  # Orthanc refuses the list; the others send what they have
    assert outcomes["dcmtk"] in ("refused", sorted(asked[:-1]))


def test_the_spool_directory_is_private_and_removed(any_pacs: Peer, stored: list[Dataset], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The spool holds the PACS's originals, PHI included."""
    modes: list[int] = []
    spools: list[Path] = []
    made = tempfile.TemporaryDirectory

    class Watched(made):  # type: ignore[misc, valid-type]
        def __enter__(self):  # type: ignore[no-untyped-def]
            path = super().__enter__()
            modes.append(stat.S_IMODE(Path(path).stat().st_mode))
            spools.append(Path(path))
            return path

    monkeypatch.setattr(tempfile, "TemporaryDirectory", Watched)
    with PacsClient(any_pacs.pacs_config(engine="dcmtk")) as pacs:
        assert len(list(pacs.get(stored[0].StudyInstanceUID, stored[0].SeriesInstanceUID))) == len(stored)
    assert modes == [0o700] and not spools[0].exists()


@pytest.mark.parametrize("pacs", ["orthanc", "embedded_pacs"])  # dcmqrscp takes no compressed images
def test_what_getscu_cannot_take_is_asked_again_with_pynetdicom(pacs: str, request: pytest.FixtureRequest) -> None:
    """getscu proposes uncompressed syntaxes only: a JPEG 2000 series still arrives as stored."""
    require_program(GETSCU)
    from test_pacs_client import series as vendor_series  # the vendor data the client tests use

    peer: Peer = request.getfixturevalue(pacs)
    sent = vendor_series("generic/compressed_j2k", 2)
    with PacsClient(peer.pacs_config()) as client:
        client.store_many(sent)
    with PacsClient(peer.pacs_config(engine="dcmtk")) as client:
        got = {ds.SOPInstanceUID: ds for ds in client.get(sent[0].StudyInstanceUID, sent[0].SeriesInstanceUID)}
    assert set(got) == {ds.SOPInstanceUID for ds in sent}
    for ds in sent:
        assert got[ds.SOPInstanceUID].file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert got[ds.SOPInstanceUID].PixelData == ds.PixelData
