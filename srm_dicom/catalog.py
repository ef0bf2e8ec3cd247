"""The catalog seam: grid names, their entries, and the metadata registered with them.

The core only talks to this interface; backends (SQLite, PostgreSQL) live in ``plugins/``
and are found through the ``srm_dicom.catalog`` entry-point group, so the core never
imports a backend by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import entry_points
from typing import Protocol

from srm_dicom.config import Config
from srm_dicom.errors import ConfigError, MdmError, NotFound
from srm_dicom.metadata import ImageMetadata
from srm_dicom.names import UidTriple, parse_lfn, parse_sop_spec

ENTRY_POINT_GROUP = "srm_dicom.catalog"


@dataclass(frozen=True)
class AclEntry:
    """A per-DN right: file permissions (``rwx`` bits, 0–7) and a metadata level."""

    dn: str
    perms: int
    metadata: str = "none"


@dataclass(frozen=True)
class Entry:
    lfn: str
    guid: str
    pfn: str
    kind: str  # "slice" or "volume"
    study_uid: str  # the names' UIDs (de-identified unless the site keeps the originals)
    series_uid: str
    sop_uid: str  # "3D" for a volume
    owner: str
    vo: str
    mode: int
    metadata_mode: str
    size: int | None = None
    adler32: str | None = None
    content_version: int = 1
    source_digest: str | None = None
    created: float = 0.0
    modified: float = 0.0
    acl: tuple[AclEntry, ...] = field(default=())

    @property
    def triple(self) -> UidTriple:
        return UidTriple(self.study_uid, self.series_uid, self.sop_uid)


class CatalogConflict(MdmError):
    """Another writer changed the entry between lookup and commit: nothing was written."""


class Outcome(Enum):
    ADDED = "registered"
    UPDATED = "updated"
    UNCHANGED = "already registered"


@dataclass(frozen=True)
class Listing:
    directories: list[str]
    entries: list[Entry]


class Catalog(Protocol):
    def register_image(self, entry: Entry, metadata: ImageMetadata, volume: Entry) -> Outcome:
        """Add or update a slice with its metadata and create or bump its series volume.

        One transaction: either the entry, its metadata and the volume change are all
        stored, or nothing is. Same source digest as the stored entry: nothing changes.
        """

    def lookup(self, lfn: str) -> Entry | None: ...

    def lookup_guid(self, guid: str) -> Entry | None: ...

    def lookup_uids(self, triple: UidTriple) -> Entry | None:
        """Find by the names' UIDs or by the PACS's original UIDs."""

    def list_dir(self, path: str) -> Listing | None:
        """Subdirectories and entries directly under ``path``; None if no such directory."""

    def metadata(self, guid: str) -> ImageMetadata | None: ...

    def delete(self, lfn: str) -> Entry | None:
        """Remove an entry and its metadata; a slice's volume is bumped, or removed with its last slice."""

    def count(self) -> int: ...

    def close(self) -> None: ...


def open_catalog(config: Config) -> Catalog:
    """Instantiate the configured backend from its entry point."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=config.catalog.backend)
    if not found:
        known = ", ".join(sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)))
        raise ConfigError(
            f"config: catalog backend '{config.catalog.backend}' is not installed (known: {known})"
        )
    backend = next(iter(found)).load()
    return backend.from_config(config)


_GUID = re.compile(r"^(?:guid:|/guid/)?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def find_entry(catalog: Catalog, spec: list[str] | str) -> Entry:
    """Resolve any identifier users type: an LFN, a GUID (``guid:…``, ``/guid/…`` or bare),
    or a study/series/sop triple in any of the seeds' forms, with original or names' UIDs."""
    parts = [spec] if isinstance(spec, str) else spec
    text = " ".join(parts).strip()
    if text.startswith("/grid/"):
        parse_lfn(text)
        entry = catalog.lookup(text)
    elif guid := _GUID.match(text.lower()):
        entry = catalog.lookup_guid(guid.group(1))
    else:
        entry = catalog.lookup_uids(parse_sop_spec(parts))
    if entry is None:
        raise NotFound(f"no such entry: {text}")
    return entry
