"""A site config for tests, pointing at a real PACS peer, and a way to run the real ``mdm``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from peers import Peer
from srm_dicom.keystore.local import LocalKeyServers

DATA = Path(os.environ.get("SRM_DICOM_DATA", "/work/shared/data"))
VENDOR = DATA / "dicom2nifti"


def write_site_config(workdir: Path, peer: Peer, key_servers: LocalKeyServers, uids: str = "deidentified",
                      store_to_pacs: bool = True, listen_port: int = 0, wait_timeout: float = 20.0,
                      quota_bytes: int = 1 << 30, retrieve: str = "get", workers: int = 2,
                      engine: str = "pynetdicom", lease: float = 20.0, readahead: str = "none") -> Path:
    """DIR/mdm.toml for a site whose PACS is ``peer`` and whose key servers are ``key_servers``
    (the demo PKI's service identity); the catalog lives in DIR. A GET stages its file alone
    (``readahead``), so that a test counts what it asked for; tests/test_stager.py and the
    benchmarks read ahead, as the default config does."""
    workdir.mkdir(parents=True, exist_ok=True)
    pacs = peer.pacs_config()
    path = workdir / "mdm.toml"
    path.write_text(
        f"""
[site]
vo = "demo"
secret = "test site secret, not for production"
uids = "{uids}"

[catalog]
url = "catalog.db"

[pacs]
aet = "{pacs.aet}"
host = "{pacs.host}"
port = {pacs.port}
calling_aet = "{pacs.calling_aet}"
move_port = {pacs.move_port}
timeout = 10
retrieve = "{retrieve}"
engine = "{engine}"

[listen]
port = {listen_port}
store_to_pacs = {str(store_to_pacs).lower()}

[keystore]
urls = {json.dumps(key_servers.urls)}
ca = "{key_servers.pki / "ca.pem"}"
cert = "{key_servers.pki / "service" / "cert.pem"}"
key = "{key_servers.pki / "service" / "key.pem"}"
timeout = 5

[server]
port = 0
cert = "{key_servers.pki / "hosts" / "storage-element" / "cert.pem"}"
key = "{key_servers.pki / "hosts" / "storage-element" / "key.pem"}"
threads = 24

[identity]
vomap = "{key_servers.pki / "vomap.toml"}"
ca = "{key_servers.pki / "ca.pem"}"

[cache]
dir = "cache"
quota_bytes = {quota_bytes}
wait_timeout = {wait_timeout}
retry_after = 1
workers = {workers}
lease = {lease}
readahead = "{readahead}"
"""
    )
    path.chmod(0o600)  # it holds the site secret: mdm serve and mdm listen refuse it readable
    return path


def keystore_section(key_servers: LocalKeyServers) -> dict:
    """The [keystore] section of the storage element's own config (its service identity)."""
    pki = key_servers.pki
    return {"urls": key_servers.urls, "ca": str(pki / "ca.pem"), "cert": str(pki / "service" / "cert.pem"),
            "key": str(pki / "service" / "key.pem"), "timeout": 5.0}


def mdm(*args: str, config: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the installed ``mdm`` command as a user would, with no terminal."""
    env = {**os.environ, "MDM_CONFIG": str(config)} if config else dict(os.environ)
    return subprocess.run(
        [shutil.which("mdm") or "mdm", *args], env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def require_vendor_data() -> Path:
    """The vendor series; skip outside CI when absent, fail in CI."""
    if not VENDOR.is_dir():
        message = f"vendor DICOM data not found at {VENDOR} (set SRM_DICOM_DATA)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return VENDOR
