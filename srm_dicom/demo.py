"""``mdm demo``: the whole storage element on loopback with a synthetic series, no setup.

It makes a demo PKI (CA, hosts, the storage element's service identity, users alice,
bob, carol, dave, eve), starts three key servers and the embedded PACS, registers the
series (anonymized, encrypted, keys split over the servers) and starts the push listener.

It writes the config it runs with to ``DIR/mdm.toml`` so other shells can use
``MDM_CONFIG=DIR/mdm.toml mdm ...`` against the running demo, and stops everything it
started when interrupted. The site secret is kept across runs in the same directory, so
the catalog's names stay valid.
"""

from __future__ import annotations

import re
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from srm_dicom.catalog import Catalog, open_catalog
from srm_dicom.config import Config, load_config
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.keystore.local import LocalKeyServers
from srm_dicom.listen import PushListener
from srm_dicom.names import vo_root
from srm_dicom.pacs.client import PacsClient
from srm_dicom.pacs.server import EmbeddedPacs
from srm_dicom.pki import USERS, client_toml, init_pki
from srm_dicom.register import Registrar, Summary
from srm_dicom.synthetic import make_series

_CONFIG = """\
# Written by 'mdm demo': the hospital-side config of the running demo (see conf/mdm.toml).
[site]
vo = "demo"
secret = "{secret}"
file_mode = "rwxr-x---"
metadata_mode = "group"

[catalog]
backend = "sqlite"
url = "catalog.db"

[keystore]
urls = [{keystore_urls}]
k = 2
ca = "ca.pem"
cert = "service/cert.pem"
key = "service/key.pem"

[pacs]
aet = "MDM_PACS"
host = "127.0.0.1"
port = {pacs_port}
calling_aet = "MDM"
move_port = {move_port}

[listen]
aet = "MDM_PUSH"
host = "127.0.0.1"
port = {listen_port}
store_to_pacs = true

[embedded_pacs]
aet = "MDM_PACS"
host = "127.0.0.1"
port = {pacs_port}
storage = "pacs"
move_destinations = {{ MDM = "127.0.0.1:{move_port}" }}
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(workdir: Path, keystore_urls: list[str]) -> Path:
    """Write DIR/mdm.toml with fresh loopback ports, keeping the secret of an earlier run."""
    path = workdir / "mdm.toml"
    found = re.search(r'^secret = "([0-9a-f]+)"', path.read_text(), re.M) if path.exists() else None
    path.write_text(
        _CONFIG.format(
            secret=found.group(1) if found else secrets.token_hex(32),
            pacs_port=_free_port(),
            move_port=_free_port(),
            listen_port=_free_port(),
            keystore_urls=", ".join(f'"{url}"' for url in keystore_urls),
        )
    )
    for user in USERS:
        (workdir / "users" / user.name / "client.toml").write_text(client_toml("../../ca.pem", tuple(keystore_urls)))
    return path


def _namespace(catalog: Catalog, root: str) -> list[str]:
    """Each series directory with its slice count and volume, as a newcomer wants to see it."""
    lines = []
    top = catalog.list_dir(root)
    for study in top.directories if top else []:
        for series in catalog.list_dir(study).directories:
            entries = catalog.list_dir(series).entries
            slices = sum(e.kind == "slice" for e in entries)
            lines.append(f"{series}/  {slices} slices + 3D")
    return lines


def run_demo(workdir: Path, say: Callable[[str], None] = print) -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    init_pki(workdir)
    with LocalKeyServers(workdir, workdir / "keystores") as key_servers:
        config_path = write_config(workdir, key_servers.urls)
        config = load_config(config_path)
        catalog = open_catalog(config)
        try:
            _serve(config, config_path, catalog, key_servers, stop, say)
        finally:
            catalog.close()
    say("demo stopped")
    return 0


def _serve(
    config: Config, config_path: Path, catalog: Catalog, key_servers: LocalKeyServers, stop: threading.Event,
    say: Callable[[str], None],
) -> None:
    workdir = config_path.parent
    with EmbeddedPacs(config.embedded_pacs, config.path(config.embedded_pacs.storage)):
        summary = Summary()
        with PacsClient(config.pacs) as pacs:
            registrar = Registrar(config, catalog, pacs, KeystoreClient.from_config(config))
            for ds in make_series():
                summary.add(registrar.register(ds, store_in_pacs=True))
        with PushListener(config, catalog) as listener:
            host, port = listener.address
            say(f"embedded PACS {config.pacs.aet}@{config.pacs.host}:{config.pacs.port}")
            say(f"key servers {' '.join(key_servers.urls)} (2 of 3 shares rebuild a key)")
            say(f"push listener {config.listen.aet}@{host}:{port}")
            say(f"synthetic series: {summary.line()}")
            say("namespace:")
            for line in _namespace(catalog, vo_root(config.site.vo)):
                say(f"  {line}")
            say("")
            say("from another shell (hospital side):")
            say(f"  export MDM_CONFIG={config_path}")
            say(f"  mdm ls {vo_root(config.site.vo)}")
            say("  mdm stat LFN; mdm del -l LFN; mdm register PATH...")
            say(f"  /usr/bin/storescu -aec {config.listen.aet} {host} {port} FILE.dcm   # push")
            say(f"demo users (CA {workdir / 'ca.pem'}): alice register, bob physician, carol mia, dave VO,")
            say("  eve another VO; each has users/NAME/cert.pem, key.pem and client.toml")
            say(f"  MDM_CONFIG={workdir / 'users' / 'bob' / 'client.toml'} mdm decrypt GUID IN OUT")
            say("")
            say("demo ready; press Ctrl-C to stop")
            stop.wait()
