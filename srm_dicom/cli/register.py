"""``mdm register``: the seeds' glite-mdm-register, for files, directories and PACS contents.

Start-up is part of every registration's time (a 100-image run is over in well under a
second with storescu). So this module imports only argparse until the command runs, and
the command starts the protection workers' fork server first, before its own imports: the
server's interpreter imports pydicom, the anonymizer and the registrar on the other core
while this one imports the catalog, the PACS client and the key server client (README,
"Benchmarks")."""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.forkserver
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from srm_dicom.pacs.client import PacsClient
    from srm_dicom.register import Registrar, Summary

EXIT_SOME_FAILED = 1
POOL_FROM = 32
# What the workers are and run (srm_dicom.workers.PRELOAD): imported once by the fork server,
# inherited by every worker it forks. Named here, not imported from srm_dicom.workers: this
# process starts the fork server before its own imports.
WORKER_MODULES = ["srm_dicom.workers", "srm_dicom.prepare", "srm_dicom.worker_start"]


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "register",
        help="register DICOM files, directories or PACS contents (hospital side)",
        description=(
            "Register images: each file is stored into the PACS, then cataloged under "
            "/grid/<vo>/mdm/<Study>/<Series>/<SOP> with its metadata, and its series gets a 3D "
            "entry. Registering an unchanged image again does nothing; a changed one gets a new "
            "content version. With --from-pacs, images already in the PACS are indexed in place: "
            "nothing is stored into the PACS."
        ),
        epilog=(
            "examples:\n"
            "  mdm register scans/                     # a directory, recursively\n"
            "  mdm register -v a.dcm b.dcm             # two files, one line each\n"
            "  mdm register --from-pacs --study 1.2.3  # index a study already in the PACS\n"
            "  mdm register --from-pacs --all\n"
            "  mdm register --from-pacs --study 1.2.3 --reprotect  # re-issue under today's [anonymization]\n"
            "In a directory, files that are not DICOM images (README, NIfTI, DICOMDIR, FIFOs) are\n"
            "counted as skipped; a file named on the command line that is not one fails.\n"
            "exit codes: 0 all registered or already there, 1 some files failed, 4 PACS error"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="*", type=Path, metavar="PATH", help="DICOM files or directories")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: one line per image; -vv: debug")
    parser.add_argument("--owner", metavar="DN", help="owner of the new entries (default: [site] registrar)")
    parser.add_argument(
        "--reprotect", action="store_true",
        help="re-issue already registered images protected with other [anonymization] options than the "
             "current ones: a new content version under the current options (entries keep the options they "
             "were registered with otherwise)",
    )
    source = parser.add_argument_group("indexing images already in the PACS")
    source.add_argument("--from-pacs", action="store_true", help="index images of the PACS instead of files")
    which = source.add_mutually_exclusive_group()
    which.add_argument("--study", metavar="UID", help="one study")
    which.add_argument("--patient", metavar="ID", help="all studies of one patient")
    which.add_argument("--all", action="store_true", help="every study in the PACS")
    parser.set_defaults(handler=run)


def _progress(total: int) -> AbstractContextManager[Any]:
    if total < 2 or not sys.stderr.isatty():
        return nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("registering"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        transient=True,
    )


def _may_pool(args: argparse.Namespace) -> bool:
    """Whether the run may reach ``POOL_FROM`` images, told without reading any: PACS contents,
    a directory, or that many names."""
    return args.from_pacs or len(args.paths) >= POOL_FROM or any(os.path.isdir(path) for path in args.paths)


def _start_workers_server() -> None:
    """Start the fork server that ``srm_dicom.workers`` forks its workers from (the one fork
    server of this process), with the workers' modules, now: it imports them while this
    process imports its own. A run that turns out too small for the pool leaves it idle; it
    ends with this process."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(WORKER_MODULES)
    multiprocessing.forkserver.ensure_running()


def run(args: argparse.Namespace) -> int:
    from srm_dicom.errors import InvalidInput

    if args.from_pacs and args.paths:
        raise InvalidInput("give either PATHs or --from-pacs, not both")
    if args.from_pacs and not (args.study or args.patient or args.all):
        raise InvalidInput("--from-pacs needs --study UID, --patient ID or --all")
    if not args.from_pacs and not args.paths:
        raise InvalidInput("nothing to register: give PATHs (files or directories) or --from-pacs")
    if _may_pool(args):
        _start_workers_server()
    from srm_dicom.catalog import open_catalog
    from srm_dicom.config import load_config
    from srm_dicom.errors import PacsError
    from srm_dicom.keystore.client import KeystoreClient
    from srm_dicom.pacs.client import PacsClient
    from srm_dicom.register import Registrar, Summary, iter_files

    config = load_config(args.config)
    catalog = open_catalog(config)
    summary = Summary()
    files = [] if args.from_pacs else list(iter_files(args.paths, summary))
    try:
        keystore = KeystoreClient.from_config(config)
        with PacsClient(config.pacs) as pacs:
            # Worker processes pay for their start from a few dozen images
            # (README, "What registration does to an image").
            pool = args.from_pacs or len(files) >= POOL_FROM
            registrar = Registrar(config, catalog, pacs, keystore, owner=args.owner, pool=pool)
            if args.from_pacs:
                _register_from_pacs(registrar, pacs, args, summary)
            else:
                _register_files(registrar, files, args, summary)
    except PacsError as exc:
        print(summary.line(), file=sys.stderr)
        raise exc
    finally:
        catalog.close()
    for source, reason in summary.failures:
        print(f"failed: {source}: {reason}", file=sys.stderr)
    print(summary.line())
    return EXIT_SOME_FAILED if summary.failures else 0


def _register_files(registrar: Registrar, files: list[Path], args: argparse.Namespace, summary: Summary) -> None:
    from srm_dicom.prepare import DICOMDIR, NotAnImage, NotDicom
    from srm_dicom.register import NOT_DICOM

    named = set(args.paths)
    with _progress(len(files)) as progress:
        task = progress.add_task("register", total=len(files)) if progress else None
        for result in registrar.register_many(files, store_in_pacs=True, reprotect=args.reprotect):
            path = result.source
            error = result.error
            if error is None:
                assert result.outcome is not None  # a result without an error has its outcome
                summary.add(result.outcome)
                if args.verbose:
                    print(f"{result.outcome.value}: {path} -> {result.lfn}")
            elif isinstance(error, (NotDicom, NotAnImage)) and path not in named:
                summary.skip(NOT_DICOM if isinstance(error, NotDicom) else DICOMDIR)
                if args.verbose:
                    print(f"skipped ({error}): {path}")
            else:
                summary.fail(str(path), str(error))
            if progress and task is not None:
                progress.advance(task)


def _register_from_pacs(
    registrar: Registrar, pacs: PacsClient, args: argparse.Namespace, summary: Summary
) -> None:
    """Every image of the chosen studies, series after series, through the same pipeline as
    files: the PACS sends each series once (C-GET or C-MOVE) and nothing is stored back."""
    studies = [args.study] if args.study else pacs.find_studies(patient_id=args.patient)
    images = (ds for study in studies for series in pacs.find_series(study) for ds in pacs.retrieve(study, series))
    for result in registrar.register_many(images, store_in_pacs=False, reprotect=args.reprotect):
        if result.error is None:
            assert result.outcome is not None  # a result without an error has its outcome
            summary.add(result.outcome)
            if args.verbose:
                print(f"{result.outcome.value}: PACS image -> {result.lfn}")
        else:
            summary.fail(f"PACS image {_sop_uid(result.source)}", str(result.error))


def _sop_uid(source: object) -> str:
    try:
        return str(getattr(source, "SOPInstanceUID", "?"))
    except Exception:  # pydicom decodes lazily: a malformed UID element raises here
        return "?"
