"""Two front ends on one site, one of them killed mid-run (issue 10, "Several front ends").

Two real ``mdm serve`` processes share one PostgreSQL catalog (a database of its own,
dropped afterwards) and one cache directory, behind HAProxy in TCP mode (TLS passthrough,
so the client certificate reaches ``mdm serve``). Registered series sit in the embedded
PACS, run in this process and counting every image it sends. Clients (bob's certificate,
their own connection through HAProxy each) read every registered slice: PROPFIND of its
series, a WLCG Tape REST stage request of one series polled to its end, and GETs of every
file, checked against the catalog's size and adler32. As soon as the first front end holds
a staging job it is killed with SIGKILL. Clients retry as grid clients do: after a 503
with Retry-After, and over a new connection after one is reset.

Reported: clients, files, errors, retries, and how many times the PACS sent each file.
Every file is sent once, except those of the batch the killed front end held at its
death: it may have received them already; its successor retrieves them again after the
lease lapses. The full run is a README command:

    python tests/load/failover.py --clients 32

and ``tests/load/test_failover.py`` runs a short one in CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' helpers, when run as a command

import psycopg  # noqa: E402
from pydicom import Dataset  # noqa: E402

import postgres  # noqa: E402
from peers import HOST, Peer, free_port, unique_aet, wait_for_port  # noqa: E402
from sites import write_site_config  # noqa: E402
from srm_dicom.catalog import Entry, open_catalog  # noqa: E402
from srm_dicom.config import EmbeddedPacsConfig, load_config  # noqa: E402
from srm_dicom.keystore.local import LocalKeyServers  # noqa: E402
from srm_dicom.names import UidTriple, parse_pfn  # noqa: E402
from srm_dicom.pacs.server import EmbeddedPacs  # noqa: E402
from srm_dicom.pki import init_pki  # noqa: E402
from srm_dicom.synthetic import make_series  # noqa: E402
from storage import register  # noqa: E402

CLIENT_AET = "MDM_FAILOVER"
LEASE = 3.0  # seconds: the killed front end's jobs are taken over this soon
CLIENT_DEADLINE = 180.0  # seconds a client keeps retrying one request


class CountingPacs(EmbeddedPacs):
    """The embedded PACS, counting the images it sends (C-GET and C-MOVE sub-operations), at the
    pace of a PACS busy with its hospital: ``pace`` seconds an image (loopback alone sends a
    series faster than the front end can be killed in the middle of it)."""

    def __init__(self, settings: EmbeddedPacsConfig, storage: Path, pace: float) -> None:
        super().__init__(settings, storage)
        self.sent: Counter[str] = Counter()
        self._counting = threading.Lock()
        self._pace = pace

    def _send(self, event, files):  # type: ignore[no-untyped-def]
        for item in super()._send(event, files):
            if isinstance(item, tuple) and isinstance(item[1], Dataset):
                time.sleep(self._pace)
                with self._counting:
                    self.sent[str(item[1].SOPInstanceUID)] += 1
            yield item


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    retries: int = 0  # 503 + Retry-After answers waited out
    reconnects: int = 0  # connections reset or refused (the killed front end's), opened again
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str) -> None:
        with self.lock:
            if what == "retry":
                self.retries += 1
            elif what == "reconnect":
                self.reconnects += 1
            else:
                self.requests[what] += 1


@dataclass
class Site:
    workdir: Path
    pki: Path
    url: str  # HAProxy's
    front_ends: list[subprocess.Popen[str]]
    pacs: CountingPacs
    catalog_url: str
    slices: list[Entry]
    series_dirs: list[str]


class Client:
    """One grid client with bob's certificate and one kept-alive connection through HAProxy."""

    def __init__(self, site: Site, stats: Stats) -> None:
        self._site, self._stats = site, stats
        bob = site.pki / "users" / "bob"
        self._context = ssl.create_default_context(cafile=str(site.pki / "ca.pem"))
        self._context.load_cert_chain(bob / "cert.pem", bob / "key.pem")
        self._host, port = site.url.removeprefix("https://").rsplit(":", 1)
        self._port = int(port)
        self._connection: http.client.HTTPSConnection | None = None

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
        """One request as a grid client makes it: a 503 with Retry-After is asked again after that
        delay, a reset or refused connection over a new one, until CLIENT_DEADLINE."""
        deadline = time.monotonic() + CLIENT_DEADLINE
        while True:
            try:
                if self._connection is None:
                    self._connection = http.client.HTTPSConnection(self._host, self._port, context=self._context,
                                                                   timeout=60)
                self._connection.request(method, path, body=body, headers=headers or {})
                response = self._connection.getresponse()
                data = response.read()
                self._stats.count(method)
                retry_after = response.getheader("Retry-After")
                if response.status != 503 or retry_after is None or time.monotonic() > deadline:
                    return response.status, data, response
                self._stats.count("retry")
                time.sleep(min(float(retry_after), 5.0))
            except (OSError, http.client.HTTPException):
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None
                if time.monotonic() > deadline:
                    raise
                self._stats.count("reconnect")
                time.sleep(0.2)

    def check_file(self, entry: Entry) -> str | None:
        status, data, response = self.call("GET", entry.lfn, headers={"Want-Digest": "adler32"})
        if status != 200:
            return f"GET {entry.lfn}: {status} {data[-200:]!r}"
        if len(data) != entry.size or f"{zlib.adler32(data):08x}" != entry.adler32:
            return f"GET {entry.lfn}: {len(data)} bytes, adler32 {zlib.adler32(data):08x}, not the catalog's"
        digest = response.getheader("Digest", "")
        if digest.lower() != f"adler32={entry.adler32}":
            return f"GET {entry.lfn}: Digest {digest!r}, not the catalog's adler32"
        return None

    def listing(self, directory: str, names: set[str]) -> str | None:
        status, data, _ = self.call("PROPFIND", directory + "/", headers={"Depth": "1"})
        missing = [name for name in names if name.encode() not in data]
        return None if status == 207 and not missing else f"PROPFIND {directory}: {status}, {len(missing)} missing"

    def stage(self, entries: list[Entry]) -> str | None:
        body = json.dumps({"files": [{"path": e.lfn} for e in entries]}).encode()
        status, data, _ = self.call("POST", "/api/v1/tape/stage", body, {"Content-Type": "application/json"})
        if status != 201:
            return f"stage: {status} {data[-200:]!r}"
        request_id = json.loads(data)["requestId"]
        deadline = time.monotonic() + CLIENT_DEADLINE
        while time.monotonic() < deadline:
            status, data, _ = self.call("GET", f"/api/v1/tape/stage/{request_id}")
            if status != 200:
                return f"stage {request_id}: {status} {data[-200:]!r}"
            files = json.loads(data)["files"]
            if all(f.get("state") in ("COMPLETED", "FAILED", "CANCELLED") for f in files):
                bad = [f for f in files if f.get("state") != "COMPLETED" or not f.get("onDisk")]
                return f"stage {request_id}: {bad[:2]}" if bad else None
            time.sleep(0.25)
        return f"stage {request_id}: not final after {CLIENT_DEADLINE:.0f} s"

    def run(self, index: int) -> None:
        """PROPFIND the series, stage one of them, GET every file (in an order of its own)."""
        site = self._site
        by_series: dict[str, list[Entry]] = {}
        for entry in site.slices:
            by_series.setdefault(entry.lfn.rsplit("/", 1)[0], []).append(entry)
        mine = site.series_dirs[index % len(site.series_dirs)]
        steps: list[tuple[str, object]] = [("PROPFIND", d) for d in site.series_dirs]
        steps += [("stage", mine)] + [("GET", e) for e in site.slices]
        random.Random(index).shuffle(steps)
        for kind, what in steps:
            try:
                if kind == "PROPFIND":
                    assert isinstance(what, str)
                    error = self.listing(what, {e.lfn.rsplit("/", 1)[1] for e in by_series[what]})
                elif kind == "stage":
                    assert isinstance(what, str)
                    error = self.stage(by_series[what])
                else:
                    assert isinstance(what, Entry)
                    error = self.check_file(what)
            except Exception as exc:  # noqa: BLE001 - every failure of a client is an error of the run
                error = f"{kind}: {type(exc).__name__}: {exc}"
            if error:
                with self._stats.lock:
                    self._stats.errors.append(error)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _front_end_config(workdir: Path, base: Path, catalog_url: str, cache: Path, clients: int) -> tuple[Path, int]:
    """A front end's mdm.toml: the site's config with the shared catalog and cache, its own port."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = base.read_text()
    catalog = f'[catalog]\nbackend = "postgresql"\nurl = "{catalog_url}"\n'
    text = text.replace('[catalog]\nurl = "catalog.db"\n', catalog)
    text = text.replace('dir = "cache"\n', f'dir = "{cache}"\npoll_interval = 0.25\n')
    # Behind HAProxy every connection comes from its address: no per-address limit here.
    text = text.replace("[server]\nport = 0\n", f"[server]\nport = {port}\nmax_connections_per_client = 0\n")
    text = text.replace("threads = 24\n", f"threads = {2 * clients + 8}\n")
    path = workdir / "mdm.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path, port


@contextmanager
def haproxy(workdir: Path, backends: list[int]) -> Iterator[int]:
    """HAProxy in TCP mode in front of ``backends``: TLS passes through to them untouched; a
    backend that stops answering is taken out within a second, connections redispatched."""
    port = free_port()
    servers = "\n".join(f"    server fe{n} {HOST}:{p} check inter 250ms fall 1 rise 2"
                        for n, p in enumerate(backends, start=1))
    config = workdir / "haproxy.cfg"
    config.write_text(f"""global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    retries 3
    option redispatch
frontend grid
    bind {HOST}:{port}
    default_backend doors
backend doors
    balance roundrobin
{servers}
""")
    log = workdir / "haproxy.log"
    process = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-f", str(config), "-db"],
                               stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, process, log, "haproxy", timeout=30)
        yield port
    finally:
        _stop(process)


@contextmanager
def site(workdir: Path, clients: int, series: int, slices: int, pace: float) -> Iterator[Site]:
    """The site: PKI, key servers, the counting PACS with ``series`` registered series, a fresh
    PostgreSQL catalog, two ``mdm serve`` on it and one cache, HAProxy in front."""
    with ExitStack() as stack:
        pki = workdir / "pki"
        init_pki(pki)
        key_servers = stack.enter_context(LocalKeyServers(pki, workdir / "keystores"))
        aet, pacs_port = unique_aet("MDM_PACS"), free_port()
        settings = EmbeddedPacsConfig(aet=aet, host=HOST, port=pacs_port, storage=str(workdir / "pacs"),
                                      calling_aets=[CLIENT_AET])
        pacs = CountingPacs(settings, workdir / "pacs", pace)
        pacs.start()
        stack.callback(pacs.stop)
        peer = Peer("embedded", aet, HOST, pacs_port, CLIENT_AET, free_port(), pacs.storage, pacs.stop)
        catalog_url = stack.enter_context(postgres.database())
        base = write_site_config(workdir / "site", peer, key_servers, wait_timeout=5.0, lease=LEASE)
        configs = [_front_end_config(workdir / f"fe{n}", base, catalog_url, workdir / "cache", clients)
                   for n in (1, 2)]
        datasets = [ds for n in range(series) for ds in make_series(slices=slices, size=32, seed=f"failover-{n}")]
        register(configs[0][0], datasets)
        catalog = open_catalog(load_config(configs[0][0]))
        try:
            entries = [catalog.lookup_uids(_triple(ds)) for ds in datasets]
        finally:
            catalog.close()
        assert all(entries), "every registered slice is in the catalog"
        slice_entries = [e for e in entries if e is not None]
        front_ends = []
        for n, (config, port) in enumerate(configs, start=1):
            log = workdir / f"fe{n}" / "serve.log"
            process = subprocess.Popen([shutil.which("mdm") or "mdm", "serve", "-v"], stdout=subprocess.DEVNULL,
                                       stderr=log.open("w"), stdin=subprocess.DEVNULL, text=True,
                                       env={**os.environ, "MDM_CONFIG": str(config)})
            stack.callback(_stop, process)
            wait_for_port(port, process, log, f"mdm serve (front end {n})", timeout=30)
            front_ends.append(process)
        proxy = stack.enter_context(haproxy(workdir, [port for _, port in configs]))
        series_dirs = sorted({e.lfn.rsplit("/", 1)[0] for e in slice_entries})
        yield Site(workdir, pki, f"https://localhost:{proxy}", front_ends, pacs, catalog_url, slice_entries,
                   series_dirs)


def _triple(ds: Dataset) -> UidTriple:
    return UidTriple(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))


def kill_when_holding(site: Site, running: Callable[[], bool]) -> set[str]:
    """SIGKILL the first front end as soon as it holds a staging job (or once the clients are
    done, if it never did); the GUIDs it held."""
    victim = site.front_ends[0]
    with psycopg.connect(site.catalog_url, autocommit=True) as db:
        while running():
            held = {row[0] for row in db.execute(
                "SELECT guid FROM stage_jobs WHERE state = 'STARTED' AND holder LIKE %s", (f"%:{victim.pid}:%",))}
            if held:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                # What it held when it died (it may have claimed more between the look and the kill).
                return {row[0] for row in db.execute(
                    "SELECT guid FROM stage_jobs WHERE state = 'STARTED' AND holder LIKE %s",
                    (f"%:{victim.pid}:%",))} | held
            time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    return set()


@dataclass
class Result:
    clients: int
    files: int
    stats: Stats
    sent: Counter[str]  # images the PACS sent, by SOP Instance UID of the registered slices
    held_at_death: set[str]  # SOP Instance UIDs of the slices the killed front end held
    seconds: float

    def report(self) -> str:
        per_file = Counter(self.sent.values())
        again = {sop for sop, n in self.sent.items() if n > 1}
        lines = [
            f"clients: {self.clients}, files: {self.files}, errors: {len(self.stats.errors)}, "
            f"requests: {sum(self.stats.requests.values())} ({dict(self.stats.requests)}), "
            f"503 retried: {self.stats.retries}, reconnects: {self.stats.reconnects}, {self.seconds:.1f} s",
            "PACS retrievals per file: " + ", ".join(f"{n}× {count} files" for n, count in sorted(per_file.items()))
            + f"; files never sent: {self.files - len(self.sent)}",
            f"front end killed holding {len(self.held_at_death)} files; sent more than once: {len(again)}, "
            f"all of them held by the killed one: {again <= self.held_at_death}",
        ]
        lines += [f"  error: {error}" for error in self.stats.errors[:10]]
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        again = {sop for sop, n in self.sent.items() if n > 1}
        return (not self.stats.errors and len(self.sent) == self.files and again <= self.held_at_death
                and max(self.sent.values(), default=0) <= 2)


def run(clients: int, series: int, slices: int, workdir: Path, pace: float = 0.05) -> Result:
    with site(workdir, clients, series, slices, pace) as running:
        stats = Stats()
        threads = [threading.Thread(target=Client(running, stats).run, args=(n,), daemon=True)
                   for n in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        held = kill_when_holding(running, lambda: any(thread.is_alive() for thread in threads))
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        sop_of = {e.guid: parse_pfn(e.pfn).sop or "" for e in running.slices}
        registered = set(sop_of.values())
        sent = Counter({sop: n for sop, n in running.pacs.sent.items() if sop in registered})
        return Result(clients, len(running.slices), stats, sent, {sop_of[g] for g in held if g in sop_of}, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--series", type=int, default=4, help="series registered (default 4)")
    parser.add_argument("--slices", type=int, default=8, help="slices per series (default 8)")
    parser.add_argument("--pace", type=float, default=0.05, help="seconds the PACS takes per image (default 0.05)")
    parser.add_argument("--workdir", type=Path, help="keep the site and its logs here (default: a temporary dir)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mdm-failover-"))
    workdir.mkdir(parents=True, exist_ok=True)
    result = run(args.clients, args.series, args.slices, workdir, args.pace)
    print(result.report())
    print(f"logs: {workdir}/fe1/serve.log, {workdir}/fe2/serve.log, {workdir}/haproxy.log")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
