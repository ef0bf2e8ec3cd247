"""An entry's key on the key servers: its id and the ACL that mirrors the entry's read rights.

Apart from the protection itself (srm_dicom/protect.py) so that the commands and services
that only name or re-grant keys (ls, del, get, set-right, the storage element) do not import
the anonymizer and pydicom.
"""

from __future__ import annotations

from srm_dicom.keystore import Acl, AclEntry

VO_READ, OTHERS_READ = 0o040, 0o004


def key_name(guid: str, version: int) -> str:
    """The key servers' id of an entry's key: a new content version gets a new key, so a
    failed update never overwrites the shares the current version needs."""
    return f"{guid}.{version}"


def key_acl(owner: str, vo: str, mode: int, readers: tuple[str, ...] = ()) -> Acl:
    """The key servers' ACL mirroring an entry's read rights: whoever may read the file may
    fetch the key, nobody else. The storage element's service identity is always allowed
    by the servers themselves. A per-DN refusal cannot be expressed: the servers' ACLs only
    grant, so the storage element's own refusal is what keeps such a user out."""
    # The hospital's register group reads every file at the storage element: the key must follow.
    entries = [AclEntry(rights="r", group=f"/{vo}/register"), *(AclEntry(rights="r", dn=dn) for dn in readers)]
    if mode & VO_READ:
        entries.append(AclEntry(rights="r", group=f"/{vo}"))
    if mode & OTHERS_READ:
        entries.append(AclEntry(rights="r", any=True))
    return Acl(owner=owner, entries=tuple(entries))
