"""PacsClient against real PACS: Orthanc, DCMTK dcmqrscp and the embedded pynetdicom PACS."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from peers import Peer, free_port
from srm_dicom.config import PacsConfig
from srm_dicom.errors import NotFound, PacsError
from srm_dicom.pacs.client import PacsClient


def data_dir() -> Path:
    root = Path(os.environ.get("SRM_DICOM_DATA", "/work/shared/data")) / "dicom2nifti"
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"test data missing: {root}")
        pytest.skip(f"test data missing: {root}")
    return root


def series(name: str, count: int = 3) -> list[Dataset]:
    files = sorted((data_dir() / name / "001").iterdir())[:count]
    return [pydicom.dcmread(f) for f in files]


@pytest.fixture
def ge() -> list[Dataset]:
    """Three GE MR slices, Explicit VR Little Endian."""
    return series("ge/anatomical")


@pytest.fixture
def philips() -> list[Dataset]:
    """Two Philips MR slices, Implicit VR Little Endian."""
    return series("philips/anatomical", 2)


@pytest.fixture
def client(any_pacs: Peer) -> Iterator[PacsClient]:
    with PacsClient(any_pacs.pacs_config(timeout=10.0)) as pacs:
        yield pacs


def query(**keys: str) -> Dataset:
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def uids(ds: Dataset) -> tuple[str, str, str]:
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def assert_same_images(got: list[Dataset], sent: list[Dataset]) -> None:
    by_sop = {str(ds.SOPInstanceUID): ds for ds in got}
    assert sorted(by_sop) == sorted(str(ds.SOPInstanceUID) for ds in sent)
    for ds in sent:
        assert by_sop[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


def test_echo(client: PacsClient) -> None:
    client.echo()


def test_store_then_find_at_every_level(
    client: PacsClient, ge: list[Dataset], philips: list[Dataset]
) -> None:
    assert client.store_many(ge + philips) == 5
    study, series_uid, _ = uids(ge[0])

    patients = client.find("PATIENT", query(PatientID="", PatientName=""))
    assert {str(p.PatientID) for p in patients} >= {str(ge[0].PatientID)}
    assert set(client.find_studies()) >= {study, str(philips[0].StudyInstanceUID)}
    assert client.find_studies(patient_id=str(ge[0].PatientID)) != []
    assert client.find_series(study) == [series_uid]
    assert sorted(client.find_instances(study, series_uid)) == sorted(
        str(ds.SOPInstanceUID) for ds in ge
    )
    found = client.find("SERIES", query(StudyInstanceUID=study, SeriesInstanceUID="", Modality=""))
    assert [str(s.Modality) for s in found] == ["MR"]


def test_get_and_move_series_and_instance(
    client: PacsClient, ge: list[Dataset], tmp_path: Path
) -> None:
    client.store_many(ge)
    study, series_uid, sop = uids(ge[1])

    for retrieve in (client.get, client.move):
        got = list(retrieve(study, series_uid))
        assert_same_images(got, ge)
        one = list(retrieve(study, series_uid, sop))
        assert_same_images(one, [ge[1]])

    # What arrives can be written as a DICOM file as is.
    got = next(client.get(study, series_uid, sop))
    got.save_as(tmp_path / "one.dcm", enforce_file_format=True)
    again = pydicom.dcmread(tmp_path / "one.dcm")
    assert again.SOPInstanceUID == sop and again.PixelData == ge[1].PixelData


def test_retrieve_follows_config(any_pacs: Peer, ge: list[Dataset]) -> None:
    with PacsClient(any_pacs.pacs_config(retrieve="move")) as pacs:
        pacs.store(ge[0])
        assert_same_images(list(pacs.retrieve(*uids(ge[0]))), [ge[0]])


def test_uncompressed_syntaxes_round_trip(
    client: PacsClient, philips: list[Dataset], any_pacs: Peer
) -> None:
    client.store_many(philips)
    got = list(client.get(*uids(philips[0])[:2]))
    assert_same_images(got, philips)
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in got}
    if any_pacs.name == "dcmqrscp":  # it chooses among the uncompressed syntaxes
        assert syntaxes <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
    else:
        assert syntaxes == {ImplicitVRLittleEndian}


@pytest.mark.parametrize(
    "name", ["compressed_jpeg", "compressed_jpegls", "compressed", "compressed_rle"]
)
@pytest.mark.parametrize("pacs", ["orthanc", "embedded_pacs"])
def test_compressed_syntax_kept(name: str, pacs: str, request: pytest.FixtureRequest) -> None:
    peer: Peer = request.getfixturevalue(pacs)
    sent = series(f"generic/{name}", 1)
    with PacsClient(peer.pacs_config()) as client:
        client.store(sent[0])
        for retrieve in (client.get, client.move):
            (got,) = retrieve(*uids(sent[0]))
            assert got.file_meta.TransferSyntaxUID == sent[0].file_meta.TransferSyntaxUID
            assert got.PixelData == sent[0].PixelData


def test_refused_syntax_names_pacs_and_syntax(dcmqrscp: Peer) -> None:
    sent = series("generic/compressed_jpegls", 1)[0]
    with PacsClient(dcmqrscp.pacs_config()) as client, pytest.raises(PacsError) as err:
        client.store(sent)
    message = str(err.value)
    assert message.startswith(f"PACS {dcmqrscp.aet}@127.0.0.1:{dcmqrscp.port}: ")
    assert "MR Image Storage in JPEG-LS Lossless Image Compression" in message


def test_association_is_kept_across_calls(client: PacsClient, ge: list[Dataset]) -> None:
    client.store_many(ge)
    first = client._assoc
    client.echo()
    client.find_studies()
    client.store(ge[0])
    assert first is not None and client._assoc is first
    list(client.get(*uids(ge[0])))  # adds the C-GET storage contexts: reopened once
    second = client._assoc
    client.store(ge[1])
    client.find_instances(*uids(ge[1])[:2])
    list(client.get(*uids(ge[1])))
    list(client.move(*uids(ge[1])))
    assert second is not None and client._assoc is second and second.is_established


def test_stopping_a_get_early_leaves_the_client_usable(
    client: PacsClient, ge: list[Dataset]
) -> None:
    client.store_many(ge)
    retrieval = client.get(*uids(ge[0])[:2])
    next(retrieval)
    retrieval.close()
    assert_same_images(list(client.get(*uids(ge[0])[:2])), ge)


def test_missing_series_is_not_found(client: PacsClient) -> None:
    with pytest.raises(NotFound, match=r"^PACS .*: no such series$"):
        list(client.get("1.2.3.4", "1.2.3.4.5"))


def test_pacs_down_is_one_quick_line() -> None:
    port = free_port()
    config = PacsConfig(aet="NOBODY", host="127.0.0.1", port=port, timeout=10.0)
    start = time.monotonic()
    with pytest.raises(PacsError) as err, PacsClient(config) as client:
        client.echo()
    assert time.monotonic() - start < 2
    assert str(err.value) == (
        f"PACS NOBODY@127.0.0.1:{port}: cannot connect (PACS down or unreachable?)"
    )


def test_wrong_called_aet_is_rejected(any_pacs: Peer) -> None:
    config = replace(any_pacs.pacs_config(), aet="WRONG_AET")
    with pytest.raises(PacsError) as err, PacsClient(config) as client:
        client.echo()
    message = str(err.value)
    # dcmqrscp forks per association and, on a loaded machine, sometimes drops the
    # connection instead of sending the rejection: both are one clear line naming the PACS.
    assert re.match(rf"PACS WRONG_AET@127\.0\.0\.1:{any_pacs.port}: association (rejected \(|aborted)", message)
    assert "\n" not in message


def test_failure_status_is_reported_with_code(any_pacs: Peer, ge: list[Dataset]) -> None:
    """A C-MOVE to an AE title the PACS does not know fails with a failure status."""
    with PacsClient(any_pacs.pacs_config()) as client:
        client.store(ge[0])
    stranger = any_pacs.pacs_config(calling_aet="STRANGER", move_port=free_port())
    with pytest.raises(PacsError) as err, PacsClient(stranger) as client:
        list(client.move(*uids(ge[0])))
    if any_pacs.name == "embedded":  # it accepts only the calling AE titles it is configured with
        assert "association rejected" in str(err.value)
        return
    prefix = f"PACS {any_pacs.aet}@127.0.0.1:{any_pacs.port}: C-MOVE failed: status "
    # Orthanc answers 0xC000 (Unable to process) where the standard says 0xA801.
    status = "0xC000 (Unable to Process)" if any_pacs.name == "orthanc" else (
        "0xA801 (Move destination unknown)"
    )
    assert str(err.value) == prefix + status


def test_silent_peer_times_out() -> None:
    """A peer that accepts TCP but never answers the association request."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]))
        thread.start()
        config = PacsConfig(aet="SILENT", host="127.0.0.1", port=port, timeout=1.0)
        start = time.monotonic()
        with pytest.raises(PacsError) as err, PacsClient(config) as client:
            client.echo()
        assert time.monotonic() - start < 5
        thread.join()
        for sock in accepted:
            sock.close()
    assert str(err.value) == (
        f"PACS SILENT@127.0.0.1:{port}: association not answered within 1 s"
    )
