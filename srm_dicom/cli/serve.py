"""``mdm serve``: the grid side's HTTPS endpoint (WebDAV, WLCG Tape REST), staging from the PACS."""

from __future__ import annotations

import argparse
import gc
import threading

from srm_dicom.catalog import open_catalog
from srm_dicom.config import config_file, load_config
from srm_dicom.errors import ConfigError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.logs import configure as configure_logs
from srm_dicom.logs import log_requests
from srm_dicom.private_files import check_site
from srm_dicom.server.app import StorageElement, make_server
from srm_dicom.shutdown import stop_on_signals
from srm_dicom.stager import Stager


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve the catalog over HTTPS: WebDAV, WLCG Tape REST, staging from the PACS",
        description=(
            "Run the storage element: GET/HEAD/PROPFIND of /grid/<vo>/mdm/... and /guid/<uuid> "
            "(read-only), files staged from the PACS on first read (503 with Retry-After while "
            "that takes longer than [cache] wait_timeout), and the WLCG Tape REST API under "
            "/api/v1/tape. Clients authenticate with an X.509 certificate or proxy, or a WLCG "
            "bearer token. Prints 'serving https://HOST:PORT' once listening; runs until Ctrl-C."
        ),
        epilog="example: curl --cacert ca.pem --cert bob/cert.pem --key bob/key.pem https://localhost:2880/grid/demo/mdm/",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info; -vv: debug")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_site(config, config_file(args.config))
    configure_logs(config.log.format, args.verbose)
    stop_logging = log_requests()
    catalog = open_catalog(config)
    stager = Stager(config, catalog, KeystoreClient.from_config(config))
    app = StorageElement(config, catalog, stager)  # listens to events before the stager's first
    server = make_server(config, app)
    # Start-up's objects (the modules, pydicom's dictionaries, the application) out of the
    # garbage collector: every full collection walked all of them, ~70 ms, once in two QIDO-RS
    # /studies answers at 10^5 images (README, "QIDO-RS at scale").
    gc.collect()
    gc.freeze()
    stop = stop_on_signals()
    stager.start()
    try:
        try:
            server.prepare()
        except OSError as exc:  # cheroot wraps the bind error: "No socket could be created -- (...)"
            reason = "address already in use" if "in use" in str(exc) else str(exc)
            raise ConfigError(f"cannot listen on {config.server.host}:{config.server.port}: {reason}") from None
        host, port = server.bind_addr[:2]
        print(f"serving https://{host}:{port}", flush=True)
        thread = threading.Thread(target=server.serve, name="https", daemon=True)
        thread.start()
        stop.wait()
        server.stop()
        thread.join(timeout=10)
    finally:
        stager.stop()
        app.close()
        stop_logging()
        catalog.close()
    return 0
