"""set-right as one change over the catalog, every key server and the metadata mode: all or
nothing, with real key servers, one of them stopped before or in the middle of the change."""

from __future__ import annotations

import io
import itertools
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from sites import write_site_config
from srm_dicom.access import file_perms, metadata_level
from srm_dicom.catalog import AclEntry, Entry, open_catalog
from srm_dicom.cli import main
from srm_dicom.config import load_config
from srm_dicom.entry_key import key_name
from srm_dicom.errors import NotFound
from srm_dicom.identity import Identity
from srm_dicom.keystore import KeyAccessDenied, KeystoreError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.keystore.local import LocalKeyServers
from srm_dicom.keystore.server import ShareStore
from srm_dicom.rights import METADATA_LEVELS, METADATA_MODES, parse_mode
from srm_dicom.setright import Rights, RightsAtIntersection, RightsChange, RightsNotChanged, RightsSetter, select
from srm_dicom.synthetic import make_series
from srm_dicom.uids import deidentify_uid
from storage import register

DN = "/C=XX/O=srm-dicom/CN={}"
EVE, DAVE, BOB = DN.format("eve"), DN.format("dave"), DN.format("bob")


@dataclass
class Site:
    config_path: Path
    servers: list[LocalKeyServers]  # one server each, so that one can be stopped
    stores: list[ShareStore]  # each server's own database, read directly
    series: list
    pki: Path
    urls: list[str]  # kept: a stopped server forgets its port

    def catalog(self):  # type: ignore[no-untyped-def]
        return open_catalog(load_config(self.config_path))

    def entries(self) -> list[Entry]:
        catalog = self.catalog()
        try:
            return select(catalog, "demo", self.series_lfn).entries
        finally:
            catalog.close()

    @property
    def series_lfn(self) -> str:
        secret = load_config(self.config_path).site.secret_bytes
        ds = self.series[0]
        return "/grid/demo/mdm/" + "/".join(deidentify_uid(secret, u)
                                            for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID))

    def keystore(self, user: str) -> KeystoreClient:
        folder = self.pki / ("service" if user == "service" else f"users/{user}")
        return KeystoreClient(self.urls, 2, ca=self.pki / "ca.pem",
                              cert=folder / "cert.pem", key=folder / "key.pem", timeout=5)


@pytest.fixture
def site(pki, embedded_pacs, tmp_path):  # type: ignore[no-untyped-def]
    servers = [LocalKeyServers(pki, tmp_path / f"keystore-{i}", n=1) for i in range(3)]
    for server in servers:
        server.start()
    key_servers = SimpleNamespace(urls=[s.urls[0] for s in servers], pki=pki)
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)  # type: ignore[arg-type]
    series = make_series(slices=3, size=16, seed=f"set-right {tmp_path.name}")
    register(config_path, series)
    stores = [ShareStore(tmp_path / f"keystore-{i}" / "keystore-1.db") for i in range(3)]
    try:
        yield Site(config_path, servers, stores, series, pki, key_servers.urls)
    finally:
        for server in servers:
            server.stop()


def setter(site: Site) -> tuple[RightsSetter, object]:
    config = load_config(site.config_path)
    catalog = open_catalog(config)
    return RightsSetter.from_config(config, catalog), catalog


def slices(entries: list[Entry]) -> list[Entry]:
    return [e for e in entries if e.kind == "slice"]


def key_acls(site: Site, entry: Entry) -> list:
    return [store.get(key_name(entry.guid, entry.content_version))[2] for store in site.stores]


def test_success_changes_catalog_key_acls_and_metadata_mode_together(site):
    before = site.entries()
    assert {(e.mode, e.metadata_mode, e.acl) for e in before} == {(0o750, "group", ())}
    with pytest.raises(KeyAccessDenied):
        site.keystore("eve").fetch_key(key_name(before[0].guid, 1), lambda key: True)
    rights_setter, catalog = setter(site)
    try:
        change = RightsChange(parse_mode("rwx------"), "private", (AclEntry(EVE, 5, "anonymous"),))
        after = rights_setter.apply(before, change)
    finally:
        catalog.close()
    expected = Rights(0o700, "private", (AclEntry(EVE, 5, "anonymous"),))
    assert len(after) == 5  # three slices, the series' 3D and its 3D.json sidecar
    assert all(Rights.of(e) == expected for e in site.entries())
    for entry in slices(after):
        assert all(acl == expected.key_acl(entry) for acl in key_acls(site, entry))
        key_id = key_name(entry.guid, entry.content_version)
        assert len(site.keystore("eve").fetch_key(key_id, lambda key: True)) == 32
        with pytest.raises(KeyAccessDenied):
            site.keystore("dave").fetch_key(key_id, lambda key: True)


def test_a_key_server_down_leaves_the_old_rights_everywhere(site):
    before = site.entries()
    old_acls = {e.guid: key_acls(site, e) for e in slices(before)}
    site.servers[2].stop()
    rights_setter, catalog = setter(site)
    try:
        with pytest.raises(RightsNotChanged) as failed:
            rights_setter.apply(before, RightsChange(parse_mode("rwxr-xr-x"), "public", (AclEntry(EVE, 7, "all"),)))
    finally:
        catalog.close()
    message = str(failed.value)
    assert "the old rights still hold everywhere" in message and "unreachable" in message
    assert [(e.mode, e.metadata_mode, e.acl) for e in site.entries()] == [(e.mode, e.metadata_mode, e.acl)
                                                                           for e in before]
    for entry in slices(before):
        assert key_acls(site, entry) == old_acls[entry.guid]  # two restored, one never changed
        key_id = key_name(entry.guid, entry.content_version)
        assert len(site.keystore("dave").fetch_key(key_id, lambda key: True)) == 32  # old rights: the VO reads
        with pytest.raises(KeystoreError, match="answered 403: .*CN=eve may not read"):
            site.keystore("eve").fetch_key(key_id, lambda key: True)


class StopsAServerAfterTheNewAcl(RightsSetter):
    """The real fault, at the worst moment: key server 2 took the new ACL, then went away
    before the old one could be put back."""

    def __init__(self, *args, server: LocalKeyServers, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.server = server
        self.writes = 0

    def _write(self, writes):  # type: ignore[no-untyped-def]
        done = super()._write(writes)
        self.writes += 1
        if self.writes == 1:
            self.server.stop()
        return done


def test_restoring_failing_leaves_the_intersection_of_old_and_new(site):
    before = site.entries()
    config = load_config(site.config_path)
    catalog = open_catalog(config)
    servers = RightsSetter.from_config(config, catalog)._servers  # noqa: SLF001 - the same clients, one fault added
    faulty = StopsAServerAfterTheNewAcl(catalog, servers, restore_attempts=2, restore_delay=0.05,
                                        server=site.servers[1])
    # A key server down from the start makes the first write fail, so a restore is needed.
    site.servers[2].stop()
    change = RightsChange(parse_mode("rwx---r-x"), "anonymous", (AclEntry(BOB, 5, "all"),))
    try:
        with pytest.raises(RightsAtIntersection) as failed:
            faulty.apply(before, change)
    finally:
        catalog.close()
    assert "run the same set-right again" in str(failed.value)
    # Old rwxr-x--- group, new rwx---r-x anonymous + bob r-x all: what both allow.
    meet = Rights(0o700, "private", (AclEntry(BOB, 0, "none"),))
    assert all(Rights.of(e) == meet for e in site.entries())
    for entry in slices(before):
        on_servers = key_acls(site, entry)
        assert on_servers[0] == meet.key_acl(entry)  # the one server still up
        assert on_servers[1] == change.apply(Rights.of(entry)).key_acl(entry)  # stuck with the new ACL
        assert on_servers[2] == Rights.of(entry).key_acl(entry)  # down from the start: the old ACL


def test_the_catalog_commit_is_one_transaction(site):
    entries = site.entries()
    catalog = site.catalog()
    try:
        with pytest.raises(NotFound):
            catalog.namespace.set_rights([entries[0].guid, "00000000-0000-4000-8000-000000000000"], 0o700, "private",
                               [AclEntry(EVE, 4, "all")])
        assert Rights.of(catalog.namespace.lookup_guid(entries[0].guid)) == Rights(0o750, "group")
    finally:
        catalog.close()


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def test_cli_on_the_hospital_side_with_every_form_of_the_seeds(site, tmp_path):
    config = str(site.config_path)
    ds = site.series[0]
    original = f"/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}"
    code, out = run_cli("--config", config, "set-right", "rwxr-----", "group", "--sop", original, "-v")
    assert code == 0 and out.count("rwxr----- group") == 1
    one = out.split()[0]
    assert one.startswith("/grid/demo/mdm/2.25.") and ds.SOPInstanceUID not in out  # names, never the PACS's UIDs
    local = tmp_path / "copy.dcm"
    site.series[1].save_as(local, enforce_file_format=True)
    assert run_cli("--config", config, "set-right", "-f", str(local), "-u", DAVE, "---", "none")[0] == 0
    code, out = run_cli("--config", config, "set-right", "-l", site.series_lfn, "anonymous", "-v")
    assert code == 0 and len(out.splitlines()) == 5  # three slices, 3D and 3D.json
    by_lfn = {e.lfn: e for e in site.entries()}
    assert by_lfn[one].mode == 0o740 and by_lfn[one].metadata_mode == "anonymous"
    dave_denied = [e for e in by_lfn.values() if e.acl == (AclEntry(DAVE, 0, "none"),)]
    assert len(dave_denied) == 1 and dave_denied[0].mode == 0o750
    code, out = run_cli("--config", config, "set-right", "-s", ds.StudyInstanceUID, "rwxr-xr-x", "public", "-v")
    assert code == 0 and out.count("rwxr-xr-x public") == 5
    assert run_cli("--config", config, "set-right", "-s", "1.2.3,4.5.6", "private") == (3, "")
    assert run_cli("--config", config, "set-right", "-l", site.series_lfn, "-u", DAVE, "rwz", "all")[0] == 2


# -- the intersection never grants more than either side ----------------------------------

OWNER = DN.format("registration service")
CALLERS = [
    Identity(OWNER, "x509", "demo"),
    Identity(BOB, "x509", "demo", frozenset({"physician"})),
    Identity(DN.format("carol"), "x509", "demo", frozenset({"mia"})),
    Identity(DAVE, "x509", "demo"),
    Identity(EVE, "x509", "other"),
]
SAMPLE_ACLS = [(), (AclEntry(BOB, 0, "none"),), (AclEntry(EVE, 5, "anonymous"), AclEntry(DAVE, 7, "all"))]


def _entry(rights: Rights) -> Entry:
    return Entry("/grid/demo/mdm/1/2/3", "g", "p", "slice", "1", "2", "3", OWNER, "demo", rights.mode,
                 rights.metadata_mode, acl=rights.acl)


def test_meet_grants_no_caller_more_than_the_old_or_the_new_rights():
    samples = [Rights(mode, meta, acl) for mode, meta, acl in
               itertools.product((0o750, 0o700, 0o755, 0o705, 0o777), METADATA_MODES, SAMPLE_ACLS)]
    for old, new in itertools.product(samples, repeat=2):
        meet = _entry(old.meet(new, OWNER))
        for caller in CALLERS:
            granted = file_perms(caller, meet)
            assert granted & ~file_perms(caller, _entry(old)) == 0 and granted & ~file_perms(caller, _entry(new)) == 0
            rank = METADATA_LEVELS.index(metadata_level(caller, meet))
            assert rank <= METADATA_LEVELS.index(metadata_level(caller, _entry(old)))
            assert rank <= METADATA_LEVELS.index(metadata_level(caller, _entry(new)))
