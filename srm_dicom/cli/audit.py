"""``mdm audit``: how one entry was protected, for a data-protection officer (hospital side).

Prints the profile, the rules version and the options the entry was registered with (what
restaging uses), whether this installation's rules are still those, and the attributes
anonymization removed or replaced: tag paths and names, never a value.
"""

from __future__ import annotations

import argparse

from srm_dicom.anonymize import recorded_options, rules_version
from srm_dicom.catalog import find_entry, open_catalog
from srm_dicom.config import load_config
from srm_dicom.errors import InvalidInput


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "audit",
        help="show how an entry was de-identified: rules, options, removed attributes (hospital side)",
        description=(
            "Show how one slice was de-identified: the PS3.15 profile, the version of the packaged "
            "rules (Annex E table and safe lists), the [anonymization] options it was registered "
            "with, and the attributes that were removed or replaced, by tag path and name. "
            "Values are never printed."
        ),
        epilog="example: mdm audit /grid/demo/mdm/2.25.1/2.25.2/2.25.3\nexit codes: 0 ok, 2 bad usage, 3 not found",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("id", nargs="+", metavar="ID", help="LFN, GUID or study,series,sop of a slice")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    catalog = open_catalog(config)
    try:
        entry = find_entry(catalog, args.id)
        if entry.kind != "slice":
            raise InvalidInput(f"{entry.lfn} is a series volume: audit one of its slices")
        metadata = catalog.index.metadata(entry.guid)
        print(f"entry:           {entry.lfn} (guid:{entry.guid}, content version {entry.content_version})")
        if entry.protection is None:
            print("protected with:  not recorded (registered before records existed); restaging uses"
                  " the current [anonymization]")
        else:
            options, rules = recorded_options(entry.protection)
            current = "the rules installed now" if rules == rules_version() else (
                f"not the rules installed now ({rules_version()}): re-issue with 'mdm register --reprotect'")
            print("profile:         PS3.15 Annex E Basic Application Level Confidentiality Profile,"
                  " allow-list of srm_dicom/data/")
            print(f"rules:           {rules}, {current}")
            print("options:         " + ", ".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}"
                                                  for k, v in vars(options).items()))
        erased = metadata.erased if metadata else ()
        print(f"removed or replaced ({len(erased)}):")
        for path, keyword, _value in erased:
            print(f"  {path} {keyword or '(private or unknown)'}")
        return 0
    finally:
        catalog.close()
