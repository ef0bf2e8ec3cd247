"""The embedded PACS: what Orthanc users expect of a small Q/R SCP, and `mdm pacs`."""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from test_pacs_client import query, series, uids

from peers import Peer, free_port
from srm_dicom.config import EmbeddedPacsConfig
from srm_dicom.errors import ConfigError
from srm_dicom.pacs.client import PacsClient
from srm_dicom.pacs.server import INDEX_FILE, EmbeddedPacs
from srm_dicom.synthetic import make_series


def test_storing_again_replaces(embedded_pacs: Peer) -> None:
    sent = series("ge/anatomical", 1)[0]
    with PacsClient(embedded_pacs.pacs_config()) as client:
        client.store(sent)
        sent.SeriesDescription = "replaced"
        client.store(sent)
        found = client.find("IMAGE", query(SOPInstanceUID=str(sent.SOPInstanceUID),
                                           SeriesDescription=""))
    assert [str(f.SeriesDescription) for f in found] == ["replaced"]
    assert len(list(embedded_pacs.storage.rglob("*.dcm"))) == 1


def test_matching_wildcards_lists_and_date_ranges(embedded_pacs: Peer) -> None:
    ge, philips = series("ge/anatomical", 2), series("philips/anatomical", 1)
    with PacsClient(embedded_pacs.pacs_config()) as client:
        client.store_many(ge + philips)
        sops = [str(ds.SOPInstanceUID) for ds in ge]

        def count(level: str, **keys: str) -> int:
            return len(client.find(level, query(**keys)))

        assert count("STUDY", StudyInstanceUID="", StudyDate="20160101-20161231") == 2
        assert count("STUDY", StudyInstanceUID="", StudyDate="20170101-") == 0
        assert count("PATIENT", PatientID="", PatientName="dicom*") == 1
        assert count("PATIENT", PatientID="", PatientName="nobody*") == 0
        assert count("IMAGE", SOPInstanceUID="\\".join(sops)) == 2
        assert count("SERIES", SeriesInstanceUID="", Modality="MR") == 2


def test_index_survives_restart(tmp_path: Path) -> None:
    settings = EmbeddedPacsConfig(port=free_port(), storage=str(tmp_path))
    sent = series("philips/anatomical", 1)[0]
    config = Peer("embedded", settings.aet, settings.host, settings.port, "MDM", 0,
                  tmp_path, lambda: None).pacs_config()
    with EmbeddedPacs(settings, tmp_path), PacsClient(config) as client:
        client.store(sent)
    assert (tmp_path / INDEX_FILE).is_file()
    with EmbeddedPacs(settings, tmp_path), PacsClient(config) as client:
        (got,) = client.get(*uids(sent))
    assert got.PixelData == sent.PixelData


def _write_config(tmp_path: Path, pacs_port: int, aet: str = "MDM_PACS") -> Path:
    path = tmp_path / "mdm.toml"
    path.write_text(
        f"""[site]
secret = "a test secret of enough length"

[pacs]
aet = "{aet}"
port = {pacs_port}
timeout = 5

[embedded_pacs]
port = {pacs_port}
storage = "pacs-store"
"""
    )
    return path


MDM = [sys.executable, "-c", "import sys; from srm_dicom.cli import main; sys.exit(main())"]


def _mdm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MDM, *args],
        capture_output=True, text=True, timeout=60,
    )


def test_cli_serve_and_echo(tmp_path: Path) -> None:
    port = free_port()
    config = _write_config(tmp_path, port)
    server = subprocess.Popen(
        [*MDM, "--config", str(config), "pacs", "serve"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().strip()
        assert line == (
            f"embedded PACS MDM_PACS@127.0.0.1:{port}, storage {tmp_path / 'pacs-store'}"
        )
        ok = _mdm("--config", str(config), "pacs", "echo")
        assert (ok.returncode, ok.stdout) == (0, f"PACS MDM_PACS@127.0.0.1:{port}: ok\n")
        wrong = _mdm("--config", str(_write_config(tmp_path, port, "OTHER")), "pacs", "echo")
        assert wrong.returncode == 4
        assert wrong.stderr.startswith(f"mdm pacs: PACS OTHER@127.0.0.1:{port}: association rejected")
        assert wrong.stderr.count("\n") == 1
    finally:
        server.terminate()
        out, err = server.communicate(timeout=10)
    assert server.returncode == 0, err
    assert (tmp_path / "pacs-store" / INDEX_FILE).is_file()


def test_cli_echo_pacs_down(tmp_path: Path) -> None:
    port = free_port()
    result = _mdm("--config", str(_write_config(tmp_path, port)), "pacs", "echo")
    assert result.returncode == 4
    assert result.stderr == (
        f"mdm pacs: PACS MDM_PACS@127.0.0.1:{port}: cannot connect (PACS down or unreachable?)\n"
    )


def test_cli_help_describes_commands() -> None:
    result = _mdm("pacs", "serve", "--help")
    assert result.returncode == 0 and "[embedded_pacs]" in result.stdout



def hostile_store(peer: Peer, ds: Dataset, calling_aet: str | None = None) -> int | None:
    """One C-STORE from a pynetdicom SCU that sends whatever it is given; the status, or
    None when the association was rejected."""
    ae = AE(ae_title=calling_aet or peer.client_aet)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.aet)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("uid", ["../../../escaped", "ABSOLUTE", "1.2/../../3", "..", "1.2\0.3"])
def test_received_uids_never_lead_outside_the_storage(embedded_pacs: Peer, field: str, uid: str) -> None:
    """Issue 12, finding 2: file paths were built from received UIDs without checking them.
    The absolute path is one of this test's own, so that no other run's leftovers decide it."""
    root = embedded_pacs.storage.parent
    absolute = Path(f"/tmp/escaped-{secrets.token_hex(4)}")  # at most 64 characters, as a UID
    uid = str(absolute) if uid == "ABSOLUTE" else uid
    before = {p for p in root.rglob("*")}
    ds = make_series(slices=1, size=8, seed=f"escape {field} {uid}")[0]
    setattr(ds, field, uid)
    assert hostile_store(embedded_pacs, ds) == 0xC000
    assert {p for p in root.rglob("*")} - before <= {embedded_pacs.storage / INDEX_FILE}  # journal writes only
    assert not absolute.with_suffix(".dcm").exists() and not absolute.exists()
    good = make_series(slices=1, size=8, seed=f"fine {field} {uid}")[0]
    assert hostile_store(embedded_pacs, good) == 0x0000  # the PACS goes on


def test_only_the_configured_calling_ae_titles_may_associate(embedded_pacs: Peer) -> None:
    """Issue 12, finding 2: the embedded PACS accepted any calling AE."""
    ds = make_series(slices=1, size=8, seed="who calls")[0]
    assert hostile_store(embedded_pacs, ds, calling_aet="INTRUDER") is None
    with PacsClient(embedded_pacs.pacs_config()) as client:
        assert client.find_instances(ds.StudyInstanceUID, ds.SeriesInstanceUID) == []
    assert hostile_store(embedded_pacs, ds) == 0x0000


def test_calling_aets_must_be_ae_titles(tmp_path: Path) -> None:
    for bad in ([], [""], ["A" * 17]):
        with pytest.raises(ConfigError, match="calling_aets"):
            EmbeddedPacs(EmbeddedPacsConfig(storage=str(tmp_path), calling_aets=bad), tmp_path)


def listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP port is listening on, from /proc/net/tcp (IPv4)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_the_c_move_receiver_listens_on_loopback_and_takes_only_the_pacs_and_the_series(embedded_pacs: Peer) -> None:
    """Issue 12, finding 2: the C-MOVE receiver listened on 0.0.0.0 and accepted any peer."""
    sent = make_series(slices=3, size=8, seed="moved")
    other = make_series(slices=1, size=8, seed="smuggled")[0]
    config = embedded_pacs.pacs_config(retrieve="move")
    with PacsClient(config) as client:
        client.store_many(sent)
        moving = client.move(str(sent[0].StudyInstanceUID), str(sent[0].SeriesInstanceUID))
        first = next(moving)  # the receiver is up until the move ends
        assert listening_addresses(config.move_port) == {"127.0.0.1"}
        receiver = Peer("receiver", config.calling_aet, "127.0.0.1", config.move_port, "INTRUDER", 0,
                        embedded_pacs.storage, lambda: None)
        assert hostile_store(receiver, other, calling_aet="INTRUDER") is None  # not the PACS's AE title
        # The PACS's AE title from the PACS's host, but an image of another series: refused.
        assert hostile_store(receiver, other, calling_aet=embedded_pacs.aet) == 0xC000
        rest = list(moving)
    assert sorted(str(d.SOPInstanceUID) for d in [first, *rest]) == sorted(str(d.SOPInstanceUID) for d in sent)
