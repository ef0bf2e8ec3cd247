"""``mdm decrypt``: the seeds' glite-eds-decrypt, for a file any plain client downloaded."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from srm_dicom.catalog import find_entry, open_catalog
from srm_dicom.client import StorageClient
from srm_dicom.config import Config, load_config
from srm_dicom.crypto.container import Header, check_key, decrypt_stream, read_header
from srm_dicom.entry_key import key_name
from srm_dicom.errors import InvalidInput
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import parse_sop_spec


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
            "ID names the file the download came from: its GUID (guid:<uuid>), its LFN or its "
            "study,series,sop (resolved by the storage element of [storage] url, or by the catalog "
            "on the hospital side).\n"
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
    if identifier.startswith(("guid:", "/guid/")):
        raise InvalidInput(f"{identifier} does not match the file, which belongs to guid:{guid}")
    if "catalog" in config.sections:  # the hospital side: its own catalog
        catalog = open_catalog(config)
        try:
            named = find_entry(catalog, identifier).guid
        finally:
            catalog.close()
    elif config.storage.url:  # the grid side: the storage element tells, by a HEAD
        path = identifier if identifier.startswith("/grid/") else parse_sop_spec(identifier).lfn(config.site.vo)
        named = StorageClient.from_config(config).guid_of(path)
    else:
        raise InvalidInput("name the file by its GUID (guid:<uuid>), or configure [storage] url or a [catalog]")
    if named != guid:
        raise InvalidInput(f"{identifier} is guid:{named}, but the file belongs to guid:{guid}")


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
