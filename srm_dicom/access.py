"""Every permission decision of the storage element, for one caller of any kind.

The seeds' file rights for certificate users (x509 with the VO map's groups, or voms
with the groups of a verified attribute certificate): the bits of the entry's mode that
apply to them (owner, VO, others), unless a per-DN entry names them. Token users get what
their scopes say (``storage.read:/path`` lists and reads below /path,
``storage.stage:/path`` stages, ``storage.poll:/path`` follows stage requests; README,
"Tokens"): a WLCG token is a capability, the ACL was checked when it was issued. A token
without any storage scope is a member of its ``wlcg.groups`` VO: the VO's (or the
others') bits of the mode, never an owner's or a per-DN entry's. A macaroon acts as its
issuer at issue time (a certificate identity without the register group), narrowed to
its ``path:`` and ``activity:`` caveats. The storage element's own service identity
and the hospital's ``register`` group (granted by certificates only) see everything.

Identities are never compared across kinds: owners and per-DN entries are matched
against ``Identity.dn``, which tokens and macaroons do not have, and stage requests
against ``Identity.principal``, which keeps the kinds apart.
"""

from __future__ import annotations

from srm_dicom.catalog import Entry, RightsFacts, StageRequest
from srm_dicom.identity import CERTIFICATE_KINDS, REGISTER, Identity, covers

READ, WRITE, LIST = 4, 2, 1
# Macaroon activities (dCache's names) and what each allows here.
LIST_ACTIVITY, DOWNLOAD, READ_METADATA, STAGE = "LIST", "DOWNLOAD", "READ_METADATA", "STAGE"
ACTIVITIES = (LIST_ACTIVITY, DOWNLOAD, READ_METADATA, STAGE)


def _privileged(identity: Identity) -> bool:
    """The service and the register group: every file, every metadata level."""
    return identity.kind == "service" or (identity.kind in ("x509", "voms") and REGISTER in identity.groups)


def _macaroon_allows(identity: Identity, activity: str, path: str) -> bool:
    return activity in identity.activities and any(covers(base, path) for base in identity.paths)


def _certificate_perms(identity: Identity, entry: Entry) -> int:
    if _privileged(identity):
        return READ | WRITE | LIST
    for acl in entry.acl:
        if acl.dn == identity.dn:
            return acl.perms
    if identity.dn == entry.owner:
        return (entry.mode >> 6) & 7
    if identity.vo is not None and identity.vo == entry.vo:
        return (entry.mode >> 3) & 7
    return entry.mode & 7


def _token_perms(identity: Identity, entry: Entry) -> int:
    """Capability scopes win over groups: a token with storage scopes gets r-x where
    storage.read reaches and --x (to name the file) where storage.stage or storage.poll do."""
    if not identity.scopes:
        member = identity.vo is not None and identity.vo == entry.vo
        return (entry.mode >> 3 if member else entry.mode) & (READ | LIST)
    if identity.may_scope("read", entry.lfn):
        return READ | LIST
    return LIST if identity.may_scope("stage", entry.lfn) or identity.may_scope("poll", entry.lfn) else 0


def file_perms(identity: Identity, entry: Entry) -> int:
    """The caller's rwx bits (0-7) on an entry."""
    if identity.kind == "token":
        return _token_perms(identity, entry)
    if identity.kind == "macaroon":
        assert identity.on_behalf is not None
        perms = _certificate_perms(identity.on_behalf, entry) & (READ | LIST)
        if not _macaroon_allows(identity, LIST_ACTIVITY, entry.lfn):
            perms &= ~LIST
        if not _macaroon_allows(identity, DOWNLOAD, entry.lfn):
            perms &= ~READ
        return perms
    perms = _certificate_perms(identity, entry)
    return perms & ~WRITE if identity.limited else perms


def may_list(identity: Identity, entry: Entry) -> bool:
    if identity.kind == "macaroon":  # any activity on the path makes the entry visible to it
        assert identity.on_behalf is not None
        return (_certificate_perms(identity.on_behalf, entry) & LIST != 0
                and any(_macaroon_allows(identity, a, entry.lfn) for a in ACTIVITIES))
    return bool(file_perms(identity, entry) & LIST)


def may_read(identity: Identity, entry: Entry) -> bool:
    """Getting a file needs both x (to see it) and r (to read it), as in the seeds; a
    macaroon's DOWNLOAD activity stands for both on its path, within its issuer's bits."""
    if identity.kind == "macaroon":
        assert identity.on_behalf is not None
        return _macaroon_allows(identity, DOWNLOAD, entry.lfn) and may_read(identity.on_behalf, entry)
    return file_perms(identity, entry) & (READ | LIST) == READ | LIST


def may_stage(identity: Identity, entry: Entry) -> bool:
    """Staging (and releasing pins): a token needs storage.stage there (storage.read reads,
    and stages only as a GET does); others need read rights."""
    if identity.kind == "token" and identity.scopes:
        return identity.may_scope("stage", entry.lfn)
    if identity.kind == "macaroon":
        assert identity.on_behalf is not None
        return _macaroon_allows(identity, STAGE, entry.lfn) and may_read(identity.on_behalf, entry)
    return may_read(identity, entry)


def may_manage(identity: Identity, entry: Entry) -> bool:
    """Changing an entry's rights or deleting it: its owner and the hospital's ``register``
    group (and the service), as in the seeds. Certificates only, and no limited proxy: a
    token's subject is no DN, tokens carry no right to manage (WLCG scopes read, stage,
    create and modify data), and a macaroon carries only the activities it names."""
    if identity.kind not in CERTIFICATE_KINDS or identity.limited:
        return False
    return _privileged(identity) or identity.dn == entry.owner


def may_manage_request(identity: Identity, request: StageRequest) -> bool:
    """Polling, cancelling, releasing or deleting a stage request: whoever submitted it (the
    same principal, of the same kind), the service and the register group. A capability
    token needs storage.stage or storage.poll over every file of the request too."""
    if _privileged(identity):
        return True
    if request.requester != identity.principal:
        return False
    if identity.kind == "token" and identity.scopes:
        return all(identity.may_scope("stage", f.lfn) or identity.may_scope("poll", f.lfn) for f in request.files)
    return True


def may_issue_macaroon(identity: Identity) -> bool:
    """Macaroons are issued to certificate users: a macaroon carries a DN and groups, which
    a token has no DN to give; the service identity gets none (it would carry everything)."""
    return identity.kind in ("x509", "voms")


def may_browse(identity: Identity, vo: str, path: str) -> bool:
    """Directories of a VO's namespace are visible to its members (and to tokens and
    macaroons whose paths lie on the way to, or below, the directory); the entries inside
    are filtered."""
    if _privileged(identity):
        return True
    if identity.kind in ("token", "macaroon"):
        bases = identity.paths if identity.kind == "macaroon" else [b for a, b in identity.scopes
                                                                    if a in ("read", "stage", "poll")]
        if identity.kind == "token" and not identity.scopes:
            return identity.vo == vo
        return any(covers(base, path) or base.startswith(path.rstrip("/") + "/") for base in bases)
    return identity.vo == vo


def metadata_level(identity: Identity, entry: Entry) -> str:
    """What of an entry's metadata the caller sees: "none", "anonymous" or "all" (seeds' modes:
    private = owner and register only; group = physicians all, MIA anonymous, the rest of the VO
    none; anonymous = VO and MIA anonymous; public = everyone all). A per-DN entry overrides.
    A macaroon sees its issuer's level where its READ_METADATA activity reaches, else none."""
    if identity.kind == "macaroon":
        assert identity.on_behalf is not None
        if not _macaroon_allows(identity, READ_METADATA, entry.lfn):
            return "none"
        return metadata_level(identity.on_behalf, entry)
    if _privileged(identity) or (identity.dn is not None and identity.dn == entry.owner):
        return "all"
    for acl in entry.acl:
        if identity.dn is not None and acl.dn == identity.dn:
            return acl.metadata
    member = identity.vo is not None and identity.vo == entry.vo
    mode = entry.metadata_mode
    if mode == "public":
        return "all"
    if mode == "anonymous":
        return "anonymous" if member else "none"
    if mode == "group" and member:
        if "physician" in identity.groups:
            return "all"
        if "mia" in identity.groups:
            return "anonymous"
    return "none"


def reads(identity: Identity) -> RightsFacts:
    """What the decisions above read of an entry for this caller (``RightsFacts``): the DN that
    owners and per-DN entries are matched against (a macaroon's issuer's; none for tokens), the
    VO of membership, and the paths of token scopes and macaroon caveats (``covers``). A rule
    above that reads anything else of an entry must be added here, or searches that decide once
    per rights class (``StorageService.aggregate``) would answer differently from ``may_list``."""
    if identity.kind == "macaroon":
        assert identity.on_behalf is not None
        return RightsFacts(identity.on_behalf.dn, identity.on_behalf.vo, identity.paths)
    if identity.kind == "token":
        return RightsFacts(None, identity.vo, tuple(dict.fromkeys(base for _, base in identity.scopes)))
    return RightsFacts(identity.dn, identity.vo)


def may_operate(identity: Identity, groups: list[str]) -> bool:
    """Reading /metrics and /status: the service identity, and certificate users in one of
    ``groups`` ([operations] groups; README, Operations)."""
    return identity.kind == "service" or (identity.kind in ("x509", "voms") and bool(identity.groups & set(groups)))
