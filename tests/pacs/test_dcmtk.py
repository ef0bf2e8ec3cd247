"""The DCMTK engine ([pacs] engine = "dcmtk"): C-GET by /usr/bin/getscu against every real PACS."""

from __future__ import annotations

import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset

from conftest import require_program
from peers import Peer
from srm_dicom.config import PacsConfig
from srm_dicom.pacs import dcmtk
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


# A stand-in for getscu: writes the images named in $FAKE_IMAGES into its -od directory, one
# at a time, each after the file named $FAKE_GO_<n> exists (the test's go-ahead), then prints
# $FAKE_STDERR on stderr. What getscu_stream hands on while it waits is what was written so far.
FAKE_GETSCU = """#!{python}
import os, sys, time
out = sys.argv[sys.argv.index("-od") + 1]
for n, image in enumerate(os.environ["FAKE_IMAGES"].split()):
    go = os.environ["FAKE_GO"] + str(n)
    while not os.path.exists(go):
        time.sleep(0.01)
    with open(os.path.join(out, image), "wb") as f:
        f.write(b"an image")
sys.stderr.write(os.environ.get("FAKE_STDERR", ""))
"""


@pytest.fixture
def fake_getscu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    program = tmp_path / "getscu"
    program.write_text(FAKE_GETSCU.format(python=sys.executable))
    program.chmod(0o755)
    monkeypatch.setattr(dcmtk, "GETSCU", str(program))
    monkeypatch.setenv("FAKE_GO", str(tmp_path / "go"))
    monkeypatch.setenv("FAKE_IMAGES", "CT.1.2.3 CT.1.2.4 not-an-image")
    (tmp_path / "go0").touch()
    (tmp_path / "spool").mkdir()
    return tmp_path


def _stream(folder: Path) -> Iterator[tuple[str, Path]]:
    config = PacsConfig(aet="PACS", host="127.0.0.1", port=104, calling_aet="ME", engine="dcmtk")
    return dcmtk.getscu_stream(config, "PACS", "1.2", "1.2.1", None, folder / "spool")


def test_each_image_is_handed_on_once_getscu_has_written_it(fake_getscu: Path) -> None:
    """The stager's workers protect the first images while the PACS still sends the others."""
    images = _stream(fake_getscu)
    assert next(images) == ("1.2.3", fake_getscu / "spool" / "CT.1.2.3")  # the second is not written yet
    assert not (fake_getscu / "spool" / "CT.1.2.4").exists()
    (fake_getscu / "go1").touch()
    (fake_getscu / "go2").touch()
    assert list(images) == [("1.2.4", fake_getscu / "spool" / "CT.1.2.4")]  # not a UID: left out


def test_without_inotify_the_images_come_when_getscu_has_finished(
    fake_getscu: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dcmtk.ctypes, "CDLL", lambda *args, **kwargs: object())  # no inotify_init1 there
    for n in (1, 2):
        (fake_getscu / f"go{n}").touch()
    assert sorted(_stream(fake_getscu)) == [("1.2.3", fake_getscu / "spool" / "CT.1.2.3"),
                                            ("1.2.4", fake_getscu / "spool" / "CT.1.2.4")]


def test_a_complaint_comes_after_the_images_written(fake_getscu: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller keeps what it has and asks pynetdicom again (PacsClient.get_files)."""
    monkeypatch.setenv("FAKE_STDERR", "W: Store SCP: failed sub-operations\n")
    for n in (1, 2):
        (fake_getscu / f"go{n}").touch()
    got = []
    with pytest.raises(dcmtk.GetscuIncomplete, match="failed sub-operations"):
        for uid, _ in _stream(fake_getscu):
            got.append(uid)
    assert sorted(got) == ["1.2.3", "1.2.4"]
