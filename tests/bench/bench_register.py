"""Registration rate of ``mdm register`` next to DCMTK ``storescu`` sending the same files.

Run: python tests/bench/bench_register.py [--pacs orthanc embedded dcmqrscp] [--rounds 3]
                                        [--slices 100 1000] [--no-vendor]

The peer is DCMTK's /usr/bin/storescu (not the pyenv shim of pynetdicom's app) storing
the same files into the same kind of PACS: the C-STORE alone, the floor of what a
registration that stores into the PACS can cost. Measured, each against a fresh PACS
(new process, empty storage) and, for mdm, a fresh catalog:

- storescu: the whole process, files given in sorted order, TCP_NODELAY=1.
- mdm register DIR: the whole CLI process, as a user runs it, with ``[pacs] engine = "dcmtk"``
  (a site's default where DCMTK is installed: storescu sends the batches the pipeline
  prepared); "mdm (pynetdicom)" the same with engine "pynetdicom" (the kept association).
- Registrar pipeline (and "Registrar (pynetd.)"): ``Registrar.register_many(paths)`` in
  this process, after config, catalog and imports are loaded: what the CLI does with the files. The CLI time minus
  this is the CLI's start-up (interpreter, imports, config, catalog open).

Every timed run counts only if the PACS holds every image of the set afterwards: Orthanc's
own instance count (``GET /statistics``) for Orthanc, C-FIND of each series for the others.

File sets: the vendor series of dicom2nifti, one file per SOP Instance UID (the
compressed variants of the generic series share UIDs; the uncompressed file is kept when
there is one, so the set holds uncompressed images plus a few JPEG 2000 ones), and a
synthetic CT series (steadier: more and larger images). dcmqrscp accepts uncompressed
syntaxes only, so against it both tools get the uncompressed files of the vendor set.
Each figure is the median of ``--rounds`` runs; the tools alternate within a round so
load from other processes hits all of them.
"""

from __future__ import annotations

import argparse
import compileall
import functools
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

# The tree this script lives in, ahead of whatever the shared interpreter has installed in
# editable mode (a CI run elsewhere re-points it), here and in the mdm subprocesses.
ROOT = Path(__file__).resolve().parents[2]
TREE = [str(ROOT / "tests"), str(ROOT), str(ROOT / "plugins")]
sys.path[:0] = TREE
os.environ["PYTHONPATH"] = os.pathsep.join([*TREE[1:], os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

import peers  # noqa: E402
import srm_dicom  # noqa: E402
from sites import mdm, write_site_config  # noqa: E402
from srm_dicom.catalog import Outcome, open_catalog  # noqa: E402
from srm_dicom.config import load_config  # noqa: E402
from srm_dicom.keystore.client import KeystoreClient  # noqa: E402
from srm_dicom.keystore.local import LocalKeyServers  # noqa: E402
from srm_dicom.pacs.client import PacsClient  # noqa: E402
from srm_dicom.pki import init_pki  # noqa: E402
from srm_dicom.register import Registrar  # noqa: E402
from srm_dicom.synthetic import make_series  # noqa: E402

STORESCU = "/usr/bin/storescu"
CLIENT_AET = "MDM_BENCH"
STARTERS: dict[str, Callable[[Path, str, int], peers.Peer]] = {
    "orthanc": peers.start_orthanc,
    "embedded": peers.start_embedded,
    "dcmqrscp": peers.start_dcmqrscp,
}
# storescu proposes one compressed syntax per run, chosen by its -x option.
STORESCU_SYNTAX_OPTION = {
    JPEG2000Lossless: "-xv",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    RLELossless: "-xr",
}


@dataclass
class FileSet:
    """Files copied into one flat directory, named in the order both tools send them."""

    name: str
    directory: Path
    files: list[Path]
    series: Counter[tuple[str, str]]  # (study, series) -> images: what the PACS must hold after
    compressed_syntax: str | None


def _file_set(name: str, directory: Path, sources: list[Path]) -> FileSet:
    directory.mkdir(parents=True)
    files, series, compressed = [], Counter[tuple[str, str]](), set()
    for index, source in enumerate(sources):
        target = directory / f"{index:04d}.dcm"
        shutil.copyfile(source, target)
        ds = pydicom.dcmread(target, stop_before_pixels=True)
        series[(ds.StudyInstanceUID, ds.SeriesInstanceUID)] += 1
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            compressed.add(ds.file_meta.TransferSyntaxUID)
        files.append(target)
    if len(compressed) > 1:
        raise SystemExit(f"{name}: storescu proposes one compressed syntax per run, found {compressed}")
    return FileSet(name, directory, files, series, next(iter(compressed), None))


def vendor_sources(vendor: Path, uncompressed_only: bool) -> list[Path]:
    """One DICOM file per SOP Instance UID, preferring an uncompressed one."""
    candidates = []
    for path in sorted(vendor.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        compressed = ds.file_meta.TransferSyntaxUID.is_compressed
        if not (compressed and uncompressed_only):
            candidates.append((compressed, str(path), ds.SOPInstanceUID))
    chosen: dict[str, Path] = {}
    for _, path, sop in sorted(candidates):
        chosen.setdefault(sop, Path(path))
    return sorted(chosen.values())


def synthetic_sources(directory: Path, slices: int, size: int) -> list[Path]:
    directory.mkdir(parents=True)
    paths = []
    for index, ds in enumerate(make_series(slices=slices, size=size, seed="bench-register")):
        path = directory / f"{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _serve_keys(pki: Path, state: Path, urls: Connection, stop: Event) -> None:
    with LocalKeyServers(pki, state) as servers:
        urls.send(servers.urls)
        stop.wait()


class KeyServers:
    """The demo PKI's three key servers, in a process of their own so their TLS work does not
    share a GIL with the Registrar pipeline; one set serves the whole run (GUIDs never repeat)."""

    def __init__(self, workdir: Path) -> None:
        self.pki = workdir / "pki"
        init_pki(self.pki)
        receiver, sender = multiprocessing.Pipe(duplex=False)
        self._stop = multiprocessing.Event()
        self._process = multiprocessing.Process(
            target=_serve_keys, args=(self.pki, workdir / "keystores", sender, self._stop), daemon=True
        )
        self._process.start()
        if not receiver.poll(30):
            raise SystemExit("key servers did not start")
        self.urls: list[str] = receiver.recv()

    def close(self) -> None:
        self._stop.set()
        self._process.join(timeout=15)


class PeerPool:
    """A fresh PACS per measurement; stopping one (Orthanc takes seconds) overlaps the next."""

    def __init__(self, workdir: Path, kind: str) -> None:
        self._workdir, self._start, self._count = workdir, STARTERS[kind], 0
        self._stopper = ThreadPoolExecutor(max_workers=4)

    @contextmanager
    def fresh(self) -> Iterator[peers.Peer]:
        self._count += 1
        peer = self._start(self._workdir / f"peer{self._count}", CLIENT_AET, peers.free_port())
        try:
            yield peer
        finally:
            self._stopper.submit(peer.stop)

    def close(self) -> None:
        self._stopper.shutdown(wait=True)


def check_pacs_holds(peer: peers.Peer, files: FileSet) -> None:
    """A run counts only if the PACS holds every image of the set: Orthanc's own count of
    instances (each measurement has a fresh, empty Orthanc), C-FIND of each series otherwise."""
    expected = sum(files.series.values())
    if peer.http_port is not None:
        with urllib.request.urlopen(f"http://{peer.host}:{peer.http_port}/statistics", timeout=30) as answer:
            found = json.load(answer)["CountInstances"]
        if found != expected:
            raise SystemExit(f"{peer.name}: holds {found} instances of the {expected} sent")
        return
    with PacsClient(peer.pacs_config()) as pacs:
        for (study, series), count in files.series.items():
            found = len(pacs.find_instances(study, series))
            if found != count:
                raise SystemExit(f"{peer.name}: {found} of {count} images of a series after the run")


def run_storescu(peer: peers.Peer, files: FileSet, workdir: Path, keys: KeyServers) -> float:
    options = ["-R"]  # propose only the contexts the files need, as PacsClient does
    if files.compressed_syntax:
        options.append(STORESCU_SYNTAX_OPTION[files.compressed_syntax])
    command = [STORESCU, *options, "-aet", CLIENT_AET, "-aec", peer.aet, peer.host, str(peer.port)]
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    done = subprocess.run([*command, *map(str, files.files)], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"storescu failed ({done.returncode}): {done.stderr[-1000:]}")
    return elapsed


def run_mdm(peer: peers.Peer, files: FileSet, workdir: Path, keys: KeyServers, engine: str = "pynetdicom") -> float:
    config = write_site_config(workdir, peer, keys, engine=engine)  # type: ignore[arg-type]  (urls and pki suffice)
    start = time.perf_counter()
    done = mdm("register", str(files.directory), config=config, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or not done.stdout.startswith(f"{len(files.files)} registered,"):
        raise SystemExit(f"mdm register failed ({done.returncode}): {done.stdout} {done.stderr[-1000:]}")
    return elapsed


def run_registrar(
    peer: peers.Peer, files: FileSet, workdir: Path, keys: KeyServers, engine: str = "pynetdicom"
) -> float:
    config = load_config(write_site_config(workdir, peer, keys, engine=engine))  # type: ignore[arg-type]
    catalog = open_catalog(config)
    try:
        with PacsClient(config.pacs) as pacs:
            registrar = Registrar(config, catalog, pacs, KeystoreClient.from_config(config), pool=True)
            start = time.perf_counter()
            outcomes = [result.outcome for result in registrar.register_many(files.files, store_in_pacs=True)]
            elapsed = time.perf_counter() - start
    finally:
        catalog.close()
    if outcomes != [Outcome.ADDED] * len(files.files):
        raise SystemExit(f"Registrar: {Counter(outcomes)} instead of {len(files.files)} added")
    return elapsed


# [pacs] engine "dcmtk" (a site's default where DCMTK is installed) has storescu send the batches
# the pipeline prepared; "pynetdicom" sends them over the kept association.
TOOLS: dict[str, Callable[[peers.Peer, FileSet, Path, KeyServers], float]] = {
    "storescu": run_storescu,
    "mdm register": functools.partial(run_mdm, engine="dcmtk"),
    "Registrar pipeline": functools.partial(run_registrar, engine="dcmtk"),
    "mdm (pynetdicom)": run_mdm,
    "Registrar (pynetd.)": run_registrar,
}
IN_PROCESS = ("Registrar pipeline", "Registrar (pynetd.)")


def measure(
    pool: PeerPool, files: FileSet, rounds: int, workdir: Path, keys: KeyServers, tools: list[str]
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {tool: [] for tool in tools}
    for round_ in range(rounds):
        for tool in tools:
            run = TOOLS[tool]
            with pool.fresh() as peer:
                place = workdir / f"{files.name}-{list(TOOLS).index(tool)}-{round_}"  # a catalog per run
                times[tool].append(run(peer, files, place, keys))
                check_pacs_holds(peer, files)
    return times


def startup_time(rounds: int) -> float:
    """``mdm --version``: interpreter, pyenv shim and the imports of every command module."""
    runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        done = mdm("--version")
        runs.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"mdm --version failed: {done.stderr}")
    return statistics.median(runs)


def report(kind: str, rounds: int, results: list[tuple[FileSet, dict[str, list[float]]]]) -> None:
    print(f"\nPACS: {kind}  (median of {rounds}; seconds [min-max], images/s, ratio to storescu)")
    header = f"{'file set':28s} {'images':>6s}  {'tool':20s} {'seconds':>19s} {'images/s':>9s} {'ratio':>6s}"
    print(header)
    print("-" * len(header))
    for files, times in results:
        count = len(files.files)
        peer_rate = count / statistics.median(times["storescu"])
        for tool, runs in times.items():
            median = statistics.median(runs)
            spread = f"{median:6.2f} [{min(runs):.2f}-{max(runs):.2f}]"
            rate = count / median
            print(f"{files.name:28s} {count:6d}  {tool:20s} {spread:>19s} {rate:9.1f} {rate / peer_rate:6.2f}")
        if "Registrar pipeline" not in times:
            continue
        startup = statistics.median(times["mdm register"]) - statistics.median(times["Registrar pipeline"])
        print(f"{files.name:28s} {count:6d}  {'CLI start-up':15s} {startup:6.2f}   (mdm register - Registrar pipeline)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pacs", nargs="+", choices=list(STARTERS), default=["orthanc"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 1000],
                        help="synthetic series: slices, one set each (default: 100 1000)")
    parser.add_argument("--size", type=int, default=256, help="synthetic series: rows and columns")
    parser.add_argument("--no-vendor", action="store_true", help="the synthetic series only")
    parser.add_argument("--cli-only", action="store_true",
                        help="storescu and mdm register only, not the in-process pipeline (e.g. for an older tree: "
                             "copy this script into it)")
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("SRM_DICOM_DATA", "/work/shared/data")),
        help="data directory holding dicom2nifti/ (default: $SRM_DICOM_DATA or /work/shared/data)",
    )
    args = parser.parse_args()
    for program in (STORESCU, shutil.which("mdm")):
        if not program or not os.access(program, os.X_OK):
            raise SystemExit(f"missing program: {program or 'mdm'}")
    vendor = args.data / "dicom2nifti"
    if not vendor.is_dir():
        raise SystemExit(f"vendor data not found at {vendor}")
    # Byte-compiled as an installed package is: with PYTHONDONTWRITEBYTECODE set (as on the
    # shared machine) every mdm process would otherwise compile the whole tree at start-up.
    for package in ("srm_dicom", "plugins"):
        compileall.compile_dir(ROOT / package, quiet=1)
    with tempfile.TemporaryDirectory(prefix="bench-register-") as tmp:
        workdir = Path(tmp)
        synthetic = [
            _file_set(f"synthetic CT {slices}x{args.size}^2", workdir / f"synthetic-{slices}",
                      synthetic_sources(workdir / f"synthetic-src-{slices}", slices, args.size))
            for slices in args.slices
        ]
        print(f"code under test: {Path(srm_dicom.__file__).parent}")
        print(f"mdm --version (CLI start-up alone): {startup_time(args.rounds):.2f} s")
        tools = [tool for tool in TOOLS if not (args.cli_only and tool in IN_PROCESS)]
        keys = KeyServers(workdir)
        try:
            for kind in args.pacs:
                uncompressed_only = kind == "dcmqrscp"
                sets = [] if args.no_vendor else [_file_set(
                    "vendor (uncompressed)" if uncompressed_only else "vendor (distinct SOP UIDs)",
                    workdir / f"vendor-{kind}", vendor_sources(vendor, uncompressed_only),
                )]
                pool = PeerPool(workdir / kind, kind)
                try:
                    results = [(files, measure(pool, files, args.rounds, workdir / kind, keys, tools))
                               for files in (*sets, *synthetic)]
                finally:
                    pool.close()
                report(kind, args.rounds, results)
        finally:
            keys.close()


if __name__ == "__main__":
    main()
