"""``mdm ls``, ``mdm stat``, ``mdm del``: the grid namespace as the catalog holds it."""

from __future__ import annotations

import argparse
import posixpath
import time
from dataclasses import astuple

from srm_dicom.catalog import Catalog, Entry, find_entry, open_catalog
from srm_dicom.client import StorageClient
from srm_dicom.config import Config, load_config
from srm_dicom.entry_key import key_name
from srm_dicom.errors import ConfigError, InvalidInput, NotFound
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import normalize_lfn, parse_lfn, parse_sop_spec, vo_root
from srm_dicom.rights import format_mode
from srm_dicom.server.rights_paths import DELETE

_IDENTIFIER_HELP = (
    "identifiers: an LFN (/grid/<vo>/mdm/S/SE/SOP), a GUID (guid:<uuid>) or a study, series, "
    "sop triple (S,SE,SOP or 'S SE SOP' or /S/SE/SOP, with 3D in place of the SOP for the "
    "series volume), with the names' UIDs or the PACS's original UIDs"
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    ls = commands.add_parser(
        "ls",
        help="list studies, series, slices and 3D volumes",
        description="List a directory of the grid namespace (default: the VO's /grid/<vo>/mdm).",
        epilog="example: mdm ls -l /grid/demo/mdm/2.25.123/2.25.456",
    )
    ls.add_argument("path", nargs="?", metavar="LFN", help="directory or entry")
    ls.add_argument("-l", "--long", action="store_true", help="mode, owner, size, version, date")
    ls.set_defaults(handler=run_ls)

    stat = commands.add_parser(
        "stat", help="show one entry", description="Show everything the catalog holds about one entry.",
        epilog=_IDENTIFIER_HELP,
    )
    stat.add_argument("id", nargs="+", metavar="ID", help="LFN, GUID or study,series,sop")
    stat.set_defaults(handler=run_stat)

    delete = commands.add_parser(
        "del",
        help="remove an entry and its metadata (the image stays in the PACS)",
        description=(
            "Remove an entry, its metadata and its key shares. The image itself stays in the "
            "PACS: clinical data are never deleted by the grid side. Deleting the last slice of "
            "a series removes its 3D entry too."
        ),
        epilog=_IDENTIFIER_HELP,
    )
    target = delete.add_mutually_exclusive_group(required=True)
    target.add_argument("-l", "--lfn", metavar="LFN", help="the entry's LFN")
    target.add_argument("-s", "--sop", nargs="+", metavar="S,SE,SOP", help="study, series, sop UIDs")
    target.add_argument("-g", "--guid", metavar="GUID", help="the entry's GUID")
    delete.add_argument("-v", "--verbose", action="count", default=0, help="say what was removed")
    delete.set_defaults(handler=run_del)


def _with_catalog(args: argparse.Namespace) -> tuple[Config, Catalog]:
    """The site's catalog. A grid user's client.toml has none: opening one would create an
    empty catalog.db beside it and answer "no such file" for everything."""
    config = load_config(args.config)
    if "catalog" not in config.sections:
        root = vo_root(config.site.vo)
        where = f"{config.storage.url}{root}" if config.storage.url else f"https://HOST:PORT{root}"
        raise ConfigError(
            f"this config has no [catalog] (a grid client's config) and {args.command} reads the site's "
            f"catalog: list with 'gfal-ls {where.replace('https://', 'davs://')}' or search with 'mdm query'"
        )
    return config, open_catalog(config)


def _long(entry: Entry) -> str:
    size = "-" if entry.size is None else str(entry.size)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.modified))
    name = posixpath.basename(entry.lfn)
    return f"-{format_mode(entry.mode)} v{entry.content_version:<3} {entry.owner}  {size:>12}  {stamp}  {name}"


def run_ls(args: argparse.Namespace) -> int:
    config, catalog = _with_catalog(args)
    try:
        path = normalize_lfn(args.path or vo_root(config.site.vo))
        listing = catalog.namespace.list_dir(path)
        if listing is None:
            entry = catalog.namespace.lookup(path)
            if entry is None:
                raise NotFound(f"no such file or directory: {path}")
            print(_long(entry) if args.long else posixpath.basename(entry.lfn))
            return 0
        for directory in listing.directories:
            name = posixpath.basename(directory) + "/"
            print(f"d{'':<{9 + 6}}{name}" if args.long else name)
        for entry in listing.entries:
            print(_long(entry) if args.long else posixpath.basename(entry.lfn))
        return 0
    finally:
        catalog.close()


def run_stat(args: argparse.Namespace) -> int:
    _, catalog = _with_catalog(args)
    try:
        entry = find_entry(catalog, args.id)
        fields = {
            "LFN": entry.lfn,
            "GUID": f"guid:{entry.guid}",
            "PFN": entry.pfn,
            "kind": entry.kind,
            "size": "unknown until first assembly" if entry.size is None else entry.size,
            "adler32": entry.adler32 or "-",
            "owner": entry.owner,
            "VO": entry.vo,
            "mode": format_mode(entry.mode),
            "metadata mode": entry.metadata_mode,
            "content version": entry.content_version,
            "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created)),
            "modified": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.modified)),
        }
        for acl in entry.acl:
            fields[f"user {acl.dn}"] = f"{format_mode(acl.perms << 6)[:3]} {acl.metadata}"
        width = max(len(k) for k in fields)
        for key, value in fields.items():
            print(f"{key + ':':<{width + 1}} {value}")
        return 0
    finally:
        catalog.close()


def run_del(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    spec = args.lfn or args.sop or f"guid:{args.guid.removeprefix('guid:')}"
    if args.lfn and (not args.lfn.startswith("/grid/") or parse_lfn(args.lfn)[1] is None):
        raise InvalidInput(f"'{args.lfn}' is not an LFN of the form /grid/<vo>/mdm/S/SE/SOP")
    if "catalog" not in config.sections:  # the grid side: the storage element checks owner or register
        path = ",".join(astuple(parse_sop_spec(spec))) if isinstance(spec, list) else spec
        StorageClient.from_config(config).post_json(DELETE, {"paths": [path]})
        if args.verbose:
            print(f"removed {path} (the image stays in the PACS)")
        return 0
    catalog = open_catalog(config)
    try:
        entry = find_entry(catalog, spec)
        keystore = KeystoreClient.from_config(config)
        catalog.delete(entry.lfn)
        keystore.delete_key(key_name(entry.guid, entry.content_version))
        if args.verbose:
            print(f"removed {entry.lfn} (the image stays in the PACS)")
        return 0
    finally:
        catalog.close()
