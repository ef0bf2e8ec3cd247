"""``mdm``: one command for users and sysadmins.

Each command group lives in its own module of this package with an ``add_parser``
function; the command's handler gets the parsed arguments and returns an exit code.
Errors meant for a person (``MdmError``) print as one line, never a traceback.

Only the module of the command being run is imported: the others pull in pydicom,
pynetdicom, cryptography, cheroot and rich, a second of start-up that ``mdm --help``,
``mdm --version`` and every other command would pay. ``COMMANDS`` lists each command's
module and the one-line help ``mdm --help`` shows for it (the module's own, which a test
keeps equal).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence

from srm_dicom import __version__
from srm_dicom.errors import MdmError, catalog_unavailable

# command → (module of srm_dicom.cli, one-line help), in the order ``mdm --help`` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "register": ("register", "register DICOM files, directories or PACS contents (hospital side)"),
    "ls": ("namespace", "list studies, series, slices and 3D volumes"),
    "stat": ("namespace", "show one entry"),
    "del": ("namespace", "remove an entry and its metadata (the image stays in the PACS)"),
    "listen": ("listen", "receive DICOM pushes and register them (C-STORE SCP)"),
    "pacs": ("pacs", "run the embedded PACS, or check the configured PACS"),
    "decrypt": ("decrypt", "decrypt a downloaded file with key shares fetched from the key servers"),
    "serve": ("serve", "serve the catalog over HTTPS: WebDAV, WLCG Tape REST, staging from the PACS"),
    "demo": ("demo", "run everything on loopback with a synthetic series (no setup)"),
    "keystore": ("keystore", "key servers holding the Shamir shares of file keys"),
    "pki": ("pki", "demo certificates (CA, hosts, service, users alice..eve)"),
    "get": ("get", "download an image or a 3D volume from the storage element and decrypt it"),
    "site": ("site", "list, add or remove the storage elements (sites) your client config reaches"),
    "set-right": ("setright", "change who may list, get and see the metadata of images (owner or register group)"),
    "query": ("query", "find images by their metadata (patient, modality, dates, UIDs…); prints LFN and GUID"),
    "doctor": ("doctor", "check a deployment: config, file modes, certificates, PACS, key servers, database, cache"),
    "catalog": ("catalog", "catalog maintenance: migrate a schema, copy a site from SQLite to PostgreSQL"),
    "cache": ("cache", "cache maintenance: verify every cached file against the catalog (bit rot)"),
    "token": ("token", "mint a demo WLCG bearer token (the demo's issuer, issuer/ beside the config)"),
    "audit": ("audit", "show how an entry was de-identified: rules, options, removed attributes (hospital side)"),
}

EXIT_INTERRUPTED = 130


def _command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs: its first word that is neither an option nor --config's value."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--config":
            skip = True
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser, complete for ``command`` (all commands when None); the others are listed
    by name and help only."""
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
            "4 PACS error (or still staging), 5 access refused, 6 key servers, 7 catalog database unavailable, "
            "130 interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mdm {__version__}")
    parser.add_argument("--config", help="config file (default: $MDM_CONFIG, else ./mdm.toml)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = dict.fromkeys(module for name, (module, _) in COMMANDS.items() if command in (None, name))
    for module in wanted:
        importlib.import_module(f"srm_dicom.cli.{module}").add_parser(commands)
    for name, (_, summary) in COMMANDS.items():
        if name not in commands.choices:
            commands.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    parser = build_parser(command if command in COMMANDS else "")
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
    except sqlite3.OperationalError as exc:  # the backend's own error: one line if it is not a bug
        mapped = catalog_unavailable(exc)
        if mapped is None:
            raise
        print(f"mdm {args.command}: {mapped}", file=sys.stderr)
        return mapped.exit_code
    except BrokenPipeError:  # output piped into head & co: stop quietly, like any Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"mdm {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
