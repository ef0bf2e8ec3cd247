"""The series volume over HTTP and the CLI: multi-frame objects registered, served, refused."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

from test_frames import _drop_position, legacy_converted, synthetic_object
from test_sidecar import dti_series

import clients
from clients import Credential
from https import request
from sites import mdm, write_site_config
from srm_dicom.crypto.container import decrypt_bytes, encrypted_size
from srm_dicom.entry_key import key_name
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import UidTriple
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


def empty_cache(running) -> None:  # type: ignore[no-untyped-def]
    """Remove every cached file, so that the next storage element restages from the PACS."""
    cache = running.config.path(running.config.cache.dir)
    for cached in cache.iterdir():
        if cached.is_file():
            cached.unlink()


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
    empty_cache(running)
    again = start_storage_element(config_path)
    try:
        for suffix, body in first.items():  # restaged from the PACS with the key of the key servers
            assert request(again.url, pki, "bob", path=f"{volume_lfn}{suffix}").body == body
    finally:
        again.stop()



def test_mdm_get_by_guid_of_a_volume_writes_its_sidecars(embedded_pacs, key_servers, pki, tmp_path):  # type: ignore[no-untyped-def]
    """The volume's answer links its sidecars by GUID (Link, rel="describedby"), so ``mdm get
    -g`` writes them as ``-l`` does, without learning the LFN."""
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    series = dti_series()
    register(config_path, series)
    running = start_storage_element(config_path)
    try:
        volume = _series_entries(running, series[0])["3D"]
        head = request(running.url, pki, "bob", method="HEAD", path=f"/guid/{volume.guid}")
        assert head.status == 200 and head.headers["link"].count('rel="describedby"') == 3
        client = client_config(tmp_path / "bob.toml", running.url, key_servers, pki)
        got = mdm("get", "-g", f"guid:{volume.guid}", str(tmp_path / "byguid.nii"), config=client)
        assert got.returncode == 0, got.stderr
        for suffix in ("", ".json", ".bval", ".bvec"):
            written = (tmp_path / f"byguid{suffix or '.nii'}").read_bytes()
            assert written == series_file(f"3D{suffix}", series, "nifti"), suffix
        only = mdm("get", "--no-sidecars", f"guid:{volume.guid}", str(tmp_path / "bare.nii"), config=client)
        assert only.returncode == 0, only.stderr
        assert sorted(p.name for p in tmp_path.glob("bare*")) == ["bare.nii"]
    finally:
        running.stop()


def _series_entries(running, ds):  # type: ignore[no-untyped-def]
    """The series files (3D and its companions) of ``ds``'s series, by name."""
    secret = running.config.site.secret_bytes
    directory = UidTriple(deidentify_uid(secret, ds.StudyInstanceUID),
                          deidentify_uid(secret, ds.SeriesInstanceUID), "3D").lfn("demo").rpartition("/")[0]
    return {e.sop_uid: e for e in running.catalog.namespace.list_dir(directory).entries if e.kind == "volume"}


def _wait_for_size(running, lfn: str, seconds: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        entry = running.catalog.namespace.lookup(lfn)
        if entry is not None and entry.size is not None and entry.adler32 is not None:
            return entry
        time.sleep(0.1)
    raise AssertionError(f"{lfn} was not assembled within {seconds} s")


def test_gzip_volume_is_sized_when_the_volume_is_first_assembled_and_served_to_curl_and_rclone(  # type: ignore[no-untyped-def]
    embedded_pacs, key_servers, pki, tmp_path
):
    """[volume] gzip = true: 3D.nii.gz beside 3D, its size unknown until the volume's first
    assembly compresses it too (deterministic gzip); then listed with its size (rclone), served
    whole and by Range (bytes of its container, as any file: README "Volumes"), restaged
    byte-identically, and decrypting to the gzip of the very 3D file."""
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    with config_path.open("a") as config:
        config.write("\n[volume]\ngzip = true\n")
    series = make_series(slices=4, size=16, seed="gzip volume")
    register(config_path, series)
    running = start_storage_element(config_path)
    cred = Credential.of_user(pki, "bob")
    try:
        entries = _series_entries(running, series[0])
        assert sorted(entries) == ["3D", "3D.json", "3D.nii.gz"]
        assert entries["3D.nii.gz"].size is None and entries["3D"].size is not None
        assert request(running.url, pki, "bob", path=entries["3D"].lfn).status == 200  # the volume's first assembly
        compressed = _wait_for_size(running, entries["3D.nii.gz"].lfn)
        expected = gzip.compress(assemble(series, "nifti"), compresslevel=6, mtime=0)
        assert compressed.size == encrypted_size(len(expected))

        directory = compressed.lfn.rpartition("/")[0]
        listing = clients.rclone("lsl", f"mdm:{directory}", url=running.url, cred=cred)
        assert listing.returncode == 0, listing.stderr
        sizes = {line.split()[-1]: int(line.split()[0]) for line in listing.stdout.splitlines()}
        assert sizes["3D.nii.gz"] == compressed.size
        copied = clients.rclone("copy", f"mdm:{compressed.lfn}", str(tmp_path / "rclone"), url=running.url, cred=cred)
        assert copied.returncode == 0, copied.stderr
        body = (tmp_path / "rclone" / "3D.nii.gz").read_bytes()
        key = KeystoreClient.from_config(running.config).fetch_key(
            key_name(compressed.guid, compressed.content_version), lambda k: len(k) == 32)
        plain = bytes(decrypt_bytes(key, body))
        assert plain == expected and gzip.decompress(plain) == assemble(series, "nifti")

        ranged = clients.curl(running.url + compressed.lfn, cred, "-r", "100-199", "-o", str(tmp_path / "part"),
                              "-w", "%{http_code}")
        assert ranged.returncode == 0 and ranged.stdout == "206", ranged.stderr
        assert (tmp_path / "part").read_bytes() == body[100:200]

        client = client_config(tmp_path / "bob.toml", running.url, key_servers, pki)
        got = mdm("get", "-l", compressed.lfn, str(tmp_path / "out.nii.gz"), config=client)
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "out.nii.gz").read_bytes() == expected
        assert (tmp_path / "out.json").read_bytes() == series_file("3D.json", series, "nifti")
    finally:
        running.stop()
    empty_cache(running)
    again = start_storage_element(config_path)
    try:  # restaged on its own from the PACS, with the key of the key servers
        assert request(again.url, pki, "bob", path=compressed.lfn).body == body
    finally:
        again.stop()
