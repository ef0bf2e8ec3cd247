"""Staging and serving by the storage element (``mdm serve``) next to the PACS and nginx doing the same work.

Run: python tests/bench/bench_serve.py [--pacs orthanc embedded dcmqrscp] [--rounds 3] [--gets 5]
     [--slices 1000] [--skip part1 part2 part3]

Part 1, cold staging of a synthetic CT series (100 slices of 256², one PACS at a time). Each
storage element figure starts a new ``mdm serve`` process over the same catalog with an
empty cache directory, so nothing is on disk; the clock runs from the first request to the
last byte:

- Tape REST stage: one ``POST /api/v1/tape/stage`` naming the 100 slice LFNs, then
  ``GET /stage/{id}`` every ``--poll`` seconds until every file is COMPLETED.
- 100 sequential GETs: each slice LFN in turn over one kept-alive connection; each GET
  stages its slice (C-GET of one image, protect, verify against the catalog) and serves it.
- 3D GET: one GET of the series volume: C-GET of the series, assembly, encryption.

Next to them, the same PACS doing the transfer alone, from this process:

- PacsClient.get series: one C-GET of the whole series, datasets kept in memory: the floor
  of the 3D GET and the cheapest way to move the images.
- PacsClient.get per SOP: 100 C-GETs of one image each over one association: the floor of
  staging slice by slice (the storage element asks the PACS image by image).
- getscu series: DCMTK's /usr/bin/getscu, one C-GET of the series written into a
  directory, TCP_NODELAY=1; the files are counted after the clock stops.
- getscu + dcm2niix (3D): the same, then dcm2niix of the directory into one NIfTI file
  (checked): the peers' cold 3D GET.
- key fetch ×100: ``KeystoreClient.fetch_key`` of each slice's key from the three key
  servers, as the stager does once per slice (no content check): what slice-by-slice staging
  pays on top of the PACS.

Part 2, warm GETs of a large file: a series of ``--large-slices`` × ``--large-size``² is
registered, its 3D volume staged once (float32 NIfTI, ~200 MB for 200×512²), then GET
``--gets`` times over HTTPS with bob's client certificate, from the storage element and from
nginx (Debian's, one worker, TLS with the same host certificate, ``ssl_verify_client
optional`` against the same CA) serving the same cached file, with curl (``-o /dev/null``)
and Python's http.client (1 MiB ``readinto``, a new connection per GET, as curl). Server CPU
is read from /proc (all threads, or nginx master plus worker), the mean of the GETs; on a
loaded machine its ratio to nginx's is the steadier figure (the wall clock waits for CPU).

Part 3, peak RSS: a series of ``--rss-slices`` × ``--rss-size``² (512 × 1024² int16: a 1 GiB
volume) registered, its 3D assembled for the first time, then restaged cold by a new ``mdm
serve``; the VmHWM of the server (from /proc) after each, the bytes received checked.

nginx for part 2 is Debian's (``apt-get install -y --no-install-recommends nginx-light``), run
by this script on a free port with its own prefix, never as a system daemon.

The PACS peers, the key servers and the storage element each run in a process of their own
(the embedded PACS as ``mdm pacs serve``), so no two of them, nor the timing clients, share
a GIL. Figures are medians of ``--rounds`` (part 1) or ``--gets`` (part 2); methods
alternate within a round so load from other processes hits all of them.
"""

from __future__ import annotations

import argparse
import grp
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# The tree this script lives in, ahead of whatever the shared interpreter has installed in
# editable mode, here and in the mdm subprocesses (bench_register does the same).
ROOT = Path(__file__).resolve().parents[2]
TREE = [str(ROOT / "tests"), str(ROOT), str(ROOT / "plugins")]
sys.path[:0] = TREE
os.environ["PYTHONPATH"] = os.pathsep.join([*TREE[1:], os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from bench_register import KeyServers  # noqa: E402

import peers  # noqa: E402
import srm_dicom  # noqa: E402
from sites import write_site_config  # noqa: E402
from srm_dicom.catalog import Entry, UidTriple, open_catalog  # noqa: E402
from srm_dicom.config import CacheConfig, ServerConfig, default_engine, load_config  # noqa: E402
from srm_dicom.entry_key import key_name  # noqa: E402
from srm_dicom.errors import MdmError  # noqa: E402
from srm_dicom.keystore.client import KeystoreClient  # noqa: E402
from srm_dicom.pacs.client import PacsClient  # noqa: E402
from srm_dicom.private_files import write_private  # noqa: E402
from srm_dicom.synthetic import make_series  # noqa: E402
from storage import register  # noqa: E402

GETSCU = "/usr/bin/getscu"
DCM2NIIX = "/usr/bin/dcm2niix"
NGINX = "/usr/sbin/nginx"
CURL = "/usr/bin/curl"
CLIENT_AET = "MDM_BENCH"
USER = "bob"  # a physician of the demo VO: may read every registered file
START_TIMEOUT = 60.0
MIB = 1 << 20
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
SEQUENTIAL = 100  # cold GETs of the first slices, one after the other


# -- processes -------------------------------------------------------------------------

def mdm_command(*args: str) -> list[str]:
    """The CLI of this tree in this interpreter (not the pyenv shim: its PID is the server's);
    ``-P``: not the srm_dicom of the current directory, which ``-c`` would put first."""
    return [sys.executable, "-P", "-c", "import sys; from srm_dicom.cli import main; sys.exit(main(sys.argv[1:]))",
            *args]


def wait_for_line(process: subprocess.Popen[bytes], log: Path, prefix: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"{' '.join(process.args[:1])} did not print {prefix!r}: {log.read_text()[-2000:]}")


def terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes, all their threads, from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICK


def start_embedded_process(workdir: Path, client_aet: str, client_port: int) -> peers.Peer:
    """The embedded PACS as a site runs it (``mdm pacs serve``), in its own process."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, aet = peers.free_port(), peers.unique_aet("MDM_PACS")
    config = workdir / "pacs.toml"
    config.write_text(
        f'[embedded_pacs]\naet = "{aet}"\nhost = "{peers.HOST}"\nport = {port}\nstorage = "pacs"\n'
        f'move_destinations = {{ {client_aet} = "{peers.HOST}:{client_port}" }}\n'
    )
    log = workdir / "pacs.log"
    with log.open("wb") as out:
        process = subprocess.Popen(mdm_command("--config", str(config), "pacs", "serve"), stdout=out,
                                   stderr=subprocess.STDOUT, env=peers.peer_env())
    wait_for_line(process, log, "embedded PACS")
    return peers.Peer("embedded", aet, peers.HOST, port, client_aet, client_port, workdir / "pacs",
                      lambda: terminate(process))


STARTERS: dict[str, Callable[[Path, str, int], peers.Peer]] = {
    "orthanc": peers.start_orthanc,
    "embedded": start_embedded_process,
    "dcmqrscp": peers.start_dcmqrscp,
}


@dataclass
class Served:
    """A running ``mdm serve`` and where it caches."""

    process: subprocess.Popen[bytes]
    url: str
    cache: Path

    def cpu(self) -> float:
        return cpu_seconds([self.process.pid])

    def stop(self) -> None:
        terminate(self.process)


class Site:
    """A catalog over one PACS; every ``serve()`` is a new storage element with an empty cache."""

    def __init__(self, workdir: Path, peer: peers.Peer, keys: KeyServers, workers: int, threads: int,
                 engine: str) -> None:
        base = write_site_config(workdir, peer, keys, wait_timeout=600, quota_bytes=16 << 30,  # type: ignore[arg-type]
                                 engine=engine, readahead=CacheConfig().readahead)
        self.workdir, self.peer, self.pki = workdir, peer, keys.pki
        self._text = (base.read_text().replace("workers = 2", f"workers = {workers}")
                      .replace("threads = 8", f"threads = {threads}"))
        base.write_text(self._text)
        self.config = base
        self._count = 0

    def serve(self) -> Served:
        self._count += 1
        cache = f"cache-{self._count}"
        config = self.workdir / f"mdm-{self._count}.toml"
        write_private(config, self._text.replace('dir = "cache"', f'dir = "{cache}"').encode())
        log = self.workdir / f"serve-{self._count}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(mdm_command("--config", str(config), "serve"), stdout=out,
                                       stderr=subprocess.STDOUT)
        url = wait_for_line(process, log, "serving ").split()[-1]
        return Served(process, url.replace("0.0.0.0", "127.0.0.1"), self.workdir / cache)

    def entries(self, datasets: list) -> tuple[list[Entry], Entry]:
        """The slices' entries (in series order) and the series volume's, by the PACS's UIDs."""
        catalog = open_catalog(load_config(self.config))
        try:
            slices = []
            for ds in datasets:
                entry = catalog.lookup_uids(UidTriple(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
                if entry is None:
                    raise SystemExit("a registered slice is not in the catalog")
                slices.append(entry)
            volume = catalog.namespace.lookup(slices[0].lfn.rpartition("/")[0] + "/3D")
            if volume is None:
                raise SystemExit("the series volume is not in the catalog")
            return slices, volume
        finally:
            catalog.close()

    def volume(self, guid: str) -> Entry:
        catalog = open_catalog(load_config(self.config))
        try:
            entry = catalog.namespace.lookup_guid(guid)
            assert entry is not None
            return entry
        finally:
            catalog.close()


# -- HTTPS client ----------------------------------------------------------------------

class Https:
    """One kept-alive HTTPS connection with a user's certificate, as a grid client holds it."""

    def __init__(self, url: str, pki: Path, user: str = USER) -> None:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(str(pki / "users" / user / "cert.pem"), str(pki / "users" / user / "key.pem"))
        parts = urlsplit(url)
        self.connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=600)
        self._buffer = memoryview(bytearray(MIB))

    def get(self, path: str) -> int:
        """GET ``path`` to nowhere; the bytes received."""
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        if response.status != 200:
            raise SystemExit(f"GET {path}: {response.status} {response.read()[:300]!r}")
        received = 0
        while got := response.readinto(self._buffer):
            received += got
        return received

    def json(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload else {}
        self.connection.request(method, path, payload, headers)
        response = self.connection.getresponse()
        return response.status, json.loads(response.read() or b"null")

    def cipher(self) -> str:
        sock = self.connection.sock
        return f"{sock.version()} {sock.cipher()[0]}" if sock else "not connected"

    def close(self) -> None:
        self.connection.close()


# -- part 1: cold staging next to the PACS ---------------------------------------------

@dataclass
class Series:
    datasets: list
    slices: list[Entry]
    volume: Entry

    @property
    def study(self) -> str:
        return self.datasets[0].StudyInstanceUID

    @property
    def series(self) -> str:
        return self.datasets[0].SeriesInstanceUID


PEAK_RSS: dict[str, list[float]] = {}  # what a method's `mdm serve` peaked at (VmHWM, MiB), by method


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a process: the most resident memory it ever held."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit(f"no VmHWM for process {pid}")


def cold(site: Site, work: Callable[[Https], None], method: str = "") -> float:
    served = site.serve()
    client = Https(served.url, site.pki)
    try:
        start = time.perf_counter()
        work(client)
        elapsed = time.perf_counter() - start
        PEAK_RSS.setdefault(method, []).append(peak_rss_mib(served.process.pid))
        return elapsed
    finally:
        client.close()
        served.stop()
        shutil.rmtree(served.cache, ignore_errors=True)


def tape_stage(site: Site, series: Series, poll: float) -> float:
    def work(client: Https) -> None:
        status, answer = client.json("POST", "/api/v1/tape/stage", {"files": [{"path": e.lfn} for e in series.slices]})
        if status != 201:
            raise SystemExit(f"stage request: {status} {answer}")
        location = f"/api/v1/tape/stage/{answer['requestId']}"  # type: ignore[index]
        while True:
            status, answer = client.json("GET", location)
            states = {f["state"] for f in answer["files"]}  # type: ignore[index]
            if status != 200 or states & {"FAILED", "CANCELLED"}:
                raise SystemExit(f"stage request: {status} {answer}")
            if states == {"COMPLETED"}:
                return
            time.sleep(poll)

    return cold(site, work, "tape")


def sequential_gets(site: Site, series: Series) -> float:
    def work(client: Https) -> None:
        slices = series.slices[:SEQUENTIAL]
        received = sum(client.get(entry.lfn) for entry in slices)
        expected = sum(entry.size or 0 for entry in slices)
        if received != expected:
            raise SystemExit(f"{len(slices)} GETs: {received} bytes, the catalog says {expected}")

    return cold(site, work, "gets")


def volume_get(site: Site, series: Series) -> float:
    def work(client: Https) -> None:
        received = client.get(series.volume.lfn)
        expected = site.volume(series.volume.guid).size
        if received != expected:
            raise SystemExit(f"3D GET: {received} bytes, the catalog says {expected}")

    return cold(site, work, "3d")


def pacs_series(site: Site, series: Series) -> float:
    with PacsClient(site.peer.pacs_config()) as pacs:
        start = time.perf_counter()
        datasets = list(pacs.get(series.study, series.series))
        elapsed = time.perf_counter() - start
    if len(datasets) != len(series.datasets):
        raise SystemExit(f"C-GET of the series: {len(datasets)} images")
    return elapsed


def pacs_per_sop(site: Site, series: Series) -> float:
    with PacsClient(site.peer.pacs_config()) as pacs:
        start = time.perf_counter()
        count = sum(len(list(pacs.get(series.study, series.series, ds.SOPInstanceUID))) for ds in series.datasets)
        elapsed = time.perf_counter() - start
    if count != len(series.datasets):
        raise SystemExit(f"C-GET per SOP: {count} images")
    return elapsed


def getscu_command(peer: peers.Peer, series: Series, *output: str) -> list[str]:
    return [GETSCU, "-S", "-aet", peer.client_aet, "-aec", peer.aet, "-k", "QueryRetrieveLevel=SERIES",
            "-k", f"StudyInstanceUID={series.study}", "-k", f"SeriesInstanceUID={series.series}",
            *output, peer.host, str(peer.port)]


def getscu(site: Site, series: Series) -> float:
    """getscu writing the series into a directory (as the storage element writes its cache),
    the files counted after the clock stops: a run that moved less does not count."""
    out = Path(tempfile.mkdtemp(dir=site.workdir, prefix="getscu-"))
    try:
        start = time.perf_counter()
        done = subprocess.run(getscu_command(site.peer, series, "-od", str(out)), capture_output=True, text=True,
                              env=peers.peer_env())
        elapsed = time.perf_counter() - start
        received = len(list(out.iterdir()))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0 or received != len(series.datasets):
        raise SystemExit(f"getscu: exit {done.returncode}, {received} of {len(series.datasets)} files: "
                         f"{done.stderr[-1000:]}")
    return elapsed


def getscu_dcm2niix(site: Site, series: Series) -> float:
    """The peers' 3D: getscu into a directory, then dcm2niix of it into one NIfTI volume
    (checked: one .nii of at least the voxels' size)."""
    work = Path(tempfile.mkdtemp(dir=site.workdir, prefix="dcm2niix-"))
    dicom, nifti = work / "dicom", work / "nifti"
    dicom.mkdir()
    nifti.mkdir()
    try:
        start = time.perf_counter()
        fetched = subprocess.run(getscu_command(site.peer, series, "-od", str(dicom)), capture_output=True,
                                 text=True, env=peers.peer_env())
        converted = subprocess.run([DCM2NIIX, "-z", "n", "-b", "n", "-f", "volume", "-o", str(nifti), str(dicom)],
                                   capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        volumes = list(nifti.glob("*.nii"))
        voxels = len(series.datasets) * series.datasets[0].Rows * series.datasets[0].Columns * 2
        if fetched.returncode or converted.returncode or len(volumes) != 1 or volumes[0].stat().st_size < voxels:
            raise SystemExit(f"getscu + dcm2niix: {fetched.returncode}/{converted.returncode}, {volumes}: "
                             f"{converted.stdout[-500:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return elapsed


def key_fetches(site: Site, series: Series) -> float:
    keystore = KeystoreClient.from_config(load_config(site.config))
    start = time.perf_counter()
    for entry in series.slices:
        keystore.fetch_key(key_name(entry.guid, entry.content_version), lambda _key: True)
    return time.perf_counter() - start


REFERENCE, DCMTK, PEERS_3D = "PacsClient.get series", "getscu series", "getscu + dcm2niix (3D)"


def prepare_site(kind: str, workdir: Path, keys: KeyServers, slices: int, size: int, args: argparse.Namespace,
                 seed: str) -> tuple[Site, Series]:
    peer = STARTERS[kind](workdir / "pacs", CLIENT_AET, peers.free_port())
    site = Site(workdir / "site", peer, keys, args.workers, args.threads, args.engine)
    datasets = make_series(slices=slices, size=size, seed=seed)
    start = time.perf_counter()
    register(site.config, datasets)
    print(f"  {kind}: registered {slices} slices of {size}² in {time.perf_counter() - start:.1f} s", flush=True)
    slice_entries, volume = site.entries(datasets)
    return site, Series(datasets, slice_entries, volume)


def first_assembly(site: Site, series: Series) -> tuple[Served, float]:
    """The volume's first GET ever: key born, checksum recorded (not a restage: reported alone)."""
    served = site.serve()
    client = Https(served.url, site.pki)
    try:
        start = time.perf_counter()
        received = client.get(series.volume.lfn)
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    series.volume = site.volume(series.volume.guid)
    if received != series.volume.size:
        raise SystemExit(f"first 3D GET: {received} bytes, the catalog says {series.volume.size}")
    return served, elapsed


def part1(kind: str, workdir: Path, keys: KeyServers, args: argparse.Namespace) -> None:
    site, series = prepare_site(kind, workdir, keys, args.slices, args.size, args, "bench-serve")
    try:
        served, first = first_assembly(site, series)
        served.stop()
        shutil.rmtree(served.cache, ignore_errors=True)
        methods: dict[str, Callable[[Site, Series], float]] = {
            f"SE Tape REST stage ({len(series.slices)})": lambda s, ser: tape_stage(s, ser, args.poll),
            f"SE {min(SEQUENTIAL, len(series.slices))} sequential GETs": sequential_gets,
            "SE 3D GET": volume_get,
            REFERENCE: pacs_series,
            "PacsClient.get per SOP": pacs_per_sop,
            DCMTK: getscu,
            PEERS_3D: getscu_dcm2niix,
            f"key fetch x{len(series.slices)}": key_fetches,
        }
        if args.skip_methods:
            methods = {name: run for name, run in methods.items()
                       if name in (REFERENCE, DCMTK, PEERS_3D, "SE 3D GET")
                       or not any(word in name for word in args.skip_methods)}
        times: dict[str, list[float]] = {name: [] for name in methods}
        failures: list[str] = []
        for round_ in range(args.rounds):
            for name, run in methods.items():
                try:
                    times[name].append(run(site, series))
                except MdmError as exc:  # one failed run is a finding to report, not a lost bench
                    failures.append(f"round {round_ + 1}, {name}: {exc}")
    finally:
        site.peer.stop()
    count = len(series.slices)
    print(f"\nPart 1, PACS: {kind}; {count} slices of {args.size}² ({sum(e.size or 0 for e in series.slices) / MIB:.1f}"
          f" MiB protected), 3D {series.volume.size / MIB:.1f} MiB; cold cache; median of {args.rounds}")
    print(f"  (3D first assembly ever, key born: {first:.2f} s, not in the table)")
    header = f"{'method':28s} {'seconds [min-max]':>21s} {'images/s':>9s} {'x C-GET':>8s} {'x getscu':>9s}"
    print(header)
    print("-" * len(header))
    reference, dcmtk = statistics.median(times[REFERENCE]), statistics.median(times[DCMTK])
    for name, runs in times.items():
        median = statistics.median(runs)
        spread = f"{median:7.2f} [{min(runs):.2f}-{max(runs):.2f}]"
        images = min(SEQUENTIAL, count) if "sequential" in name else count
        print(f"{name:28s} {spread:>21s} {images / median:9.1f} {median / reference:8.2f} {median / dcmtk:9.2f}")
    peers_3d = statistics.median(times[PEERS_3D])
    print(f"  SE 3D GET / (getscu + dcm2niix): {statistics.median(times['SE 3D GET']) / peers_3d:.2f}")
    print("  peak RSS of mdm serve (VmHWM, MiB, max over rounds): "
          + ", ".join(f"{method} {max(values):.0f}" for method, values in PEAK_RSS.items()))
    PEAK_RSS.clear()
    for failure in failures:
        print(f"  FAILED (not in the medians): {failure}")


# -- part 2: warm GETs next to nginx ---------------------------------------------------

# ``user``: started as root, nginx's worker would drop to nobody, who may not read the cache
# (files 0600); as another user the directive is ignored.
NGINX_CONF = """daemon off;
user {user} {group};
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    server {{
        listen {host}:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {ca};
        ssl_verify_client optional;
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
    }}
}}
"""


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    url: str

    def cpu(self) -> float:
        """Master and workers."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return cpu_seconds([self.process.pid, *map(int, children)])

    def stop(self) -> None:
        terminate(self.process)


def start_nginx(prefix: Path, pki: Path, root: Path) -> Nginx:
    prefix.mkdir(parents=True)
    port = peers.free_port()
    host_pair = pki / "hosts" / "storage-element"
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=pwd.getpwuid(os.getuid()).pw_name, group=grp.getgrgid(os.getgid()).gr_name,
                                      prefix=prefix, host=peers.HOST, port=port, cert=host_pair / "cert.pem",
                                      key=host_pair / "key.pem", ca=pki / "ca.pem", root=root))
    log = prefix / "stderr.log"
    with log.open("wb") as out:
        process = subprocess.Popen([NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                                   stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"nginx exited: {log.read_text()} {(prefix / 'error.log').read_text()}")
        try:
            with socket.create_connection((peers.HOST, port), timeout=0.2):
                return Nginx(process, f"https://{peers.HOST}:{port}")
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("nginx did not listen")


def curl_get(url: str, pki: Path, size: int) -> float:
    user = pki / "users" / USER
    command = [CURL, "-sS", "-f", "--http1.1", "--cacert", str(pki / "ca.pem"), "--cert", str(user / "cert.pem"),
               "--key", str(user / "key.pem"), "-o", "/dev/null", "-w", "%{size_download}", url]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or int(done.stdout or 0) != size:
        raise SystemExit(f"curl {url}: exit {done.returncode}, {done.stdout} bytes: {done.stderr}")
    return elapsed


def python_get(url: str, pki: Path, size: int) -> float:
    client = Https(url, pki)
    try:
        start = time.perf_counter()
        received = client.get(urlsplit(url).path)
        elapsed = time.perf_counter() - start
    finally:
        client.close()
    if received != size:
        raise SystemExit(f"http.client {url}: {received} bytes, not {size}")
    return elapsed


def negotiated(url: str, pki: Path) -> str:
    client = Https(url, pki)
    try:
        client.connection.connect()
        return client.cipher()
    finally:
        client.close()


CLIENTS: dict[str, Callable[[str, Path, int], float]] = {"curl": curl_get, "http.client": python_get}


def part2(workdir: Path, keys: KeyServers, args: argparse.Namespace) -> None:
    site, series = prepare_site(args.large_pacs, workdir, keys, args.large_slices, args.large_size, args,
                                "bench-serve-large")
    try:
        served, first = first_assembly(site, series)
    finally:
        site.peer.stop()
    size = series.volume.size or 0
    cached = served.cache / f"{series.volume.guid}.{series.volume.content_version}"
    nginx = None
    try:
        if not cached.is_file() or cached.stat().st_size != size:
            raise SystemExit(f"the staged volume is not at {cached}")
        nginx = start_nginx(workdir / "nginx", site.pki, served.cache)
        urls = {"mdm serve": served.url + series.volume.lfn, "nginx": f"{nginx.url}/{cached.name}"}
        cpu = {"mdm serve": served.cpu, "nginx": nginx.cpu}
        ciphers = {server: negotiated(url, site.pki) for server, url in urls.items()}
        times: dict[tuple[str, str], list[float]] = {}
        cpus: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.gets):
            for client, get in CLIENTS.items():
                for server, url in urls.items():
                    before = cpu[server]()
                    times.setdefault((client, server), []).append(get(url, site.pki, size))
                    cpus.setdefault((client, server), []).append(cpu[server]() - before)
    finally:
        if nginx is not None:
            nginx.stop()
        served.stop()
    print(f"\nPart 2, warm GET of a {size / MIB:.1f} MiB 3D volume ({args.large_slices} slices of "
          f"{args.large_size}², staged from {args.large_pacs} at first GET in {first:.2f} s); "
          f"median of {args.gets} GETs per cell; load average {os.getloadavg()[0]:.1f}")
    for server, cipher in ciphers.items():
        print(f"  {server}: {cipher}")
    header = (f"{'client':12s} {'server':10s} {'seconds [min-max]':>21s} {'MB/s':>8s} {'x nginx':>8s}"
              f" {'server CPU s/GET':>17s} {'CPU x nginx':>12s}")
    print(header)
    print("-" * len(header))
    for client in CLIENTS:
        peer_rate = size / statistics.median(times[(client, "nginx")]) / 1e6
        # CPU as the mean of all GETs: /proc counts in clock ticks (10 ms), too coarse for one GET
        peer_cpu = statistics.mean(cpus[(client, "nginx")])
        for server in urls:
            runs = times[(client, server)]
            median = statistics.median(runs)
            rate = size / median / 1e6
            spread = f"{median:7.3f} [{min(runs):.3f}-{max(runs):.3f}]"
            cpu_mean = statistics.mean(cpus[(client, server)])
            print(f"{client:12s} {server:10s} {spread:>21s} {rate:8.1f} {rate / peer_rate:8.2f}"
                  f" {cpu_mean:17.3f} {cpu_mean / peer_cpu:12.2f}")


# -- part 3: peak RSS while staging and serving a 1 GiB volume --------------------------

def part3(workdir: Path, keys: KeyServers, args: argparse.Namespace) -> None:
    """A series of ``--rss-slices`` × ``--rss-size``² int16 (512 × 1024²: 1 GiB of voxels)
    registered, then its 3D staged and served by a new ``mdm serve``: its first assembly
    (key born), then a cold restage (empty cache); VmHWM of the server after each, the bytes
    received checked against the catalog."""
    site, series = prepare_site(args.large_pacs, workdir, keys, args.rss_slices, args.rss_size, args,
                                "bench-serve-rss")
    try:
        served, first = first_assembly(site, series)
        first_peak = peak_rss_mib(served.process.pid)
        served.stop()
        shutil.rmtree(served.cache, ignore_errors=True)
        restage = volume_get(site, series)
        restage_peak = max(PEAK_RSS.pop("3d"))
    finally:
        site.peer.stop()
    size = (series.volume.size or 0) / MIB
    print(f"\nPart 3, a {size:.0f} MiB 3D volume ({args.rss_slices} slices of {args.rss_size}², {args.large_pacs}):"
          f" peak RSS of mdm serve (VmHWM)")
    print(f"  first assembly (key born): {first:6.2f} s, VmHWM {first_peak:6.0f} MiB")
    print(f"  cold restage and GET:      {restage:6.2f} s, VmHWM {restage_peak:6.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pacs", nargs="+", choices=list(STARTERS), default=["orthanc", "embedded"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, default=100, help="part 1 series: slices")
    parser.add_argument("--size", type=int, default=256, help="part 1 series: rows and columns")
    parser.add_argument("--poll", type=float, default=0.1, help="Tape REST status poll interval, seconds")
    parser.add_argument("--large-pacs", choices=list(STARTERS), default="orthanc")
    parser.add_argument("--large-slices", type=int, default=200, help="part 2 series: slices")
    parser.add_argument("--large-size", type=int, default=512, help="part 2 series: rows and columns")
    parser.add_argument("--gets", type=int, default=5, help="part 2: GETs per client and server")
    parser.add_argument("--workers", type=int, default=CacheConfig().workers, help="[cache] workers")
    parser.add_argument("--threads", type=int, default=ServerConfig().threads, help="[server] threads")
    parser.add_argument("--rss-slices", type=int, default=512, help="part 3 series: slices")
    parser.add_argument("--rss-size", type=int, default=1024, help="part 3 series: rows and columns")
    parser.add_argument("--skip", choices=["part1", "part2", "part3"], nargs="+", default=[],
                        help="leave parts out")
    parser.add_argument("--skip-methods", nargs="+", default=[], metavar="WORD",
                        help="part 1: leave out the methods whose name has WORD (e.g. 'sequential' 'per SOP' at "
                             "1000 slices); the references and the 3D GET always run")
    parser.add_argument("--engine", choices=["pynetdicom", "dcmtk"], default=default_engine(),
                        help="[pacs] engine of the storage element (default: as a site config without one)")
    args = parser.parse_args()
    needed = (GETSCU, DCM2NIIX, CURL, peers.ORTHANC) + (() if "part2" in args.skip else (NGINX,))
    for program in needed:
        if not os.access(program, os.X_OK):
            raise SystemExit(f"missing program: {program}")
    print(f"code under test: {Path(srm_dicom.__file__).parent}")
    print(f"storage element: [pacs] engine = {args.engine}, [cache] workers = {args.workers}, "
          f"[server] threads = {args.threads}; "
          f"client certificate of {USER}; {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        keys = KeyServers(workdir)
        try:
            if "part1" not in args.skip:
                for kind in args.pacs:
                    part1(kind, workdir / kind, keys, args)
            if "part2" not in args.skip:
                part2(workdir / "large", keys, args)
            if "part3" not in args.skip:
                part3(workdir / "rss", keys, args)
        finally:
            keys.close()


if __name__ == "__main__":
    main()
