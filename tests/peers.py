"""Real PACS processes for tests: Orthanc, DCMTK dcmqrscp and the embedded PACS.

Each peer gets free loopback ports and its own storage under ``workdir``, knows the
client's AE title and storage port (so C-FIND/C-GET/C-MOVE are allowed and C-MOVE can
reach the client), and stops cleanly. DCMTK and Orthanc read TCP_NODELAY from the
environment; without it every C-STORE waits for a delayed ACK.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srm_dicom.config import EmbeddedPacsConfig, PacsConfig

HOST = "127.0.0.1"
ORTHANC = "/usr/sbin/Orthanc"
DCMQRSCP = "/usr/bin/dcmqrscp"
START_TIMEOUT = 15.0


PORTS_PER_PROCESS = 1000
FIRST_PORT = 10000  # blocks of 1000 up to 30000, below the kernel's ephemeral range (32768-60999)


def _port_block() -> range:
    """This test process's own ports: pytest-xdist worker gwN takes block N, a plain pytest run a
    block chosen by its pid. A port the kernel hands out with bind(0) comes from the ephemeral
    range, where another worker's peer, or any outgoing connection, can take it before our peer
    binds it; here nothing else allocates."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker[:2] == "gw" and worker[2:].isdigit() else 8 + os.getpid() % 12
    start = FIRST_PORT + index * PORTS_PER_PROCESS
    return range(start, start + PORTS_PER_PROCESS)


_block = _port_block()
_candidates = itertools.cycle(itertools.chain(_block[secrets.randbelow(len(_block)):], _block))


def free_port() -> int:
    """A loopback port of this process's block that nothing holds now (bound and closed, without
    SO_REUSEADDR, so a port in TIME_WAIT is passed over too)."""
    for port in itertools.islice(_candidates, len(_block)):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_block.start}-{_block.stop - 1}")


def unique_aet(kind: str) -> str:
    """An AE title no other peer has: free ports are only free when asked, so on a busy machine
    two peers can race for one; with their own called AE title, a client that reached the
    other one is rejected instead of silently talking to the wrong PACS."""
    return f"{kind}_{secrets.token_hex(3).upper()}"


def peer_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class Peer:
    """A running PACS: where to reach it, and how to stop it."""

    name: str
    aet: str
    host: str
    port: int
    client_aet: str
    client_port: int
    storage: Path
    _stop: Callable[[], None]
    http_port: int | None = None

    def stop(self) -> None:
        self._stop()

    def pacs_config(
        self, calling_aet: str | None = None, move_port: int | None = None, **extra: object
    ) -> PacsConfig:
        """The [pacs] section a client of this peer uses (defaults: the AET it knows)."""
        return PacsConfig(
            aet=self.aet,
            host=self.host,
            port=self.port,
            calling_aet=calling_aet or self.client_aet,
            move_port=move_port or self.client_port,
            **extra,  # type: ignore[arg-type]
        )


def wait_for_port(port: int, proc: subprocess.Popen[Any], log: Path, what: str = "peer",
                  timeout: float = START_TIMEOUT) -> None:
    """Return once ``proc`` (``what``, logging to ``log``) accepts connections on ``port``; it is
    killed, and its log's tail raised, if it exits or does not listen within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f} s: {log.read_text()[-3000:]}")


def _terminator(proc: subprocess.Popen[bytes]) -> Callable[[], None]:
    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    return stop


def start_orthanc(workdir: Path, client_aet: str, client_port: int) -> Peer:
    """Orthanc with its own storage, no plugins, the client registered as a modality."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    aet = unique_aet("ORTHANC")
    config = {
        "Name": "srm-dicom-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": aet,
        "DicomPort": port,
        "HttpPort": http_port,
        "DicomServerEnabled": True,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": True,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomAlwaysAllowMove": True,
        "DicomModalities": {"client": [client_aet, HOST, client_port]},
        "OverwriteInstances": True,
        "SaveJobs": False,
        "Plugins": [],
        "StorageCompression": False,
        "DicomScpTimeout": 30,
    }
    config_file = workdir / "orthanc.json"
    config_file.write_text(json.dumps(config))
    log = workdir / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [ORTHANC, str(config_file)], stdout=out, stderr=subprocess.STDOUT, env=peer_env()
        )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{http_port}/system", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _terminator(proc)()
                raise RuntimeError(f"Orthanc did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.05)
    wait_for_port(port, proc, log)
    return Peer(
        "orthanc", aet, HOST, port, client_aet, client_port, workdir / "storage",
        _terminator(proc), http_port,
    )


def start_dcmqrscp(workdir: Path, client_aet: str, client_port: int) -> Peer:
    """dcmqrscp (forking: --single-process segfaults in 3.6.7) with one RW storage area.

    It accepts and sends uncompressed transfer syntaxes only: with +xs it would accept
    JPEG Lossless too, but then proposes that syntax for every C-MOVE sub-operation and
    fails on the uncompressed images it cannot compress.
    """
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    aet = unique_aet("DCMQRSCP")
    config_file = workdir / "dcmqrscp.cfg"
    config_file.write_text(
        f"""NetworkTCPPort = {port}
MaxPDUSize = 65536
MaxAssociations = 16

HostTable BEGIN
client = ({client_aet}, {HOST}, {client_port})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{aet} {storage} RW (100, 1024mb) ANY
AETable END
"""
    )
    log = workdir / "dcmqrscp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [DCMQRSCP, "-c", str(config_file), "-ta", "10"],
            stdout=out, stderr=subprocess.STDOUT, env=peer_env(), cwd=workdir,
        )
    wait_for_port(port, proc, log)
    return Peer("dcmqrscp", aet, HOST, port, client_aet, client_port, storage, _terminator(proc))


def start_embedded(workdir: Path, client_aet: str, client_port: int) -> Peer:
    """The embedded pynetdicom PACS, in this process (threads), on a free port."""
    from srm_dicom.pacs.server import EmbeddedPacs

    port = free_port()
    aet = unique_aet("MDM_PACS")
    config = EmbeddedPacsConfig(
        aet=aet,
        host=HOST,
        port=port,
        storage=str(workdir / "pacs"),
        move_destinations={client_aet: f"{HOST}:{client_port}"},
        calling_aets=[client_aet],
    )
    pacs = EmbeddedPacs(config, workdir / "pacs")
    pacs.start()
    return Peer("embedded", aet, HOST, port, client_aet, client_port, pacs.storage, pacs.stop)
