"""The series volume over HTTP and the CLI: multi-frame objects registered, served, refused."""

from __future__ import annotations

import json
from pathlib import Path

from test_frames import _drop_position, legacy_converted, synthetic_object

from https import request
from sites import mdm, write_site_config
from srm_dicom.crypto.container import decrypt_bytes, encrypted_size
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import UidTriple
from srm_dicom.protect import key_name
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from srm_dicom.volume import assemble
from storage import register, start_storage_element


def client_config(path: Path, url: str, key_servers, pki: Path, user: str = "bob") -> Path:  # type: ignore[no-untyped-def]
    """A grid user's client config for ``mdm get``."""
    home = pki / "users" / user
    path.write_text(
        f'[site]\nvo = "demo"\n[storage]\nurl = "{url}"\n'
        f"[keystore]\nurls = {json.dumps(key_servers.urls)}\n"
        f'ca = "{pki / "ca.pem"}"\ncert = "{home / "cert.pem"}"\nkey = "{home / "key.pem"}"\n'
    )
    return path


def test_a_multiframe_object_registers_and_its_volume_is_served(embedded_pacs, key_servers, pki, tmp_path):  # type: ignore[no-untyped-def]
    """One object is a series: cataloged as an image with its 3D entry, whose size is true
    before the first assembly; a broken object's 3D answers 422 with its reason, on the CLI too."""
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    good = synthetic_object(slices=5)
    broken = _drop_position(legacy_converted(make_series(slices=4, size=16, seed="frames broken"), "CT"))
    register(config_path, [good, broken])
    running = start_storage_element(config_path)
    try:
        secret = running.config.site.secret_bytes
        directory = UidTriple(deidentify_uid(secret, good.StudyInstanceUID),
                              deidentify_uid(secret, good.SeriesInstanceUID), "3D").lfn("demo").rpartition("/")[0]
        listing = running.catalog.namespace.list_dir(directory)
        assert sorted(e.kind for e in listing.entries) == ["slice", "volume"]
        volume = next(e for e in listing.entries if e.kind == "volume")
        assert volume.size == encrypted_size(len(assemble([good], "nifti")))
        answer = request(running.url, pki, "bob", path=volume.lfn)
        assert answer.status == 200 and len(answer.body) == volume.size
        served = running.catalog.namespace.lookup(volume.lfn)
        assert served is not None
        key = KeystoreClient.from_config(running.config).fetch_key(
            key_name(served.guid, served.content_version), lambda k: len(k) == 32
        )
        assert bytes(decrypt_bytes(key, answer.body)) == assemble([good], "nifti")

        broken_lfn = UidTriple(deidentify_uid(secret, broken.StudyInstanceUID),
                               deidentify_uid(secret, broken.SeriesInstanceUID), "3D").lfn("demo")
        refused = request(running.url, pki, "bob", path=broken_lfn)
        reason = "not a volume: frame 3 of a multi-frame image has no image position (Plane Position Sequence)"
        assert refused.status == 422 and refused.json()["detail"] == reason
        client = client_config(tmp_path / "bob.toml", running.url, key_servers, pki)
        cli = mdm("get", "-l", broken_lfn, str(tmp_path / "out.nii"), config=client)
        assert cli.returncode != 0 and reason in cli.stderr and "Traceback" not in cli.stderr
        assert not (tmp_path / "out.nii").exists()
    finally:
        running.stop()
