"""``mdm decrypt``: the seeds' glite-eds-decrypt, for a file any plain client downloaded."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from srm_dicom.catalog import find_entry, open_catalog
from srm_dicom.config import Config, load_config
from srm_dicom.crypto.container import Header, check_key, decrypt_stream, read_header
from srm_dicom.errors import InvalidInput
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.protect import key_name


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "decrypt",
        help="decrypt a downloaded file with key shares fetched from the key servers",
        description=(
            "Decrypt a file downloaded with curl, davix, gfal-copy or rclone. The key's shares "
            "are fetched from the key servers with your credential ([keystore] cert and key of "
            "your client config); each server checks that you may read the file. OUT is "
            "written only when the whole file decrypted and authenticated."
        ),
        epilog=(
            "ID names the file the download came from: its GUID (guid:<uuid>, as 'mdm stat' shows), "
            "or, with a config that has a catalog, its LFN or study,series,sop.\n"
            "example: MDM_CONFIG=~/client.toml mdm decrypt guid:1b4e28ba-2fa1-11d2-883f-0016d3cca427 "
            "slice.enc slice.dcm"
        ),
    )
    parser.add_argument("id", metavar="ID", help="GUID, LFN or study,series,sop of the file")
    parser.add_argument("source", type=Path, metavar="IN", help="the encrypted file")
    parser.add_argument("destination", type=Path, metavar="OUT", help="where to write the decrypted file")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    parser.set_defaults(handler=run)


def _expect_guid(config: Config, identifier: str, header: Header) -> None:
    """Make sure the file is the one the user named, so a mix-up of downloads is caught."""
    guid = str(header.key_uuid)
    if identifier.removeprefix("guid:").removeprefix("/guid/").lower() == guid:
        return
    if "catalog" not in config.sections:
        if identifier.startswith(("guid:", "/guid/")):
            raise InvalidInput(f"{identifier} does not match the file, which belongs to guid:{guid}")
        raise InvalidInput("without a catalog in the config, name the file by its GUID (guid:<uuid>)")
    catalog = open_catalog(config)
    try:
        entry = find_entry(catalog, identifier)
    finally:
        catalog.close()
    if entry.guid != guid:
        raise InvalidInput(f"{identifier} is guid:{entry.guid}, but the file belongs to guid:{guid}")


def run(args: argparse.Namespace) -> int:
    if args.destination.exists() and not args.force:
        raise InvalidInput(f"{args.destination} exists (use -f to overwrite)")
    config = load_config(args.config)
    try:
        source = args.source.open("rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {args.source}: {exc.strerror}") from None
    with source:
        header = read_header(source)
        _expect_guid(config, args.id, header)
        keystore = KeystoreClient.from_config(config)
        key = keystore.fetch_key(key_name(str(header.key_uuid), header.version), lambda k: check_key(header, k))
        source.seek(0)
        directory = args.destination.resolve().parent
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mdm-decrypt-", delete=False) as out:
            try:
                decrypt_stream(key, source, out)
                out.flush()
                os.fsync(out.fileno())
            except BaseException:
                os.unlink(out.name)
                raise
        os.replace(out.name, args.destination)
    return 0
