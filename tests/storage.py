"""A running storage element for tests: the real WSGI app behind the real cheroot HTTPS
server, in this process, over a site registered with real PACS and key servers."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from sites import write_site_config
from srm_dicom.catalog import Catalog, open_catalog
from srm_dicom.config import Config, load_config
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pacs.client import PacsClient
from srm_dicom.register import Registrar
from srm_dicom.server.app import StorageElement, make_server
from srm_dicom.stager import Stager


@dataclass
class RunningStorageElement:
    config: Config
    config_path: Path
    catalog: Catalog
    stager: Stager
    app: StorageElement
    url: str
    _server: object
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.stop()  # type: ignore[attr-defined]
        self._thread.join(timeout=10)
        self.stager.stop()
        self.app.close()
        self.catalog.close()


def start_storage_element(config_path: Path) -> RunningStorageElement:
    config = load_config(config_path)
    catalog = open_catalog(config)
    stager = Stager(config, catalog, KeystoreClient.from_config(config))
    app = StorageElement(config, catalog, stager)  # listens to events before the stager's first
    stager.start()
    server = make_server(config, app)
    server.prepare()
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.bind_addr[1]}"
    return RunningStorageElement(config, config_path, catalog, stager, app, url, server, thread)


def register(config_path: Path, datasets: list) -> None:
    """Register datasets into the site's PACS and catalog, as `mdm register` does."""
    config = load_config(config_path)
    catalog = open_catalog(config)
    try:
        with PacsClient(config.pacs) as pacs:
            registrar = Registrar(config, catalog, pacs, KeystoreClient.from_config(config))
            with registrar.batch():
                for ds in datasets:
                    registrar.register(ds, store_in_pacs=True)
    finally:
        catalog.close()


def start_site(workdir: Path, pacs, key_servers, datasets=(), extra: str = "",
               keystore: dict | None = None) -> RunningStorageElement:
    """A storage element over a test site config (sites.write_site_config) with ``extra`` appended
    and, if given, another [keystore] section; ``datasets`` registered first."""
    config = write_site_config(workdir, pacs, key_servers)
    text = config.read_text() + extra
    if keystore is not None:  # another [keystore] section: replace the test site's
        head, _, rest = text.partition("[keystore]")
        rest = rest[rest.index("\n[") :]
        section = "\n".join(f"{k} = {json.dumps(v)}" for k, v in keystore.items())
        text = f"{head}[keystore]\n{section}\n{rest}"
    config.write_text(text)
    if datasets:
        register(config, list(datasets))
    return start_storage_element(config)
