"""``mdm catalog``: the sysadmin's catalog commands: upgrade a schema, move a site between backends."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from srm_dicom.errors import ConfigError

if TYPE_CHECKING:  # imported when a command runs: `mdm --help` stays quick
    from srm_dicom.config import Config

EXIT_MISMATCH = 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "catalog",
        help="catalog maintenance: migrate a schema, copy a site from SQLite to PostgreSQL",
        description="Maintain the catalog database of [catalog] (or of the URLs given).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    migrate = actions.add_parser(
        "migrate",
        help="bring the catalog's schema up to this version of mdm (idempotent)",
        description=(
            "Apply the schema migrations the catalog does not have yet, in one transaction, and print "
            "the versions before and after. Running it again changes nothing. Front ends already "
            "migrate at start; run this before starting several of them on an older database."
        ),
        epilog="example: mdm catalog migrate --url postgresql://mdm@db.example.org:5432/mdm",
    )
    migrate.add_argument("--url", help="catalog URL (default: [catalog] of the config)")
    migrate.set_defaults(handler=run_migrate)
    copy = actions.add_parser(
        "copy",
        help="copy every entry, metadata row, stage request and staging job into an empty catalog, then compare counts",
        description=(
            "Move a site between backends: every table of the source catalog is copied into the target, "
            "which must be empty (its schema is created), in one transaction of the target; then each "
            "table's row count is compared. Pending stage requests and their staging jobs move too: the "
            "new site's front ends stage them (a job a killed front end still held, once its lease lapses). "
            "Stop the front ends and registrations first. URLs: "
            "postgresql://USER@HOST:PORT/DB, or an SQLite file (a path or sqlite:///path). Exit code: "
            "0 copied and counts equal, 1 counts differ, 2 bad usage or a target not empty."
        ),
        epilog="example: mdm catalog copy --from /var/lib/srm-dicom/catalog.db --to postgresql://mdm@db:5432/mdm",
    )
    copy.add_argument("--from", dest="source", required=True, metavar="URL", help="the catalog to copy")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="the empty catalog to fill")
    copy.set_defaults(handler=run_copy)


def _config(args: argparse.Namespace, url: str | None) -> Config:
    from srm_dicom.catalog import catalog_config
    from srm_dicom.config import load_config, parse_config

    if url is None:
        return load_config(args.config)
    try:
        config = load_config(args.config)
    except ConfigError:  # a URL is all a copy or migrate needs
        config = parse_config({}, Path.cwd())
    return dataclasses.replace(config, catalog=catalog_config(url))


def run_migrate(args: argparse.Namespace) -> int:
    from srm_dicom.catalog import open_catalog

    config = _config(args, args.url)
    catalog = open_catalog(config, migrate=False)
    try:
        before, after = catalog.backend.migrate()
    finally:
        catalog.close()
    where = f"{config.catalog.backend} catalog {config.catalog.url}"
    if before == after:
        print(f"{where}: schema version {after}, up to date")
    else:
        print(f"{where}: schema version {before} -> {after}")
    return 0


def run_copy(args: argparse.Namespace) -> int:
    from srm_dicom.catalog import open_catalog

    source = open_catalog(_config(args, args.source), migrate=False)
    try:
        backend = source.backend
        if backend.schema_version != backend.latest_version:
            raise ConfigError(
                f"source {args.source} has schema version {backend.schema_version}, this mdm writes"
                f" {backend.latest_version}: run 'mdm catalog migrate --url {args.source}' first"
            )
        target = open_catalog(_config(args, args.target))
        try:
            if any(target.backend.table_counts().values()):
                raise ConfigError(f"target {args.target} is not empty: copy into a new database")
            expected = backend.table_counts()

            def progress(table: str, rows: int) -> None:
                print(f"\r{table}: {rows:,}/{expected[table]:,} rows", end="", file=sys.stderr, flush=True)

            found = backend.copy_to(target.backend, progress)
            print(file=sys.stderr)
        finally:
            target.close()
    finally:
        source.close()
    differ = {t: (n, found[t]) for t, n in expected.items() if found[t] != n}
    for table, n in expected.items():
        print(f"{table:15s} {n:>12,} {'ok' if table not in differ else f'MISMATCH: target has {found[table]:,}'}")
    if differ:
        print(f"mdm catalog copy: counts differ in {', '.join(differ)}", file=sys.stderr)
        return EXIT_MISMATCH
    print(f"copied {sum(expected.values()):,} rows from {args.source} to {args.target}; counts equal")
    return 0
