"""Changing the rights of entries (the seeds' ``glite-mdm-set-right``) as one change.

Rights live on three things that must agree: the catalog entry (file mode, per-DN ACL),
the key shares on every key server (their ACL mirrors who may read) and the metadata
mode (a column of the entry, read by every metadata answer). The key servers and the
catalog cannot share a transaction, so the change follows this protocol:

1. Compute, per entry, the old rights, the new ones and their intersection (``meet``:
   what both grant, never more than either).
2. Write the new key ACL on every key server, all keys in parallel, one server at a time
   per request, so it is known exactly which (key, server) pairs took it.
3. All took it: commit the catalog (mode, metadata mode, per-DN ACL of every entry) in
   one transaction. Done: the new rights hold everywhere.
4. A key server failed (or the catalog commit did): put the old ACL back on the pairs
   that changed, retrying a few times with a growing pause. All restored: the old rights
   hold everywhere, the catalog was never touched, and the error names the servers.
5. Restoring failed too (a server took the new ACL, then went away): write the
   intersection's ACL wherever possible and commit the intersection to the catalog. The
   storage element serves files by the catalog, so nobody can read more than both the
   old and the new rights allow; a stuck server holds one share (k = 2 are needed). The
   error says so; running the same ``set-right`` again once the server is back converges.

A volume whose key does not exist yet (never assembled) has no key ACL to change: its
key is born from the catalog's rights at first assembly. Concurrent changes of the same
entries are last-writer-wins.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from srm_dicom.catalog import AclEntry, Catalog, Entry, find_entry
from srm_dicom.config import Config
from srm_dicom.entry_key import key_acl, key_name
from srm_dicom.errors import InvalidInput, MdmError, NotFound
from srm_dicom.keystore import Acl, KeystoreError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import VOLUME, is_uid, vo_root
from srm_dicom.rights import METADATA_LEVELS, format_mode, parse_metadata_mode, parse_mode
from srm_dicom.uids import deidentify_uid

RESTORE_ATTEMPTS = 4
RESTORE_DELAY = 0.5  # seconds before the second attempt; doubled after each


class RightsNotChanged(KeystoreError):
    """A key server failed: the old rights were restored everywhere."""


class RightsAtIntersection(KeystoreError):
    """A key server failed and could not be restored: the intersection of the old and the new rights holds."""


def parse_perms(text: str) -> int:
    """``r-x`` → 5."""
    if not re.fullmatch(r"[r-][w-][x-]", text):
        raise InvalidInput(f"user permissions must look like rwx or r-x, not {text!r}")
    return parse_mode(text + "------") >> 6


def parse_user(dn: str, perms: str, level: str) -> AclEntry:
    if not dn.startswith("/") or "=" not in dn:
        raise InvalidInput(f"user DN must look like /C=../O=../CN=.., not {dn!r}")
    if level not in METADATA_LEVELS:
        raise InvalidInput(f"metadata level must be one of {', '.join(METADATA_LEVELS)}, not {level!r}")
    return AclEntry(dn, parse_perms(perms), level)


# The fields of a user in the JSON API, with their defaults.
USER_FIELDS = (("dn", None), ("perms", None), ("metadata", "none"))
_LEVEL = {level: rank for rank, level in enumerate(METADATA_LEVELS)}


def _meet_mode(a: str, b: str) -> str:
    """The strictest metadata mode both allow: "group" and "anonymous" grant different
    groups (physicians all vs VO anonymous), so only "private" lies under both."""
    if a == b or b == "public":
        return a
    if a == "public":
        return b
    return "private"


@dataclass(frozen=True)
class Rights:
    mode: int
    metadata_mode: str
    acl: tuple[AclEntry, ...] = ()  # sorted by DN

    @classmethod
    def of(cls, entry: Entry) -> Rights:
        return cls(entry.mode, entry.metadata_mode, tuple(sorted(entry.acl, key=lambda a: a.dn)))

    def key_acl(self, entry: Entry) -> Acl:
        return key_acl(entry.owner, entry.vo, self.mode, tuple(a.dn for a in self.acl if a.perms & 4))

    def _floor(self, dn: str, owner: str) -> AclEntry:
        """The least these rights give a DN without an entry of its own: the owner's bits, or
        the lower of the VO's and the others' (the DN's VO is not known here)."""
        perms = (self.mode >> 6) & 7 if dn == owner else (self.mode >> 3) & self.mode & 7
        return AclEntry(dn, perms, "all" if self.metadata_mode == "public" else "none")

    def meet(self, other: Rights, owner: str) -> Rights:
        """What both grant: no caller gets more from the result than from either."""
        mine, theirs = {a.dn: a for a in self.acl}, {a.dn: a for a in other.acl}
        acl = []
        for dn in sorted(mine.keys() | theirs.keys()):
            a, b = mine.get(dn) or self._floor(dn, owner), theirs.get(dn) or other._floor(dn, owner)
            acl.append(AclEntry(dn, a.perms & b.perms, min(a.metadata, b.metadata, key=_LEVEL.__getitem__)))
        return Rights(self.mode & other.mode, _meet_mode(self.metadata_mode, other.metadata_mode), tuple(acl))

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": format_mode(self.mode),
            "metadata": self.metadata_mode,
            "users": [{"dn": a.dn, "perms": format_mode(a.perms << 6)[:3], "metadata": a.metadata} for a in self.acl],
        }


@dataclass(frozen=True)
class RightsChange:
    """What ``set-right`` was asked: a new mode and metadata mode (None keeps each entry's
    own) and per-DN entries added to, or replacing those of the same DN in, each entry's ACL."""

    mode: int | None = None
    metadata_mode: str | None = None
    users: tuple[AclEntry, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mode is None and self.metadata_mode is None and not self.users:
            raise InvalidInput("nothing to change: give a mode (rwxr-x---), a metadata mode or -u DN rwx LEVEL")

    def apply(self, rights: Rights) -> Rights:
        acl = {a.dn: a for a in rights.acl} | {u.dn: u for u in self.users}
        return Rights(
            rights.mode if self.mode is None else self.mode,
            self.metadata_mode or rights.metadata_mode,
            tuple(sorted(acl.values(), key=lambda a: a.dn)),
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.mode is not None:
            data["mode"] = format_mode(self.mode)
        if self.metadata_mode is not None:
            data["metadata"] = self.metadata_mode
        if self.users:
            data["users"] = Rights(0, "private", self.users).to_json()["users"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RightsChange:
        """The body of ``POST /api/v1/rights`` (its "path"/"paths" are read by the caller)."""
        mode, metadata, users = data.get("mode"), data.get("metadata"), data.get("users", [])
        try:
            parsed_mode = None if mode is None else parse_mode(_text(mode, "mode"))
            parsed_metadata = None if metadata is None else parse_metadata_mode(_text(metadata, "metadata"))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if not isinstance(users, list) or not all(isinstance(u, dict) for u in users):
            raise InvalidInput('\'users\' must be a list of {"dn", "perms", "metadata"}')
        return cls(parsed_mode, parsed_metadata, tuple(
            parse_user(*(_text(u.get(name, default), name) for name, default in USER_FIELDS)) for u in users
        ))


def _text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"'{name}' must be a string")
    return value


# -- what a user names: an entry, a series or a study -----------------------------------


@dataclass(frozen=True)
class Selection:
    entries: list[Entry]
    # Named with the PACS's original UIDs: only callers allowed to see those may learn it exists.
    by_original: bool = False


def parse_uids(text: str) -> list[str]:
    """``S``, ``S,SE``, ``S,SE,SOP`` (or with spaces or slashes, ``3D`` for the volume)."""
    fields = [f for f in re.split(r"[,\s/]+", text.strip()) if f]
    if not 1 <= len(fields) <= 3:
        raise InvalidInput(f"'{text}' is not a study, a series or an image (S[,SE[,SOP|3D]])")
    for number, uid in enumerate(fields):
        if not is_uid(uid) and not (number == 2 and uid == VOLUME):
            raise InvalidInput(f"'{uid}' is not a DICOM UID (digits and dots, at most 64)")
    return fields


def entries_under(catalog: Catalog, path: str) -> list[Entry]:
    """The entry named ``path``, or every entry below the directory ``path`` (a series: its
    slices and its 3D; a study: all its series)."""
    entry = catalog.namespace.lookup(path)
    if entry is not None:
        return [entry]
    listing = catalog.namespace.list_dir(path)
    if listing is None:
        return []
    found = list(listing.entries)
    for directory in listing.directories:
        found += entries_under(catalog, directory)
    return found


def select(catalog: Catalog, vo: str, spec: str, secret: bytes | None = None) -> Selection:
    """Resolve an LFN (an entry, a series or a study directory), a GUID, or 1–3 UIDs (the
    names' UIDs; the PACS's original ones too when ``secret`` maps them to de-identified names)."""
    text = spec.strip()
    if text.startswith("/grid/"):
        if len([p for p in text.split("/") if p]) < 4:
            raise InvalidInput(f"'{text}' names more than a study: give a study, a series or an image")
        found = entries_under(catalog, text)
        if not found:
            raise NotFound(f"no such entry or directory: {text}")
        return Selection(found)
    if text.startswith(("guid:", "/guid/")):
        return Selection([find_entry(catalog, text)])
    uids = parse_uids(text)
    found = entries_under(catalog, "/".join([vo_root(vo), *uids]))
    if found:
        return Selection(found)
    if secret is not None:
        names = [uid if uid == VOLUME else deidentify_uid(secret, uid) for uid in uids]
        found = entries_under(catalog, "/".join([vo_root(vo), *names]))
        if found:
            return Selection(found, by_original=True)
    raise NotFound(f"no such study, series or image: {text}")


def site_secret(config: Config) -> bytes | None:
    """The secret mapping original UIDs to names, on sites whose names are de-identified."""
    return config.site.secret_bytes if config.site.uids == "deidentified" else None


# -- the change itself --------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    key_id: str
    old: Acl
    new: Acl
    meet: Acl


@dataclass(frozen=True)
class _Failure:
    key_id: str
    server: int
    reason: str


def _has_key(entry: Entry) -> bool:
    return entry.kind == "slice" or entry.adler32 is not None


class RightsSetter:
    """Applies a ``RightsChange`` to entries with the storage element's service identity.

    One ``KeystoreClient`` per key server, so that a failure is known per (key, server)."""

    def __init__(self, catalog: Catalog, servers: Sequence[KeystoreClient],
                 restore_attempts: int = RESTORE_ATTEMPTS, restore_delay: float = RESTORE_DELAY) -> None:
        self._catalog = catalog
        self._servers = list(servers)
        self._attempts = restore_attempts
        self._delay = restore_delay

    @classmethod
    def from_config(cls, config: Config, catalog: Catalog) -> RightsSetter:
        section = config.keystore
        paths = {name: config.path(getattr(section, name)) for name in ("ca", "cert", "key")}
        return cls(catalog, [KeystoreClient([url], 1, timeout=section.timeout, **paths) for url in section.urls])

    def apply(self, entries: Sequence[Entry], change: RightsChange) -> list[Entry]:
        """Change the rights of ``entries``; their new state as the catalog holds it."""
        plan = [(entry, Rights.of(entry), change.apply(Rights.of(entry))) for entry in entries]
        plan = [(entry, old, new) for entry, old, new in plan if old != new]
        keys = [
            _Key(key_name(entry.guid, entry.content_version), old.key_acl(entry), new.key_acl(entry),
                 old.meet(new, entry.owner).key_acl(entry))
            for entry, old, new in plan if _has_key(entry)
        ]
        keys = [key for key in keys if key.old != key.new]
        servers = range(len(self._servers))
        changed, failures = self._write([(key, server, key.new) for key in keys for server in servers])
        if not failures:
            try:
                if plan:
                    self._catalog.namespace.set_rights([e.guid for e, _, _ in plan], change.mode, change.metadata_mode,
                                             change.users)
            except BaseException:
                self._restore(changed)
                raise
            return [self._catalog.namespace.lookup_guid(entry.guid) or entry for entry in entries]
        problem = _summary(failures)
        stuck = self._restore(changed)
        if not stuck:
            raise RightsNotChanged(f"rights not changed: {problem}; the old rights still hold everywhere")
        self._write([(key, server, key.meet) for key in keys for server in servers])
        for entry, old, new in plan:
            meet = old.meet(new, entry.owner)
            self._catalog.namespace.set_rights([entry.guid], meet.mode, meet.metadata_mode, meet.acl)
        raise RightsAtIntersection(
            f"rights not changed: {problem}; restoring the old key ACL failed on {_summary(stuck)}: "
            f"the rights left in force are what both the old and the new allow; run the same set-right again "
            "once every key server answers"
        )

    def _restore(self, changed: list[tuple[_Key, int]]) -> list[_Failure]:
        """Put the old ACL back where the new one was written; the pairs that still failed."""
        pending, failures = changed, list[_Failure]()
        for attempt in range(self._attempts):
            if not pending:
                return []
            if attempt:
                time.sleep(self._delay * 2 ** (attempt - 1))
            done, failures = self._write([(key, server, key.old) for key, server in pending])
            pending = [pair for pair in pending if pair not in done]
        return failures if pending else []

    def _write(self, writes: list[tuple[_Key, int, Acl]]) -> tuple[list[tuple[_Key, int]], list[_Failure]]:
        """Set each ACL on its one server, all in parallel: the pairs done and the failures."""
        if not writes:
            return [], []

        def one(write: tuple[_Key, int, Acl]) -> _Failure | None:
            key, server, acl = write
            try:
                self._servers[server].set_acl(key.key_id, acl)
            except MdmError as exc:
                return _Failure(key.key_id, server, str(exc))
            return None

        with ThreadPoolExecutor(max_workers=min(16, len(writes))) as pool:
            results = list(pool.map(one, writes))
        done = [(key, server) for (key, server, _), failure in zip(writes, results, strict=True) if failure is None]
        return done, [failure for failure in results if failure is not None]


def _summary(failures: Sequence[_Failure]) -> str:
    """One phrase per server: its first failure and how many more keys failed there."""
    by_server: dict[int, list[_Failure]] = {}
    for failure in failures:
        by_server.setdefault(failure.server, []).append(failure)
    return "; ".join(
        items[0].reason + (f" (and {len(items) - 1} more keys)" if len(items) > 1 else "")
        for _, items in sorted(by_server.items())
    )

