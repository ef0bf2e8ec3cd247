"""The series volume over HTTP and the CLI: multi-frame objects registered, served, refused."""

from __future__ import annotations

import json
from pathlib import Path

from test_frames import _drop_position, legacy_converted, synthetic_object
from test_sidecar import dti_series

from https import request
from sites import mdm, write_site_config
from srm_dicom.crypto.container import decrypt_bytes, encrypted_size
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import UidTriple
from srm_dicom.protect import key_name
from srm_dicom.sidecar import series_file
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
        assert sorted((e.kind, e.sop_uid) for e in listing.entries if e.kind == "volume") == [
            ("volume", "3D"), ("volume", "3D.json")
        ]
        assert [e.kind for e in listing.entries].count("slice") == 1  # one image, its frames inside
        volume = next(e for e in listing.entries if e.sop_uid == "3D")
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


def test_sidecars_are_entries_staged_byte_identically_and_mdm_get_writes_them(  # type: ignore[no-untyped-def]
    embedded_pacs, key_servers, pki, tmp_path
):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    series = dti_series()
    plain = make_series(slices=3, size=16, seed="sidecar plain series")
    register(config_path, series + plain)
    running = start_storage_element(config_path)
    try:
        secret = running.config.site.secret_bytes
        volume_lfn = UidTriple(deidentify_uid(secret, series[0].StudyInstanceUID),
                               deidentify_uid(secret, series[0].SeriesInstanceUID), "3D").lfn("demo")
        directory = volume_lfn.rpartition("/")[0]
        names = {e.sop_uid: e for e in running.catalog.namespace.list_dir(directory).entries if e.kind == "volume"}
        assert sorted(names) == ["3D", "3D.bval", "3D.bvec", "3D.json"]
        volume = names["3D"]
        assert {(e.owner, e.mode) for e in names.values()} == {(volume.owner, volume.mode)}  # the series' rights
        announced = {name: e.size for name, e in names.items()}  # before any assembly: listings are true
        assert None not in announced.values()
        plain_dir = UidTriple(deidentify_uid(secret, plain[0].StudyInstanceUID),
                              deidentify_uid(secret, plain[0].SeriesInstanceUID), "3D").lfn("demo").rpartition("/")[0]
        assert sorted(e.sop_uid for e in running.catalog.namespace.list_dir(plain_dir).entries
                      if e.kind == "volume") == ["3D", "3D.json"]

        client = client_config(tmp_path / "bob.toml", running.url, key_servers, pki)
        got = mdm("get", "-l", volume_lfn, str(tmp_path / "out.nii"), config=client)
        assert got.returncode == 0, got.stderr
        for suffix in ("", ".json", ".bval", ".bvec"):
            written = (tmp_path / f"out{suffix or '.nii'}").read_bytes()
            assert written == series_file(f"3D{suffix}", series, "nifti"), suffix
            entry = running.catalog.namespace.lookup(f"{volume_lfn}{suffix}")
            assert entry is not None and entry.adler32 is not None and entry.size == announced[f"3D{suffix}"]
        first = {suffix: request(running.url, pki, "bob", path=f"{volume_lfn}{suffix}").body
                 for suffix in (".json", ".bval")}
        only = mdm("get", "--no-sidecars", "-s", ",".join(volume_lfn.split("/")[-3:]), str(tmp_path / "only.nii"),
                   config=client)
        assert only.returncode == 0, only.stderr
        assert sorted(p.name for p in tmp_path.glob("only*")) == ["only.nii"]
    finally:
        running.stop()
    cache = running.config.path(running.config.cache.dir)
    for cached in cache.iterdir():
        if cached.is_file():
            cached.unlink()
    again = start_storage_element(config_path)
    try:
        for suffix, body in first.items():  # restaged from the PACS with the key of the key servers
            assert request(again.url, pki, "bob", path=f"{volume_lfn}{suffix}").body == body
    finally:
        again.stop()

