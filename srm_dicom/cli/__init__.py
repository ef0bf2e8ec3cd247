"""``mdm``: one command for users and sysadmins.

Each command group lives in its own module of this package with an ``add_parser``
function; the command's handler gets the parsed arguments and returns an exit code.
Errors meant for a person (``MdmError``) print as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from srm_dicom import __version__
from srm_dicom.errors import MdmError

COMMAND_MODULES = ("register", "namespace", "listen", "pacs", "decrypt", "serve", "demo", "keystore", "pki", "get",
                   "site", "setright", "query", "doctor", "audit")

EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mdm",
        description=(
            "srm-dicom: serve a hospital PACS's images to grid jobs by URL, anonymized, "
            "encrypted and access-controlled. Register images on the hospital side; list, "
            "get and decrypt them on the grid side."
        ),
        epilog=(
            "Start with 'mdm demo' to run everything on loopback with a synthetic series. "
            "Configuration: --config FILE or $MDM_CONFIG (see conf/mdm.toml). "
            "Exit codes: 0 ok, 1 some items failed, 2 bad usage or config, 3 not found, "
            "4 PACS error (or still staging), 5 access refused, 6 key servers, 130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mdm {__version__}")
    parser.add_argument("--config", help="config file (default: $MDM_CONFIG, else ./mdm.toml)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"srm_dicom.cli.{name}").add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(getattr(args, "verbose", 0) or 0, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except MdmError as exc:
        print(f"mdm {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into head & co: stop quietly, like any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"mdm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
