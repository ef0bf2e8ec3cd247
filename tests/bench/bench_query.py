"""Metadata search latency at 10^5 registered images: JSON API and QIDO-RS over HTTPS.

Run: python tests/bench/bench_query.py [--studies 1000] [--calls 50] [--backend sqlite|postgresql]

A catalog of studies x 10 series x 10 slices (default 10^5 slices, one patient per study;
an SQLite file, or a PostgreSQL database of its own on ``--postgres``, dropped after) is
filled in the rows ``register_image`` writes (the bulk fill of tests/bench/bench_catalog.py:
executemany, COPY), then served by the real storage element (WSGI app behind cheroot
HTTPS, demo PKI) in this process. Bob (a physician: "all" rights on every image)
asks over one keep-alive TLS connection:

- selective: one patient's images (100): ``PatientName="DOE^PATIENT<i>"`` at the JSON
  API, ``/dicom-web/studies?PatientName=…`` and its instances at QIDO-RS;
- broad: ``Modality=CT`` (every image; the first 1000 returned) at the JSON API,
  ``/dicom-web/instances?limit=1000`` and ``/dicom-web/studies`` (every image read,
  rights checked and aggregated into 10^3 studies) at QIDO-RS.

The peer is the same search in the same process without HTTP (``srm_dicom.query.find``
on the catalog, rights included; for ``/studies``, QIDO-RS's own aggregation of the
studies, counted in the catalog): the ratio is what HTTPS, routing and JSON cost on top.
The issue asks for ``/studies`` unfiltered at 10^5 images under 300 ms (README, "QIDO-RS at scale").
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import random
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlencode

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins"), str(Path(__file__).resolve().parent)]

from bench_catalog import SERIES, SLICES, Images, bulk_fill, postgres_database  # noqa: E402

import srm_dicom  # noqa: E402
from srm_dicom.catalog import open_catalog  # noqa: E402
from srm_dicom.config import parse_config  # noqa: E402
from srm_dicom.identity import VoMap  # noqa: E402
from srm_dicom.keystore.client import KeystoreClient  # noqa: E402
from srm_dicom.pki import init_pki  # noqa: E402
from srm_dicom.query import DEFAULT_ATTRIBUTES, find, parse  # noqa: E402
from srm_dicom.server.app import StorageElement, make_server  # noqa: E402
from srm_dicom.server.qido import Qido, parse_search  # noqa: E402
from srm_dicom.stager import Stager  # noqa: E402


def site_config(directory: Path, pki: Path, url: str | None):  # type: ignore[no-untyped-def]
    host = pki / "hosts" / "storage-element"
    return parse_config(
        {
            "site": {"vo": "demo", "secret": "bench site secret, not for production"},
            "catalog": {"backend": "postgresql", "url": url} if url else {"backend": "sqlite", "url": "catalog.db"},
            "keystore": {"urls": [f"https://127.0.0.1:{p}" for p in (1, 2, 3)],  # never asked: nothing staged
                         "ca": str(pki / "ca.pem"), "cert": str(pki / "service" / "cert.pem"),
                         "key": str(pki / "service" / "key.pem")},
            "server": {"port": 0, "cert": str(host / "cert.pem"), "key": str(host / "key.pem"), "threads": 4},
            "identity": {"vomap": str(pki / "vomap.toml"), "ca": str(pki / "ca.pem")},
            "cache": {"dir": "cache"},
        },
        directory,
    )


class Client:
    """One keep-alive HTTPS connection as a demo user."""

    def __init__(self, port: int, pki: Path, user: str) -> None:
        context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        context.load_cert_chain(pki / "users" / user / "cert.pem", pki / "users" / user / "key.pem")
        self.connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=300)

    def connect(self) -> None:
        """A fresh connection, handshake done and the catalog's pages warm."""
        self.connection.close()
        self.get("/api/v1/metadata?q=Modality%3DCT&limit=10")

    def get(self, path: str) -> bytes:
        self.connection.request("GET", path)
        response = self.connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"GET {path}: {response.status} {body[:200]!r}")
        return body


def timed(calls: list[Callable[[], object]]) -> tuple[float, float, float]:
    """Median and p99 latency in ms, and the mean number of results."""
    times, sizes = [], []
    for call in calls:
        start = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - start) * 1e3)
        sizes.append(len(result) if hasattr(result, "__len__") else 1)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))], statistics.mean(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=1000, help=f"studies of {SERIES}x{SLICES} images")
    parser.add_argument("--calls", type=int, default=50, help="calls per selective search")
    parser.add_argument("--broad-calls", type=int, default=10, help="calls per broad search")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL server (a database with admin rights to create and drop others)")
    args = parser.parse_args()
    print(f"code under test: {Path(srm_dicom.__file__).parent}")
    with tempfile.TemporaryDirectory(prefix="bench-query-", dir="/tmp") as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        pki = directory / "pki"
        init_pki(pki)
        url = stack.enter_context(postgres_database(args.postgres, "query")) if args.backend == "postgresql" else None
        config = site_config(directory / "site", pki, url)
        open_catalog(config).close()
        seconds = bulk_fill(config, Images(config), args.studies)
        images = args.studies * SERIES * SLICES
        print(f"catalog: {images:,} images bulk-filled in {seconds:.1f} s")
        catalog = open_catalog(config)
        stager = Stager(config, catalog, KeystoreClient.from_config(config))
        app = StorageElement(config, catalog, stager)
        server = make_server(config, app)
        qido = Qido(app.service, lambda environ: "https://127.0.0.1")
        gc.collect()
        gc.freeze()  # as mdm serve does (srm_dicom/cli/serve.py)
        server.prepare()
        threading.Thread(target=server.serve, daemon=True).start()
        identity = VoMap.load(pki / "vomap.toml").identity("/C=XX/O=srm-dicom/CN=bob")
        bob = Client(server.bind_addr[1], pki, "bob")
        rng = random.Random(7)
        patients = [f"DOE^PATIENT{rng.randrange(args.studies)}" for _ in range(args.calls)]
        select = ",".join(a.keyword for a in DEFAULT_ATTRIBUTES)

        def api(q: str, limit: int = 1000) -> Callable[[], object]:
            return lambda: bob.get("/api/v1/metadata?" + urlencode({"q": q, "select": select, "limit": limit}))

        def direct(q: str, limit: int = 1000) -> Callable[[], object]:
            return lambda: find(catalog, identity, parse(q), DEFAULT_ATTRIBUTES, limit)

        cases: dict[str, tuple[list[Callable[[], object]], list[Callable[[], object]]]] = {
            "selective: JSON API, one patient": (
                [api(f'PatientName="{p}"') for p in patients], [direct(f'PatientName="{p}"') for p in patients]),
            "selective: QIDO /studies?PatientName": (
                [lambda p=p: bob.get(f"/dicom-web/studies?PatientName={quote(p)}") for p in patients],
                [direct(f'PatientName="{p}"') for p in patients]),
            "selective: QIDO /instances?PatientName": (
                [lambda p=p: bob.get(f"/dicom-web/instances?PatientName={quote(p)}") for p in patients],
                [direct(f'PatientName="{p}"') for p in patients]),
            "broad: JSON API, Modality=CT (1000)": (
                [api("Modality=CT")] * args.broad_calls, [direct("Modality=CT")] * args.broad_calls),
            "broad: QIDO /instances?limit=1000": (
                [lambda: bob.get("/dicom-web/instances?limit=1000")] * args.broad_calls,
                [direct("")] * args.broad_calls),
            f"broad: QIDO /studies (all {images:,})": (
                [lambda: bob.get("/dicom-web/studies")] * args.broad_calls,
                [lambda: qido._results(parse_search("/dicom-web/studies", ""), identity, "https://127.0.0.1")]
                * args.broad_calls),
        }
        print(f"backend: {args.backend}")
        print(f"\nlatency in ms at {images:,} images (bob, 'all' rights), median and p99; peer: the same search"
              " in process, no HTTP")
        header = f"{'search':42s} {'calls':>5s} | {'HTTPS med':>9s} {'p99':>8s} | {'peer med':>8s} {'p99':>8s}" \
                 f" | {'ratio':>5s}"
        print(header)
        print("-" * len(header))
        for name, (over_https, in_process) in cases.items():
            # A new connection for each case: cheroot closes one left idle while the peer ran.
            bob.connect()
            med, p99, _ = timed(over_https)
            peer_med, peer_p99, _ = timed(in_process)
            print(f"{name:42s} {len(over_https):5d} | {med:9.1f} {p99:8.1f} | {peer_med:8.1f} {peer_p99:8.1f}"
                  f" | {med / peer_med:5.1f}")
        server.stop()
        catalog.close()


if __name__ == "__main__":
    main()
