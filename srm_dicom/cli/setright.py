"""``mdm set-right``: the seeds' glite-mdm-set-right — who may list, read and see the metadata of images.

On the hospital side (a config with [catalog]) the change is applied directly with the
storage element's service identity; on the grid side (a config with [storage] url) it is
sent to the storage element's rights API with the user's certificate, where only the
owner and the register group are allowed. Either way it is one change over the catalog,
the key servers and the metadata mode (see srm_dicom.setright).

``-f LOCAL.dcm`` reads the image's study, series and SOP UIDs with pydicom. A copy from
the PACS carries the original UIDs: the hospital side maps them to the de-identified
names with the site secret; a grid client has no secret and sends them as they are, for
the storage element to map (only for callers allowed to manage the image).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from srm_dicom.catalog import open_catalog
from srm_dicom.client import StorageClient
from srm_dicom.config import Config, load_config
from srm_dicom.errors import ConfigError, InvalidInput
from srm_dicom.rights import METADATA_MODES, parse_mode
from srm_dicom.server.rights_paths import RIGHTS
from srm_dicom.setright import Rights, RightsChange, RightsSetter, parse_user, select, site_secret

_MODE = re.compile(r"([r-][w-][x-]){3}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "set-right",
        help="change who may list, get and see the metadata of images (owner or register group)",
        usage="mdm set-right [-v] {-l LFN | -f LOCAL.dcm | -s S,SE,SOP | ID} [rwxrwxrwx] "
              "[private|group|anonymous|public] [-u DN rwx none|anonymous|all]...",
        description=(
            "Set the file mode (rwx for owner / VO / others: x lists, r reads, both are needed\n"
            "to get), the metadata mode and per-user rights of an image, of a series volume, or\n"
            "of every image and the 3D of a series or a study. The change is made on the catalog,\n"
            "on every key server and on the metadata mode at once: if a key server fails, the old\n"
            "rights stay in force and the command fails naming it."
        ),
        epilog=(
            "Metadata modes (the owner and the register group always see everything):\n"
            "  private    nobody else\n"
            "  group      physicians all, MIA anonymous metadata, the rest of the VO none\n"
            "  anonymous  the VO (MIA included) anonymous metadata\n"
            "  public     everyone all\n"
            "-u DN rwx LEVEL gives (or, with ---/none, takes away) rights to one user; it overrides\n"
            "the mode and the metadata mode for that user. Omitted parts keep their value.\n"
            "The image is named by -l /grid/VO/mdm/S/SE/SOP (or a series or study directory),\n"
            "-s S,SE,SOP (also 'S SE SOP', /S/SE/SOP, 3D for the volume, S,SE for a series, S for\n"
            "a study; the names' or the PACS's original UIDs), or -f a local copy of the image.\n"
            "example: mdm set-right rwxr----- group -s /1.2.3/1.2.3.4/1.2.3.4.5 -u /C=XX/O=h/CN=bob r-x all\n"
            "Exit codes: 2 bad usage, 3 not found, 5 refused, 6 key servers failed (rights not changed)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("-l", "--lfn", metavar="LFN", help="the LFN of an image, a 3D, a series or a study")
    target.add_argument("-f", "--file", metavar="LOCAL.dcm", type=Path, help="a local copy of the image")
    target.add_argument("-s", "--sop", nargs="+", metavar="S,SE,SOP", help="study, series and SOP UIDs (or 3D)")
    parser.add_argument("words", nargs="*", metavar="ARG",
                        help="the image (without -l/-f/-s), the mode, the metadata mode")
    parser.add_argument("-u", "--user", nargs=3, action="append", default=[], metavar=("DN", "rwx", "LEVEL"),
                        help="rights of one user: DN, rwx and none|anonymous|all (repeatable)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="print the rights of every entry changed")
    # Permissions such as "---" or "--x------" start with "-": argparse would take them for
    # options. It reads as a value whatever its negative-number pattern matches, and offers
    # no public switch for that, so the pattern is widened to permission strings.
    parser._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^([r-][w-][x-]){1,3}$")  # noqa: SLF001
    parser.set_defaults(handler=run)


def _split(args: argparse.Namespace) -> tuple[list[str], RightsChange]:
    """The words naming the image, and the change the other words and -u ask for."""
    mode = metadata = None
    named = []
    for word in [*(args.sop or []), *args.words]:
        if _MODE.fullmatch(word) and mode is None:
            mode = parse_mode(word)
        elif word in METADATA_MODES and metadata is None:
            metadata = word
        else:
            named.append(word)
    users = tuple(parse_user(*user) for user in args.user)
    return named, RightsChange(mode, metadata, users)


def _file_uids(path: Path) -> str:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
        return ",".join(str(ds[name].value) for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except (InvalidDicomError, KeyError, OSError):
        raise InvalidInput(f"{path} is not a DICOM image with study, series and SOP instance UIDs") from None


def target(args: argparse.Namespace, named: list[str]) -> str:
    """What the image is called, in a form ``srm_dicom.setright.select`` reads."""
    if args.lfn is not None or args.file is not None:
        if named:
            raise InvalidInput(f"unexpected argument(s): {' '.join(named)}")
        return args.lfn if args.lfn is not None else _file_uids(args.file)
    if not named:
        raise InvalidInput("name the image: -l LFN, -f LOCAL.dcm or -s S,SE,SOP")
    if args.sop is None and len(named) == 1 and Path(named[0]).is_file():
        return _file_uids(Path(named[0]))
    return " ".join(named)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    named, change = _split(args)
    spec = target(args, named)
    if "catalog" in config.sections:
        results = _apply_here(config, spec, change)
    elif config.storage.url:
        answer = StorageClient.from_config(config).post_json(RIGHTS, {"path": spec, **change.to_json()})
        results = [(item["path"], item) for item in answer["entries"]]
    else:
        raise ConfigError("config: neither [catalog] (hospital side) nor [storage] url (grid side) is set")
    if args.verbose:
        for path, rights in results:
            users = "".join(f"  {u['dn']} {u['perms']} {u['metadata']}" for u in rights["users"])
            print(f"{path}  {rights['mode']} {rights['metadata']}{users}")
    return 0


def _apply_here(config: Config, spec: str, change: RightsChange) -> list[tuple[str, dict]]:
    catalog = open_catalog(config)
    try:
        selection = select(catalog, config.site.vo, spec, site_secret(config))
        done = RightsSetter.from_config(config, catalog).apply(selection.entries, change)
        return [(entry.lfn, Rights.of(entry).to_json()) for entry in done]
    finally:
        catalog.close()
