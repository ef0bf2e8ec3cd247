"""``mdm token USER``: a WLCG bearer token from the demo's issuer, for curl, davix, gfal2 and rclone."""

from __future__ import annotations

import argparse

from srm_dicom.config import config_file
from srm_dicom.durations import parse_duration
from srm_dicom.issuer import DEFAULT_SCOPES, MAX_LIFETIME, DemoIssuer
from srm_dicom.pki import USERS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "token",
        help="mint a demo WLCG bearer token (the demo's issuer, issuer/ beside the config)",
        description=(
            "Print a WLCG profile access token of the demo's issuer for USER. A demo user\n"
            "(alice..eve) gets the wlcg.groups of the demo VO map; the hospital's register\n"
            "group is never put in a token. Scope paths are relative to the issuer's base path\n"
            "(/grid/<vo>): storage.read:/ reads the whole VO, storage.stage:/mdm/STUDY stages\n"
            "one study, storage.poll:/ follows stage requests. A real site's users get tokens\n"
            "from their VO's issuer (oidc-token, htgettoken) instead."
        ),
        epilog=(
            "example: curl -H \"Authorization: Bearer $(MDM_CONFIG=demo/mdm.toml mdm token bob "
            "--scope storage.read:/mdm)\" https://127.0.0.1:PORT/grid/demo/mdm/..."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("user", metavar="USER", help="the token's sub: a demo user name or any name")
    parser.add_argument("--scope", action="append", dest="scopes", metavar="SCOPE",
                        help=f"a scope (repeat; default: {' '.join(DEFAULT_SCOPES)})")
    parser.add_argument("--group", action="append", dest="groups", metavar="FQAN",
                        help="a wlcg.groups entry such as /demo/physician (repeat; default: the demo user's)")
    parser.add_argument("--lifetime", default="PT1H", metavar="DURATION",
                        help=f"seconds or an ISO 8601 duration (default PT1H, at most {MAX_LIFETIME // 86400} days)")
    parser.set_defaults(handler=_token)


def _token(args: argparse.Namespace) -> int:
    issuer = DemoIssuer.load(config_file(args.config).parent / "issuer")
    groups = tuple(args.groups or ())
    demo_user = next((u for u in USERS if u.name == args.user), None)
    if not groups and demo_user is not None:
        groups = (f"/{demo_user.vo}", *(f"/{demo_user.vo}/{g}" for g in demo_user.groups if g != "register"))
    lifetime = parse_duration(args.lifetime)
    print(issuer.mint(args.user, tuple(args.scopes or DEFAULT_SCOPES), groups, lifetime))
    return 0
