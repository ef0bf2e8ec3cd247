"""Three key servers on loopback inside one process, for the demo and the tests.

Real servers (cheroot, mutual TLS, one SQLite store each), only run as threads instead
of separate processes so a demo starts in a second; a site runs one
``mdm keystore serve`` per host instead.
"""

from __future__ import annotations

import threading
from pathlib import Path

from cheroot import wsgi

from srm_dicom.keystore.server import KeystoreServerConfig, make_server
from srm_dicom.pki import SERVICE_DN
from srm_dicom.private_files import private_dir

HOST = "127.0.0.1"


class LocalKeyServers:
    """``n`` key servers using the demo PKI in ``pki``, keeping their shares under ``state``."""

    def __init__(self, pki: Path, state: Path, n: int = 3, idle_timeout: float = 10.0) -> None:
        private_dir(state)
        self.pki = pki
        self._servers: list[wsgi.Server] = []
        self._threads: list[threading.Thread] = []
        self._configs = [
            KeystoreServerConfig(
                cert=pki / "hosts" / f"keystore-{i}" / "cert.pem",
                key=pki / "hosts" / f"keystore-{i}" / "key.pem",
                ca=pki / "ca.pem",
                database=state / f"keystore-{i}.db",
                vomap=pki / "vomap.toml",
                services=(SERVICE_DN,),
                vomsdir=pki / "vomsdir",  # as the demo's storage element: its VOMS server's ACs are trusted
                host=HOST,
                port=0,
                threads=4,
                idle_timeout=idle_timeout,
            )
            for i in range(1, n + 1)
        ]

    @property
    def urls(self) -> list[str]:
        return [f"https://{HOST}:{server.bind_addr[1]}" for server in self._servers]

    def start(self) -> None:
        for config in self._configs:
            server = make_server(config)
            server.prepare()
            thread = threading.Thread(target=server.serve, name=f"keystore-{config.database.stem}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)

    def stop(self) -> None:
        for server in self._servers:
            server.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> LocalKeyServers:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
