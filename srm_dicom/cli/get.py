"""``mdm get``: the seeds' glite-mdm-get — download one image or volume, decrypt it, write it."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from srm_dicom import sites
from srm_dicom.client import Progress as ProgressCallback
from srm_dicom.client import guid_path, lfn_path
from srm_dicom.config import load_config
from srm_dicom.errors import InvalidInput, MdmError, NotFound
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import COMPRESSED_VOLUME, SIDECARS, VOLUME, parse_sop_spec

# Below this size a download is over before a bar would be worth drawing.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024


class NotOverwritten(MdmError):
    """The user answered no to ``-i``'s question."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "get",
        help="download an image or a 3D volume from the storage element and decrypt it",
        usage="mdm get [-i | -f] [-v] [--timeout SECONDS] [--site NAME] {-s S,SE,SOP | -l LFN | -g GUID | FILE} DEST",
        description=(
            "Download one file from the storage element ([storage] url of your config) over\n"
            "HTTPS with your certificate ([keystore] cert and key), wait while it is staged from\n"
            "the PACS, fetch its key shares from the key servers and decrypt it. DEST is written\n"
            "only once the whole file decrypted and authenticated. Silent on success unless -v.\n"
            "With sites in your config ([sites.NAME], see 'mdm site'), the file is downloaded from\n"
            "the site given by --site, else from the site that has it."
        ),
        epilog=(
            "The file is named in one of four equivalent ways:\n"
            "  mdm get -s STUDY,SERIES,SOP DEST     (also 'STUDY SERIES SOP', or 3D for the volume)\n"
            "  mdm get [-s] /STUDY/SERIES/SOP DEST\n"
            "  mdm get [-l] /grid/VO/mdm/STUDY/SERIES/SOP DEST\n"
            "  mdm get [-g] guid:UUID DEST\n"
            "The UIDs are those of the names (de-identified unless the site serves the PACS's own).\n"
            "Like dcm2niix, getting a 3D volume (by LFN, S,SE,3D or GUID; 3D.nii.gz too) as out.nii\n"
            "also writes out.json and, for a diffusion series, out.bval and out.bvec (--no-sidecars:\n"
            "DEST only).\n"
            "Exit codes: 1 download failed or damaged, 2 bad usage or DEST exists, 3 not found,\n"
            "4 still staging past --timeout, 5 refused by the storage element, 6 key servers\n"
            "failed or refused."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("-s", "--sop", metavar="S,SE,SOP", help="study, series and SOP UIDs (or 3D)")
    kind.add_argument("-l", "--lfn", metavar="LFN", help="logical file name /grid/<vo>/mdm/S/SE/SOP")
    kind.add_argument("-g", "--guid", metavar="GUID", help="guid:<uuid>")
    parser.add_argument("items", nargs="+", metavar="[FILE] DEST",
                        help="the file (when not given with -s/-l/-g), then the destination file")
    overwrite = parser.add_mutually_exclusive_group()
    overwrite.add_argument("-i", "--interactive", action="store_true", help="ask before overwriting DEST")
    overwrite.add_argument("-f", "--force", action="store_true", help="overwrite DEST without asking")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="say what happens")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="how long to wait while the file is staged (default: [storage] timeout)")
    parser.add_argument("--site", metavar="NAME",
                        help="download from this site of your config (default: the site that has the file)")
    parser.add_argument("--no-sidecars", action="store_true",
                        help="for a 3D volume, write DEST only: not its BIDS sidecar DEST.json (nor, for a "
                             "diffusion series, DEST.bval and DEST.bvec), which are written beside it by default")
    parser.set_defaults(handler=run)


def url_path(args: argparse.Namespace, vo: str) -> str:
    """The URL path on the storage element of the file the arguments name."""
    named = args.items[:-1]
    if args.lfn is not None or args.guid is not None:
        if named:
            raise InvalidInput(f"unexpected argument(s) before DEST: {' '.join(named)}")
        return lfn_path(args.lfn) if args.lfn is not None else guid_path(args.guid)
    parts = ([args.sop] if args.sop is not None else []) + named
    if not parts:
        raise InvalidInput("name the file (-s S,SE,SOP, -l LFN or -g GUID) before DEST")
    if args.sop is None and len(parts) == 1:
        if parts[0].startswith(("guid:", "/guid/")) or _is_uuid(parts[0]):
            return guid_path(parts[0])
        if parts[0].startswith("/grid/"):
            return lfn_path(parts[0])
    return parse_sop_spec(parts).lfn(vo)


def sidecar_destinations(path: str, destination: Path) -> list[tuple[str, Path]]:
    """(URL path, destination) of each sidecar a volume may have, named as dcm2niix names
    them: ``out.nii`` (or ``out.nii.gz``, ``out.nrrd``) → ``out.json``, ``out.bval``, ``out.bvec``.
    ``3D.nii.gz`` has the sidecars of ``3D``."""
    path = path.removesuffix(COMPRESSED_VOLUME[len(VOLUME):])
    if not path.endswith(f"/{VOLUME}"):
        return []
    return [(f"{path}{name[len(VOLUME):]}", target) for name, target in _named_sidecars(destination)]


def _named_sidecars(destination: Path) -> list[tuple[str, Path]]:
    """(sidecar name, destination) beside ``destination``: ``out.nii`` (or ``out.nii.gz``,
    ``out.nrrd``) → ``out.json``, ``out.bval``, ``out.bvec``, as dcm2niix names them."""
    stem = destination.name
    for extension in (".nii.gz", ".nii", ".nrrd"):
        if stem.endswith(extension) and len(stem) > len(extension):
            stem = stem[: -len(extension)]
            break
    return [(name, destination.with_name(stem + name[len(VOLUME):])) for name in SIDECARS]


def _is_uuid(text: str) -> bool:
    try:
        guid_path(text)
    except InvalidInput:
        return False
    return True


def _may_write(destination: Path, args: argparse.Namespace) -> None:
    if destination.is_dir():
        raise InvalidInput(f"{destination} is a directory; give a file name")
    if not destination.exists() or args.force:
        return
    if not args.interactive:
        raise InvalidInput(f"{destination} exists (use -f to overwrite, -i to be asked)")
    print(f"mdm get: overwrite {destination}? [y/N] ", end="", file=sys.stderr, flush=True)
    if sys.stdin.readline().strip().lower() not in ("y", "yes"):
        raise NotOverwritten(f"{destination} not overwritten")


@contextmanager
def _progress_bar() -> Iterator[ProgressCallback | None]:
    """A transfer bar on stderr for large downloads on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    console = Console(stderr=True)
    with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console, transient=True) as bar:
        task = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if task is None and total >= PROGRESS_MIN_BYTES:
                task = bar.add_task("download", total=total)
            if task is not None:
                bar.update(task, completed=done)

        yield update


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    path = url_path(args, config.site.vo)
    destination = Path(args.items[-1])
    _may_write(destination, args)
    # Both clients before the download, so a config mistake shows before any byte moves.
    storage = sites.download_client(config, path, args.site, args.timeout)
    keystore = KeystoreClient.from_config(config)
    sidecars = [] if args.no_sidecars else sidecar_destinations(path, destination)
    if path.startswith("/guid/") and not args.no_sidecars:  # a volume's sidecars, linked from its GUID
        links = storage.sidecars_of(path)
        sidecars = [(links[name], target) for name, target in _named_sidecars(destination) if name in links]
    for _, sidecar in sidecars:
        _may_write(sidecar, args)
    with _progress_bar() as progress:
        downloads = [(storage.get(path, destination, keystore, progress), destination)]
    for sidecar_path, sidecar in sidecars:
        try:
            downloads.append((storage.get(sidecar_path, sidecar, keystore), sidecar))
        except NotFound:  # b-values only for diffusion series; series registered before sidecars
            continue
    if args.verbose:
        for download, written in downloads:
            print(
                f"guid:{download.guid} -> {written}: {download.size} bytes "
                f"({download.encrypted_size} encrypted) in {download.seconds:.2f} s, "
                f"{download.attempts} request(s)"
            )
    return 0
