"""Who may list, read and stage what: the seeds' file rights, decided for one caller.

Certificate users get the bits of the entry's mode that apply to them (owner, VO, others),
unless a per-DN entry names them. Token users get what their scopes say
(``storage.read:/path`` lists and reads below /path, ``storage.stage:/path`` stages): a
WLCG token is a capability, the ACL was checked when it was issued. The storage element's
own service identity and the hospital's ``register`` group see everything.
"""

from __future__ import annotations

from srm_dicom.catalog import Entry
from srm_dicom.identity import Identity

READ, WRITE, LIST = 4, 2, 1


def _privileged(identity: Identity) -> bool:
    return identity.kind == "service" or (identity.kind == "x509" and "register" in identity.groups)


def file_perms(identity: Identity, entry: Entry) -> int:
    """The caller's rwx bits (0-7) on an entry."""
    if _privileged(identity):
        return READ | WRITE | LIST
    if identity.kind == "jwt":
        return READ | LIST if identity.may_scope("read", entry.lfn) else 0
    for acl in entry.acl:
        if acl.dn == identity.subject:
            return acl.perms
    if identity.subject == entry.owner:
        return (entry.mode >> 6) & 7
    if identity.vo == entry.vo:
        return (entry.mode >> 3) & 7
    return entry.mode & 7


def may_list(identity: Identity, entry: Entry) -> bool:
    return bool(file_perms(identity, entry) & LIST)


def may_read(identity: Identity, entry: Entry) -> bool:
    """Getting a file needs both x (to see it) and r (to read it), as in the seeds."""
    return file_perms(identity, entry) & (READ | LIST) == READ | LIST


def may_stage(identity: Identity, entry: Entry) -> bool:
    if identity.kind == "jwt":
        return identity.may_scope("stage", entry.lfn) or identity.may_scope("read", entry.lfn)
    return may_read(identity, entry)


def may_manage(identity: Identity, entry: Entry) -> bool:
    """Changing an entry's rights or deleting it: its owner and the hospital's ``register``
    group (and the service), as in the seeds. Certificates only: a token's subject is no DN,
    and tokens carry no right to manage (WLCG scopes read, stage, create and modify data)."""
    return _privileged(identity) or (identity.kind == "x509" and identity.subject == entry.owner)


def may_browse(identity: Identity, vo: str, path: str) -> bool:
    """Directories of a VO's namespace are visible to its members (and to tokens whose
    scope lies on the way to, or below, the directory); the entries inside are filtered."""
    if _privileged(identity):
        return True
    if identity.kind == "jwt":
        return any(
            base == "/" or path == base or path.startswith(base + "/") or base.startswith(path.rstrip("/") + "/")
            for action, base in identity.scopes
            if action in ("read", "stage")
        )
    return identity.vo == vo


def metadata_level(identity: Identity, entry: Entry) -> str:
    """What of an entry's metadata the caller sees: "none", "anonymous" or "all" (seeds' modes:
    private = owner and register only; group = physicians all, MIA anonymous, the rest of the VO
    none; anonymous = VO and MIA anonymous; public = everyone all). A per-DN entry overrides."""
    if _privileged(identity) or identity.subject == entry.owner:
        return "all"
    for acl in entry.acl:
        if acl.dn == identity.subject:
            return acl.metadata
    member = identity.vo == entry.vo
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


def may_operate(identity: Identity, groups: list[str]) -> bool:
    """Reading /metrics and /status: the service identity, and certificate users in one of
    ``groups`` ([operations] groups; README, Operations)."""
    return identity.kind == "service" or (identity.kind == "x509" and bool(identity.groups & set(groups)))
