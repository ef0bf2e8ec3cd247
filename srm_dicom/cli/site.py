"""``mdm site add|rm|ls``: the storage elements of other hospitals this client reaches."""

from __future__ import annotations

import argparse

from srm_dicom import sites
from srm_dicom.config import config_file, load_config


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "site",
        help="list, add or remove the storage elements (sites) your client config reaches",
        description=(
            "Sites are the [sites.NAME] tables of your client config; [storage] url is the site\n"
            f"'{sites.DEFAULT}'. 'mdm query --site NAME|all' searches them, 'mdm get --site NAME'\n"
            "downloads from one. add and rm rewrite only the [sites.*] tables of the config file\n"
            "(--config, else $MDM_CONFIG, else ./mdm.toml); the rest stays as it is."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="site_command", metavar="COMMAND", required=True)
    add = commands.add_parser(
        "add",
        help="add a site (no change if it is already there with this URL)",
        description="Add [sites.NAME] to the client config. An existing NAME with another URL needs --force.",
    )
    add.add_argument("name", metavar="NAME", help="a short name: letters, digits, '.', '_', '-'")
    add.add_argument("url", metavar="URL", help="the storage element's https://HOST:PORT")
    add.add_argument("--ca", metavar="FILE", help="CA its certificate chains to (default: [keystore] ca)")
    add.add_argument("-f", "--force", action="store_true", help="replace a site of that name with another URL")
    add.set_defaults(handler=_add)
    remove = commands.add_parser("rm", help="remove a site", description="Remove [sites.NAME] from the client config.")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(handler=_remove)
    listing = commands.add_parser("ls", help="list the sites", description="One line per site: NAME URL [CA].")
    listing.set_defaults(handler=_list)


def _add(args: argparse.Namespace) -> int:
    sites.add_site(config_file(args.config), args.name, args.url, args.ca, args.force)
    return 0


def _remove(args: argparse.Namespace) -> int:
    sites.remove_site(config_file(args.config), args.name)
    return 0


def _list(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    default_ca = config.path(config.keystore.ca)
    found = sites.configured_sites(config).values()
    width = max((len(site.name) for site in found), default=0)
    for site in found:
        ca = "" if site.ca == default_ca else f"  ca={site.ca}"
        print(f"{site.name:<{width}}  {site.url}{ca}")
    return 0
