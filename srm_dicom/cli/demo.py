"""``mdm demo``: run the storage element on loopback with a synthetic series."""

from __future__ import annotations

import argparse
from pathlib import Path

from srm_dicom.demo import run_demo


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="run everything on loopback with a synthetic series (no setup)",
        description=(
            "Run the whole storage element on loopback, with no setup and no real data:\n"
            "  - a demo PKI in DIR: a CA, host certificates, the storage element's service identity\n"
            "    and five users (alice register, bob physician, carol mia, dave VO member, eve\n"
            "    another VO), each with users/NAME/cert.pem, key.pem and a client.toml;\n"
            "  - three key servers (mutual TLS; any 2 of the 3 shares rebuild a file key);\n"
            "  - the embedded PACS, holding a built-in synthetic series (fake patient);\n"
            "  - that series registered: anonymized, encrypted, keys split over the key servers,\n"
            "    cataloged as slices and a 3D volume;\n"
            "  - the HTTPS storage element (WebDAV, WLCG Tape REST, metadata search, QIDO-RS),\n"
            "    staging from the PACS on demand, and the DICOM push listener.\n"
            "It then prints the namespace and ready-to-paste commands with real names (curl and\n"
            "mdm decrypt, mdm get, gfal-copy, rclone, storescu), and stays in the foreground until\n"
            "Ctrl-C, which stops everything it started. The config it runs with is DIR/mdm.toml:\n"
            "MDM_CONFIG=DIR/mdm.toml mdm ls from another shell lists what it registered. Running it\n"
            "again in the same DIR keeps the site secret, so the names stay the same."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("mdm-demo"), metavar="DIR",
        help="where the demo keeps its config, catalog and PACS storage (default: ./mdm-demo)",
    )
    parser.set_defaults(handler=lambda args: run_demo(args.workdir))
