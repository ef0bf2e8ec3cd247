"""``mdm pki``: a demo certificate authority with users, hosts and the service identity."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from srm_dicom.errors import InvalidInput
from srm_dicom.pki import DEFAULT_KEYSTORE_URLS, init_pki, make_proxy


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pki",
        help="demo certificates (CA, hosts, service, users alice..eve)",
        description="A demo PKI for loopback; a real site uses its grid CA and VO.",
    )
    commands = parser.add_subparsers(dest="pki_command", metavar="COMMAND", required=True)
    init = commands.add_parser(
        "init",
        help="create DIR/ca.pem, hosts/, service/, users/<name>/ and vomap.toml",
        description=(
            "Create a demo CA and certificates under DIR, keeping any that exist: "
            "hosts/{storage-element,keystore-1..3} (localhost, 127.0.0.1), service/ (the "
            "storage element's identity), users/{alice,bob,carol,dave,eve}/ with cert.pem, "
            "key.pem and client.toml, and vomap.toml."
        ),
    )
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument(
        "--keystore-url",
        action="append",
        dest="keystore_urls",
        metavar="URL",
        help=f"key server URL for the users' client.toml (repeat; default {' '.join(DEFAULT_KEYSTORE_URLS)})",
    )
    init.set_defaults(handler=_init)
    proxy = commands.add_parser(
        "proxy",
        help="make an RFC 3820 proxy from a user's cert.pem and key.pem",
        description="Write a proxy (proxy cert, user cert, proxy key in one PEM file, mode 0600).",
    )
    proxy.add_argument("user_dir", type=Path, metavar="USER_DIR", help="e.g. pki/users/bob")
    proxy.add_argument("-o", "--output", type=Path, required=True, help="proxy PEM file")
    proxy.add_argument("--hours", type=float, default=12, help="lifetime (default 12)")
    proxy.set_defaults(handler=_proxy)


def _init(args: argparse.Namespace) -> int:
    urls = tuple(args.keystore_urls or DEFAULT_KEYSTORE_URLS)
    created = init_pki(args.dir, urls)
    print(f"{args.dir}: created {', '.join(created)}" if created else f"{args.dir}: up to date")
    return 0


def _proxy(args: argparse.Namespace) -> int:
    cert, key = args.user_dir / "cert.pem", args.user_dir / "key.pem"
    for path in (cert, key):
        if not path.is_file():
            raise InvalidInput(f"{path} not found (give a user folder made by 'mdm pki init')")
    chain, proxy_key = make_proxy(cert.read_bytes(), key.read_bytes(), hours=args.hours)
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(chain + proxy_key)
    print(f"{args.output}: proxy valid {args.hours:g} h")
    return 0
