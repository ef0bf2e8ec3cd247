"""``mdm pacs``: run the embedded PACS, or check that the configured PACS answers."""

from __future__ import annotations

import argparse
import signal

from srm_dicom.config import load_config


def _serve(args: argparse.Namespace) -> int:
    from srm_dicom.pacs.server import EmbeddedPacs

    pacs = EmbeddedPacs.from_config(load_config(args.config))
    s = pacs.settings
    # systemd and test harnesses stop with SIGTERM: stop as on Ctrl-C, index closed.
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"embedded PACS {s.aet}@{s.host}:{s.port}, storage {pacs.storage}", flush=True)
    try:
        pacs.serve_forever()
    except KeyboardInterrupt:
        print(f"{pacs.name}: stopped", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _echo(args: argparse.Namespace) -> int:
    from srm_dicom.pacs.client import PacsClient

    config = load_config(args.config).pacs
    with PacsClient(config) as pacs:
        pacs.echo()
    print(f"{pacs.name}: ok")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pacs",
        help="run the embedded PACS, or check the configured PACS",
        description=(
            "DICOM networking: 'serve' runs the embedded Query/Retrieve PACS of "
            "[embedded_pacs]; 'echo' sends a C-ECHO to the PACS of [pacs]."
        ),
    )
    commands = parser.add_subparsers(dest="pacs_command", metavar="SUBCOMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the embedded PACS in the foreground until Ctrl-C",
        description=(
            "Run the embedded DICOM PACS (C-ECHO, C-STORE, C-FIND at PATIENT/STUDY/SERIES/"
            "IMAGE level in Study Root and Patient Root, C-GET, C-MOVE) with the AE title, "
            "address, storage directory and C-MOVE destinations of the config's "
            "[embedded_pacs] section. Images are kept as received; sending an image again "
            "replaces it. Stops on Ctrl-C."
        ),
    )
    serve.set_defaults(handler=_serve)
    echo = commands.add_parser(
        "echo",
        help="C-ECHO the configured PACS (exit 0 if it answers, 4 if not)",
        description=(
            "Open an association with the PACS of the config's [pacs] section, calling "
            "with its calling_aet, and send a C-ECHO. Prints 'ok' or one line saying why "
            "not (down, association rejected, timed out); exit code 0 or 4."
        ),
    )
    echo.set_defaults(handler=_echo)
