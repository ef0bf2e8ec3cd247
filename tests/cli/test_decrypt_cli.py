"""The protection chain end to end: a header full of PHI registered, served bytes, decryption by the
users the rights allow, refusal for the others, and nothing identifying anywhere on the way."""

import re

import pydicom
import pytest

from phi import make_phi_dataset
from sites import mdm, write_site_config
from srm_dicom.catalog import find_entry, open_catalog
from srm_dicom.config import load_config
from srm_dicom.entry_key import key_name
from srm_dicom.errors import NotFound
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.protect import protect_image


@pytest.fixture
def registered(embedded_pacs, key_servers, tmp_path):
    """A PHI-laden slice registered with -vv; returns (config path, source, markers, entry, served bytes, logs)."""
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    ds, markers = make_phi_dataset("ZQXPHI")
    source = tmp_path / "phi.dcm"
    ds.save_as(source, enforce_file_format=True)
    result = mdm("register", "-vv", str(source), config=config_path)
    assert result.returncode == 0, result.stderr
    config = load_config(config_path)
    catalog = open_catalog(config)
    entry = find_entry(catalog, f"{ds.StudyInstanceUID},{ds.SeriesInstanceUID},{ds.SOPInstanceUID}")
    erased = catalog.index.metadata(entry.guid).erased
    catalog.close()
    # What a grid client downloads: the storage element restages it with the key it holds.
    key = KeystoreClient.from_config(config).fetch_key(key_name(entry.guid, 1), lambda k: True)
    served = protect_image(pydicom.dcmread(source), config.site.secret_bytes, config.anonymization, key,
                           entry.guid, 1).payload
    assert (len(served), entry.size) == (entry.size, len(served))
    encrypted = tmp_path / "download.enc"
    encrypted.write_bytes(served)
    return config_path, source, markers, entry, encrypted, result.stdout + result.stderr, erased


def as_user(pki, name):
    return pki / "users" / name / "client.toml"


def test_no_marker_in_logs_nor_in_the_served_bytes_and_all_are_kept_for_all_rights(registered):
    _, _, markers, _, encrypted, logs, erased = registered
    payload = encrypted.read_bytes()
    assert "DEBUG" in logs  # -vv really logged
    for marker in markers:
        assert marker not in logs, marker
        assert marker.encode() not in payload, marker
    kept = " ".join(value for _, _, value in erased)
    assert sum(marker in kept for marker in markers) == len(markers)


def test_a_vo_member_decrypts_and_gets_the_anonymized_image_with_its_pixels(registered, pki, key_servers, tmp_path):
    _, source, markers, entry, encrypted, _, _ = registered
    client = as_user(pki, "bob")
    _point_client_at(client, key_servers)
    out = tmp_path / "bob.dcm"
    result = mdm("decrypt", f"guid:{entry.guid}", str(encrypted), str(out), config=client)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert not [m for m in markers if m.encode() in data]
    clear, original = pydicom.dcmread(out), pydicom.dcmread(source)
    assert clear.PixelData == original.PixelData
    assert clear.SOPInstanceUID == entry.sop_uid and clear.PatientIdentityRemoved == "YES"
    again = mdm("decrypt", f"guid:{entry.guid}", str(encrypted), str(out), config=client)
    assert again.returncode == 2 and "exists (use -f" in again.stderr


def test_another_vo_is_refused_by_the_key_servers_and_nothing_is_written(registered, pki, key_servers, tmp_path):
    _, _, _, entry, encrypted, _, _ = registered
    client = as_user(pki, "eve")
    _point_client_at(client, key_servers)
    out = tmp_path / "eve.dcm"
    result = mdm("decrypt", f"guid:{entry.guid}", str(encrypted), str(out), config=client)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "CN=eve may not read key" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".mdm-decrypt-*"))


def test_a_mixed_up_or_damaged_download_is_caught(registered, pki, key_servers, tmp_path):
    _, _, _, entry, encrypted, _, _ = registered
    client = as_user(pki, "bob")
    _point_client_at(client, key_servers)
    other = mdm("decrypt", "guid:00000000-0000-4000-8000-000000000000", str(encrypted), str(tmp_path / "x"),
                config=client)
    assert other.returncode == 2 and f"belongs to guid:{entry.guid}" in other.stderr
    damaged = tmp_path / "damaged.enc"
    data = bytearray(encrypted.read_bytes())
    data[-20] ^= 1
    damaged.write_bytes(data)
    result = mdm("decrypt", f"guid:{entry.guid}", str(damaged), str(tmp_path / "y"), config=client)
    assert result.returncode == 1 and "chunk" in result.stderr and not (tmp_path / "y").exists()


def test_deleting_the_entry_deletes_its_key_shares(registered, key_servers):
    config_path, _, _, entry, _, _, _ = registered
    assert mdm("del", "-l", entry.lfn, config=config_path).returncode == 0
    with pytest.raises(NotFound):
        KeystoreClient.from_config(load_config(config_path)).fetch_key(key_name(entry.guid, 1), lambda k: True)


def _point_client_at(client_toml, key_servers):
    """The PKI's client configs name the default key server ports; point them at this session's."""
    text = client_toml.read_text()
    urls = ", ".join(f'"{u}"' for u in key_servers.urls)
    client_toml.write_text(re.sub(r"urls = \[[^\]]*\]", f"urls = [{urls}]", text))
