"""``mdm listen``: receive DICOM pushes (C-STORE) and register each image."""

from __future__ import annotations

import argparse

from srm_dicom.catalog import open_catalog
from srm_dicom.config import config_file, load_config
from srm_dicom.listen import PushListener
from srm_dicom.logs import configure as configure_logs
from srm_dicom.private_files import check_site
from srm_dicom.shutdown import stop_on_signals


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "listen",
        help="receive DICOM pushes and register them (C-STORE SCP)",
        description=(
            "Run a DICOM storage SCP with the [listen] AE title and port of the config. Every "
            "image received is registered like 'mdm register' does; with store_to_pacs = true it "
            "is also stored into the PACS (turn it off when the PACS itself pushes). Runs until "
            "interrupted; prints a summary at the end."
        ),
        epilog="example: storescu -aec MDM_PUSH 127.0.0.1 11112 scans/*.dcm",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: one line per image; -vv: debug")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    check_site(config, config_file(args.config))
    configure_logs(config.log.format, args.verbose)
    catalog = open_catalog(config)
    stop = stop_on_signals()
    try:
        with PushListener(config, catalog) as listener:
            host, port = listener.address
            target = "also stored into the PACS" if config.listen.store_to_pacs else "cataloged only"
            print(f"listening as {config.listen.aet}@{host}:{port}; received images are {target}", flush=True)
            stop.wait()
        print(listener.summary.line())
        for source, reason in listener.summary.failures:
            print(f"failed: {source}: {reason}")
        return 0
    finally:
        catalog.close()
