"""``mdm doctor``: check a deployment and say how to fix what fails."""

from __future__ import annotations

import argparse

from srm_dicom.config import config_file, load_config
from srm_dicom.errors import ConfigError

EXIT_FAILED, EXIT_CONFIG = 1, 2


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "doctor",
        help="check a deployment: config, file modes, certificates, PACS, key servers, database, cache",
        description=(
            "Check this host's deployment and print one line per check: 'ok' with what was found, "
            "or 'FAIL' with what is wrong and the fix. Checks: the config parses; the config, "
            "private keys and SQLite catalog are 0600; the server and service certificates load, "
            "match their keys and are valid for 14 more days; the CA files hold CA certificates; "
            "the PACS answers a C-ECHO; every key server answers; the catalog opens; the cache "
            "directory is writable and its disk can hold [cache] quota_bytes. Every check runs, "
            "so one run lists everything to fix. Exit code: 0 all ok, 1 some check failed, "
            "2 the config cannot be read."
        ),
        epilog="example: sudo -u mdm MDM_CONFIG=/etc/srm-dicom/mdm.toml mdm doctor",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from srm_dicom.doctor import Finding, diagnose

    path = config_file(args.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(Finding("config", False, str(exc), "correct the file; conf/mdm.toml documents every key").line())
        return EXIT_CONFIG
    print(Finding("config", True, f"{path.resolve()} parses").line(), flush=True)
    failed = 0
    for finding in diagnose(config, path):
        print(finding.line(), flush=True)
        failed += not finding.ok
    if failed:
        print(f"{failed} check{'s' if failed > 1 else ''} failed")
    return EXIT_FAILED if failed else 0
