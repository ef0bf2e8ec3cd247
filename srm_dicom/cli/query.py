"""``mdm query``: the seeds' selectattr — find images by their metadata, print what may be seen.

On the hospital side (a config with [catalog]) the catalog is searched directly, with
the storage element's full rights. On the grid side the storage element's JSON API is
asked with the user's certificate (``--site NAME|all`` asks other hospitals' too, in
parallel, each row tagged with its site). Every row carries its LFN and GUID, ready for
``mdm get``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from srm_dicom import sites
from srm_dicom.catalog import open_catalog
from srm_dicom.config import Config, load_config
from srm_dicom.identity import Identity
from srm_dicom.query import DEFAULT_ATTRIBUTES, find, parse, parse_attributes
from srm_dicom.server.metadata import DEFAULT_LIMIT, limit_parameter


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "query",
        help="find images by their metadata (patient, modality, dates, UIDs…); prints LFN and GUID",
        usage="mdm query [--select A,B,...] [--json] [--limit N] [--site NAME|all] 'EXPR'",
        description=(
            "Search the metadata of the registered images. EXPR compares DICOM keywords with\n"
            "values, joined by and/or, grouped with parentheses:\n"
            "  mdm query 'PatientName=\"DOE^JOHN\" and Modality=CT and StudyDate>=20200101'\n"
            "  mdm query --select PatientName,SeriesDescription 'PatientName like \"doe*\"'\n"
            "Operators: = != < <= > >= like (* or % any characters, ? one). An empty EXPR matches\n"
            "every image. You see only the images you may list, and only the attributes your\n"
            "metadata rights reach: patient data, original UIDs, dates, institution, physicians\n"
            "and descriptions need 'all'; the rest needs 'anonymous'. A filter on an attribute\n"
            "you may not see matches nothing."
        ),
        epilog=(
            "Each row gives the image's LFN and GUID: 'mdm get -l LFN DEST' or 'mdm get GUID DEST'.\n"
            "Hospital side (config with [catalog]): searches the catalog directly, all rights.\n"
            "Grid side: asks the storage element ([storage] url) with your certificate.\n"
            "Exit codes: 0 ok (even with no match), 1 a site failed, 2 bad query or config, 5 refused."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("expression", metavar="EXPR", nargs="?", default="", help="the query (quote it)")
    parser.add_argument("--select", metavar="A,B,...", help="attributes to print (default: "
                        + ",".join(a.keyword for a in DEFAULT_ATTRIBUTES) + ")")
    parser.add_argument("--json", action="store_true", help='print {"results": [rows]} as JSON (as the API answers)')
    parser.add_argument("--limit", metavar="N", help=f"at most N rows (default {DEFAULT_LIMIT})")
    parser.add_argument("--site", metavar="NAME|all", help="ask this site (or all of them) instead of the default")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="say what happens")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    query = parse(args.expression)
    attributes = parse_attributes(args.select) or DEFAULT_ATTRIBUTES
    limit = limit_parameter(args.limit)
    columns = ["lfn", "guid", *(a.keyword for a in attributes)]
    failed = False
    if "catalog" in config.sections and args.site is None:
        rows = _hospital_side(config, query, attributes, limit)
    else:
        answer = sites.query(config, sites.choose(config, args.site),
                             {"q": args.expression, "select": ",".join(a.keyword for a in attributes),
                              "limit": str(limit)})
        for failure in answer.failures:
            print(f"mdm query: {failure}", file=sys.stderr)
        failed = bool(answer.failures)
        rows = answer.rows
        if args.site is not None:
            columns.insert(0, "site")
    _print(rows, columns, args.json)
    if not rows and not failed:
        # Rights never say whether hidden images match (that would be an oracle of patient
        # data), so the line names what was searched: what the caller may see.
        hospital = "catalog" in config.sections and args.site is None
        print("mdm query: no match" + ("" if hospital else
              " among the images, and the attributes, your rights let you search"), file=sys.stderr)
    if len(rows) >= limit:
        print(f"mdm query: showing the first {limit} matches; --limit N shows more", file=sys.stderr)
    return 1 if failed else 0


def _hospital_side(config: Config, query: Any, attributes: Any, limit: int) -> list[dict[str, Any]]:
    catalog = open_catalog(config)
    try:
        hospital = Identity(subject=config.site.registrar, kind="service")
        return [match.row() for match in find(catalog, hospital, query, attributes, limit)]
    finally:
        catalog.close()


def _print(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"results": rows}, indent=1))
        return
    if not rows:
        return
    # Absent (not allowed) and empty values both print as "-": the table is for people; --json tells them apart.
    cells = [[_text(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)
