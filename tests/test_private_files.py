"""Secrets stay secret: created 0600 in 0700 directories whatever the umask, and the servers
refuse to start on a secret others may read, naming the file and the fix."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mdm_catalog_sqlite import SQLiteCatalog
from sites import write_site_config
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.demo import write_config
from srm_dicom.keystore.local import LocalKeyServers
from srm_dicom.keystore.server import ShareStore
from srm_dicom.pki import init_pki


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    previous = os.umask(0o000)
    yield
    os.umask(previous)


def test_secrets_are_created_0600_in_0700_directories_whatever_the_umask(tmp_path, open_umask):
    pki = tmp_path / "pki"
    init_pki(pki)
    keys = sorted(pki.rglob("key.pem"))
    assert keys and {mode(k) for k in keys} == {0o600}
    assert mode(pki / "ca") == 0o700
    shares = ShareStore(tmp_path / "state" / "keystore-1.db")
    assert mode(shares.path) == 0o600 and mode(tmp_path / "state") == 0o700
    servers = LocalKeyServers(pki, tmp_path / "keys")
    assert mode(tmp_path / "keys") == 0o700
    del servers
    catalog_path = tmp_path / "site" / "db" / "catalog.db"
    catalog = SQLiteCatalog(catalog_path)
    assert mode(catalog_path) == 0o600 and mode(catalog_path.parent) == 0o700
    assert {mode(p) for p in catalog_path.parent.iterdir()} == {0o600}  # -wal and -shm too
    catalog.close()


def test_demo_config_with_the_site_secret_is_0600(tmp_path, open_umask):
    for user in ("alice", "bob", "carol", "dave", "eve"):
        (tmp_path / "users" / user).mkdir(parents=True)
    path = write_config(tmp_path, ["https://127.0.0.1:1"])
    assert mode(path) == 0o600


def _mdm(*args: str) -> subprocess.CompletedProcess:
    mdm = Path(sys.executable).parent / "mdm"
    return subprocess.run([str(mdm), *args], capture_output=True, text=True, timeout=60)


def test_serve_and_listen_refuse_a_readable_secret_naming_file_and_fix(embedded_pacs, tmp_path, key_servers):
    config_path = write_site_config(tmp_path / "site", embedded_pacs, key_servers)
    open_catalog(load_config(config_path)).close()
    catalog = tmp_path / "site" / "catalog.db"
    for readable in (config_path, catalog):
        readable.chmod(0o644)
        for command in ("serve", "listen"):
            result = _mdm("--config", str(config_path), command)
            assert result.returncode == 2, result.stderr
            assert f"{readable} is readable by group or others (mode 0644): run 'chmod 600 {readable}'" in result.stderr
            assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        readable.chmod(0o600)


def test_keystore_serve_refuses_a_readable_share_database(pki, tmp_path):
    database = tmp_path / "keystore-1.db"
    ShareStore(database)
    database.chmod(0o640)
    config = tmp_path / "keystore-1.toml"
    config.write_text(
        f'cert = "{pki / "hosts" / "keystore-1" / "cert.pem"}"\nkey = "{pki / "hosts" / "keystore-1" / "key.pem"}"\n'
        f'ca = "{pki / "ca.pem"}"\ndatabase = "{database}"\nvomap = "{pki / "vomap.toml"}"\n'
        'services = ["/C=XX/O=srm-dicom/CN=storage element"]\nport = 0\n'
    )
    result = _mdm("keystore", "serve", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"the key share database {database} is readable by group or others (mode 0640)" in result.stderr
    assert f"run 'chmod 600 {database}'" in result.stderr
