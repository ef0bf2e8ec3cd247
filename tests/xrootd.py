"""A real XRootD 5.5 HTTPS server for third-party-copy tests: XrdHttp with the TPC handler
(libXrdHttpTPC) and macaroons (libXrdMacaroons), a loopback host certificate from the test
PKI, adler32 checksums, files under its own directory.

XRootD refuses to run as root: started by root (CI), it is told to switch to ``nobody``
(``-R``) and everything it reads or writes is handed to that user first.
"""

from __future__ import annotations

import base64
import os
import pwd
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import require_program
from peers import HOST, free_port
from srm_dicom.pki import hashed_ca_dir, init_host

START_TIMEOUT = 20.0
CONFIG = """\
all.sitename srm-dicom-tests
all.export /
oss.localroot {data}
all.adminpath {run}
all.pidpath {run}
xrd.port {xroot_port}
xrd.protocol XrdHttp:{http_port} libXrdHttp.so
xrd.tls {cert} {key}
xrd.tlsca certdir {cadir}
xrootd.chksum adler32
http.exthandler xrdtpc libXrdHttpTPC.so
http.exthandler xrdmacaroons libXrdMacaroons.so
macaroons.secretkey {secret}
http.header2cgi Authorization authz
tpc.trace all
"""


@dataclass
class XRootD:
    url: str  # davs://127.0.0.1:PORT
    data: Path  # what XRootD stores, by path
    log: Path

    def path(self, name: str) -> Path:
        return self.data / name.lstrip("/")


def _wait_for(port: int, process: subprocess.Popen, log: Path) -> None:
    """Until XRootD says its HTTP protocol is up (it binds the port before loading it)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if process.poll() is not None or "initialization failed" in text:
            raise RuntimeError(f"xrootd did not start: {text[-2000:]}")
        if f":{port} initialization completed" in text:
            return
        time.sleep(0.2)
    raise RuntimeError(f"xrootd did not start within {START_TIMEOUT} s")


@contextmanager
def running_xrootd(workdir: Path, pki: Path) -> Iterator[XRootD]:
    """XRootD on a free loopback port, trusting the test PKI's CA; stopped on exit."""
    program = require_program("xrootd")
    workdir.mkdir(parents=True, exist_ok=True)
    host = init_host(pki, "xrootd")
    own = workdir / "host"
    own.mkdir(exist_ok=True)
    shutil.copyfile(host / "cert.pem", own / "cert.pem")
    shutil.copyfile(host / "key.pem", own / "key.pem")
    os.chmod(own / "key.pem", 0o600)
    cadir = hashed_ca_dir(pki / "ca.pem", workdir / "cadir")
    secret = workdir / "macaroon-secret"
    encoded = base64.b64encode(secrets.token_bytes(64)).decode()  # as 'openssl rand -base64 64': lines of 64
    secret.write_text("".join(encoded[i:i + 64] + "\n" for i in range(0, len(encoded), 64)))
    os.chmod(secret, 0o600)
    data, run, logs = workdir / "data", workdir / "run", workdir / "log"
    for folder in (data, run, logs):
        folder.mkdir(exist_ok=True)
    http_port = free_port()
    config = workdir / "xrootd.cfg"
    config.write_text(CONFIG.format(data=data, run=run, xroot_port=free_port(), http_port=http_port,
                                    cert=own / "cert.pem", key=own / "key.pem", cadir=cadir, secret=secret))
    argv = [program, "-c", str(config), "-l", str(logs / "xrootd.log")]
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for path in (workdir, own, own / "cert.pem", own / "key.pem", secret, data, run, logs, cadir):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        argv[1:1] = ["-R", "nobody"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_for(http_port, process, logs / "xrootd.log")
        yield XRootD(f"davs://{HOST}:{http_port}", data, logs / "xrootd.log")
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
