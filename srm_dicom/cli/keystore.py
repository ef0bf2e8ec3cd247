"""``mdm keystore serve``: run one key server (start three, one per conf/keystore-N.toml)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from srm_dicom.keystore.server import KeystoreServerConfig, make_server
from srm_dicom.logs import configure as configure_logs
from srm_dicom.private_files import check_private

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "keystore",
        help="key servers holding the Shamir shares of file keys",
        description="Key servers (the seeds' Hydra): each keeps one share of every file key.",
    )
    commands = parser.add_subparsers(dest="keystore_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve one key server over HTTPS with mutual TLS",
        description=(
            "Serve one key server. Prints 'serving https://HOST:PORT' once listening "
            "(port 0 in the config picks a free port). Stop with Ctrl-C or SIGTERM."
        ),
    )
    serve.add_argument(
        "--config",
        dest="keystore_config",
        required=True,
        type=Path,
        help="this server's config, e.g. conf/keystore-1.toml",
    )
    serve.add_argument("-v", "--verbose", action="count", default=0, help="log every request")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    config = KeystoreServerConfig.load(args.keystore_config)
    check_private(config.database, "the key share database")
    check_private(config.key, "the private key")
    configure_logs(config.log_format, args.verbose)
    server = make_server(config)
    try:
        server.prepare()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc.strerror)
        return 1
    host, port = server.bind_addr[:2]
    # systemd stops services with SIGTERM: leave through the finally below, exit status 0.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"serving https://{host}:{port}", flush=True)
    try:
        server.serve()
    finally:
        server.stop()
    return 0
