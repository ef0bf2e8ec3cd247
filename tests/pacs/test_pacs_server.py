"""The embedded PACS: what Orthanc users expect of a small Q/R SCP, and `mdm pacs`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from test_pacs_client import query, series, uids

from peers import Peer, free_port
from srm_dicom.config import EmbeddedPacsConfig
from srm_dicom.pacs.client import PacsClient
from srm_dicom.pacs.server import INDEX_FILE, EmbeddedPacs


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

