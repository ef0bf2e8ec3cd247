"""Key servers (the seeds' Hydra): each holds one Shamir share per file key, behind an ACL.

The ACL travels as JSON between the client and every server and must agree on all of
them (``mdm set-right`` changes it everywhere):

    {"owner": "/C=XX/O=srm-dicom/CN=alice",
     "entries": [{"dn": "/C=XX/O=srm-dicom/CN=bob", "rights": "r"},
                 {"group": "/demo/physician", "rights": "r"},
                 {"group": "/demo", "rights": "r"},
                 {"any": true, "rights": "r"}]}

``r`` lets a caller fetch the share. A group is a VOMS-style name: ``/vo`` for every
member of the VO, ``/vo/group`` for a group of it; ``any`` is every authenticated caller.
The owner and the storage element's service identity may always read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from srm_dicom.errors import InvalidInput, MdmError
from srm_dicom.identity import Identity

KEY_ID = re.compile(r"[A-Za-z0-9._:~@+=-]{1,200}")
RIGHTS = frozenset("r")


class KeystoreError(MdmError):
    """Key servers failed, refused or disagreed; the message names the servers involved."""

    exit_code = 6
    http_status = 502


class KeyAccessDenied(KeystoreError):
    """The key servers refused the caller (ACL): the client maps this to 403."""


def check_key_id(key_id: str) -> str:
    if not KEY_ID.fullmatch(key_id):
        raise InvalidInput(f"key id {key_id!r}: 1-200 of A-Z a-z 0-9 . _ : ~ @ + = -")
    return key_id


@dataclass(frozen=True)
class AclEntry:
    """One grant: to a DN, to a group (``/vo`` or ``/vo/group``), or to anyone authenticated."""

    rights: str
    dn: str | None = None
    group: str | None = None
    any: bool = False

    def matches(self, identity: Identity) -> bool:
        if self.any:
            return True
        if self.dn is not None:
            return identity.subject == self.dn
        return self.group in identity.fqans

    def to_json(self) -> dict[str, Any]:
        who: dict[str, Any] = {"any": True} if self.any else {"dn": self.dn} if self.dn else {"group": self.group}
        return {**who, "rights": self.rights}

    @classmethod
    def from_json(cls, data: Any) -> AclEntry:
        if not isinstance(data, dict) or set(data) - {"dn", "group", "any", "rights"}:
            raise InvalidInput("ACL entry must be an object with dn|group|any and rights")
        rights = data.get("rights")
        if not isinstance(rights, str) or not rights or set(rights) - RIGHTS:
            raise InvalidInput(f"ACL entry rights must be 'r', not {rights!r}")
        who = [k for k in ("dn", "group", "any") if k in data]
        if len(who) != 1:
            raise InvalidInput("ACL entry must name exactly one of dn, group, any")
        dn, group, anyone = data.get("dn"), data.get("group"), data.get("any")
        if dn is not None and not (isinstance(dn, str) and dn.startswith("/")):
            raise InvalidInput("ACL entry dn must look like /C=../CN=..")
        if group is not None and not (isinstance(group, str) and re.fullmatch(r"(/[^/]+)+", group)):
            raise InvalidInput("ACL entry group must look like /vo or /vo/group")
        if anyone is not None and anyone is not True:
            raise InvalidInput("ACL entry any must be true")
        return cls(rights=rights, dn=dn, group=group, any=anyone is True)


@dataclass(frozen=True)
class Acl:
    owner: str
    entries: tuple[AclEntry, ...] = ()

    def may_read(self, identity: Identity) -> bool:
        if identity.kind == "service" or identity.subject == self.owner:
            return True
        return any("r" in e.rights and e.matches(identity) for e in self.entries)

    def may_manage(self, identity: Identity) -> bool:
        """Change the ACL or delete: the owner, the service, the hospital's register group."""
        return identity.kind == "service" or identity.subject == self.owner or "register" in identity.groups

    def to_json(self) -> dict[str, Any]:
        return {"owner": self.owner, "entries": [e.to_json() for e in self.entries]}

    @classmethod
    def from_json(cls, data: Any) -> Acl:
        if not isinstance(data, dict) or set(data) - {"owner", "entries"}:
            raise InvalidInput("ACL must be an object with owner and entries")
        owner, entries = data.get("owner"), data.get("entries", [])
        if not isinstance(owner, str) or not owner.startswith("/"):
            raise InvalidInput("ACL owner must be a DN like /C=../CN=..")
        if not isinstance(entries, list):
            raise InvalidInput("ACL entries must be a list")
        return cls(owner, tuple(AclEntry.from_json(e) for e in entries))
