"""``mdm cache verify``: the scrub of the disk cache against the catalog.

A cache hit trusts a file whose stat signature is the one recorded when it was last verified
(srm_dicom/cache.py); bit rot, or a hand that restored a file's mtime, keeps that signature.
This reads every cached file whole against the catalog's size and adler32, as dCache's
checksum scrubber does for its pools, and removes what differs so that it is staged again.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from srm_dicom.cache import published, scrub
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.errors import ConfigError

EXIT_CORRUPT = 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "cache",
        help="cache maintenance: verify every cached file against the catalog (bit rot)",
        description="Maintain the disk cache of [cache] dir.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify",
        help="read every cached file against the catalog's size and adler32; remove those that differ",
        description=(
            "Read every file of the cache directory whole and compare it with the catalog's size and "
            "adler32, whatever its stat signature says: a GET reads a file whole only when its signature "
            "(inode, size, mtime) changed since it was last verified, so bit rot, which keeps it, is found "
            "here. A file that differs or cannot be read is removed, and staged again from the PACS at its "
            "next request; a file the catalog no longer serves (its entry deleted, or an older version) is "
            "removed too. One line per file removed; running front ends may keep serving meanwhile. "
            "Run it as the user mdm serve runs as."
        ),
        epilog=(
            "example (weekly, from cron): mdm --config /etc/srm-dicom/mdm.toml cache verify\n"
            "exit codes: 0 every cached file holds the catalog's bytes, 1 some did not (or could not be read),\n"
            "2 bad config, 7 catalog database unavailable"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.set_defaults(handler=run_verify)


def _progress(total: int) -> Progress | nullcontext:
    if not sys.stderr.isatty():
        return nullcontext()
    return Progress(TextColumn("verifying"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _remove(path: Path) -> str:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        return f"cannot be removed ({exc.strerror})"
    return "removed"


def run_verify(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    directory = config.path(config.cache.dir)
    if not directory.is_dir():
        raise ConfigError(f"no cache directory at {directory} ([cache] dir)")
    files = [(guid, version, path, _size(path)) for guid, version, path in published(directory)]
    catalog = open_catalog(config)
    corrupt = stale = checked = 0
    try:
        with _progress(sum(size for *_, size in files)) as progress:
            task = progress.add_task("verify", total=sum(size for *_, size in files)) if progress else None
            for guid, version, path, size in files:
                entry = catalog.namespace.lookup_guid(guid)
                if entry is None or entry.content_version != version or entry.size is None:
                    stale += 1
                    print(f"{path.name}: no longer served (not the catalog's current version): {_remove(path)}")
                else:
                    checked += 1
                    if (problem := scrub(path, entry.size, entry.adler32)) is not None:
                        corrupt += 1
                        print(f"{entry.lfn} ({path.name}): {problem}")
                if progress and task is not None:
                    progress.advance(task, size)
    finally:
        catalog.close()
    print(f"{checked} cached files verified: {checked - corrupt} intact, {corrupt} corrupt or unreadable; "
          f"{stale} no longer served")
    return EXIT_CORRUPT if corrupt else 0
