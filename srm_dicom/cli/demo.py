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
            "Start the embedded PACS, load a built-in synthetic series (fake patient, no real "
            "data), register it, start the push listener and show the namespace. Stays in the "
            "foreground until Ctrl-C, then stops everything it started. The config it runs with "
            "is written to DIR/mdm.toml: use MDM_CONFIG=DIR/mdm.toml mdm ... from another shell."
        ),
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("mdm-demo"), metavar="DIR",
        help="where the demo keeps its config, catalog and PACS storage (default: ./mdm-demo)",
    )
    parser.set_defaults(handler=lambda args: run_demo(args.workdir))
