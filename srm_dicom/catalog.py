"""The catalog seam: grid names, their entries, the metadata registered with them, and stage requests.

Three small interfaces, one per concern: ``Namespace`` (names, entries, rights),
``MetadataIndex`` (metadata and search) and ``StageStore`` (stage requests and pins).
``Catalog`` holds a backend's three and the domain rules that span them. The core only
talks to these interfaces; backends (SQLite, PostgreSQL) live in ``plugins/``
and are found through the ``srm_dicom.catalog`` entry-point group, so the core never
imports a backend by name.
"""

from __future__ import annotations

import posixpath
import re
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from srm_dicom.config import CatalogConfig, Config
from srm_dicom.errors import ConfigError, InvalidInput, MdmError, NotFound
from srm_dicom.metadata_schema import ImageMetadata
from srm_dicom.names import SERIES_FILES, UidTriple, parse_lfn, parse_sop_spec

if TYPE_CHECKING:  # query.py builds on Entry: a runtime import would be circular
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from srm_dicom.query import Attribute, Match, Query

ENTRY_POINT_GROUP = "srm_dicom.catalog"
# Names per query of a bulk lookup: within every backend's bound-parameter limit (SQLite's
# default is 32766 since 3.32, 999 before), and few enough round trips for 10^4 names.
LOOKUP_CHUNK = 500


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
    sha256: str | None = None  # hex, of the served bytes like size and adler32 (None before migration 8)
    acl: tuple[AclEntry, ...] = field(default=())
    # How a slice was de-identified (srm_dicom.anonymize.protection_record): restaging uses
    # it, whatever [anonymization] says by then. None for volumes and for older entries.
    protection: str | None = None

    @property
    def triple(self) -> UidTriple:
        return UidTriple(self.study_uid, self.series_uid, self.sop_uid)


# Per-file states of a stage request: the WLCG Tape REST API v1 names.
SUBMITTED, STARTED, COMPLETED, FAILED, CANCELLED = "SUBMITTED", "STARTED", "COMPLETED", "FAILED", "CANCELLED"
FINAL_STATES = frozenset({COMPLETED, FAILED, CANCELLED})


@dataclass(frozen=True)
class StageFile:
    """One file of a stage request. Times are epoch seconds. A COMPLETED file is pinned
    until ``pin_expires`` unless ``released``; ``on_disk`` is filled in by the stager."""

    lfn: str
    guid: str
    state: str = SUBMITTED
    error: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    pin_expires: int | None = None
    released: bool = False
    on_disk: bool = False


@dataclass(frozen=True)
class StageRequest:
    """An SRM prepareToGet / WLCG stage request: its files keep the order they were asked in."""

    id: str
    requester: str
    created_at: int
    pin_lifetime: int
    files: tuple[StageFile, ...]

    @property
    def started_at(self) -> int | None:
        return min((f.started_at for f in self.files if f.started_at is not None), default=None)

    @property
    def completed_at(self) -> int | None:
        """When the last file reached a final state; None while any is still to do."""
        if not self.files or any(f.state not in FINAL_STATES for f in self.files):
            return None
        return max((f.finished_at or self.created_at) for f in self.files)


@dataclass(frozen=True)
class StageJob:
    """The site-wide staging of one GUID, shared by every front end on the catalog.

    ``state`` is SUBMITTED (queued), STARTED (claimed by ``holder`` until ``lease_expires``,
    epoch seconds of the database's clock, unless renewed), COMPLETED or FAILED (``error``).
    ``attempt`` grows each time a finished job is queued again, so that a waiter tells the end
    of the run it waits for from an earlier one's. ``batch`` groups the jobs one PACS call
    fetches (the PACS's study and series)."""

    guid: str
    batch: str
    attempt: int
    state: str
    holder: str | None = None
    lease_expires: float | None = None
    error: str | None = None


class CatalogConflict(MdmError):
    """Another writer changed the entry between lookup and commit: nothing was written."""

    http_status = 409


class Outcome(Enum):
    ADDED = "registered"
    UPDATED = "updated"
    UNCHANGED = "already registered"


@dataclass(frozen=True)
class Listing:
    directories: list[str]
    entries: list[Entry]


class Namespace(Protocol):
    """Grid names and their entries: LFN, GUID, PFN, size, checksum, owner and rights,
    and the directories above them (made with their first entry, removed with their last)."""

    def lookup(self, lfn: str) -> Entry | None: ...

    def lookup_many(self, lfns: Sequence[str]) -> dict[str, Entry]:
        """The entries of those ``lfns`` that exist, by normalized LFN (``names.normalize_lfn``),
        in a few queries (one per chunk of ``LOOKUP_CHUNK`` names) rather than one per name: a Tape
        REST request names 10^4 files (README, "Tape REST at 10^4 paths")."""

    def lookup_guid(self, guid: str) -> Entry | None: ...

    def lookup_uids(self, triple: UidTriple) -> Entry | None:
        """Find by the names' UIDs only (the PACS's original UIDs are the metadata index's)."""

    def list_dir(self, path: str) -> Listing | None:
        """Subdirectories and entries directly under ``path``; None if no such directory."""

    def count(self) -> int: ...

    def set_rights(
        self, guids: Sequence[str], mode: int | None, metadata_mode: str | None, acl_entries: Sequence[AclEntry]
    ) -> None:
        """One transaction over all ``guids``: set the file mode and the metadata mode (None
        keeps each entry's own) and add the per-DN entries (one for a DN already there
        replaces it). A GUID no longer in the catalog raises NotFound and nothing changes."""

    def set_checksum(self, guid: str, version: int, size: int, adler32: str, sha256: str | None = None) -> bool:
        """Record a volume's size, adler32 and SHA-256 at its first assembly, only while ``version``
        is still its content version and none is recorded; else False and nothing written."""

    # -- the primitives the core's domain rules are made of (see ``Catalog``) ----------

    def insert(self, entry: Entry, now: float) -> None:
        """Add an entry, its per-DN rights and the directories above it."""

    def replace_content(self, entry: Entry, now: float) -> None:
        """A new content version of the entry at ``entry.lfn``: PFN, size, checksum, digest."""

    def bump_volume(self, lfn: str, size: int | None, now: float) -> bool:
        """Next content version of the volume at ``lfn`` with a new size, its checksum
        forgotten (the next assembly records it); False if there is no such entry."""

    def remove(self, guid: str) -> None:
        """Remove an entry and the directories above it it leaves empty."""

    def has_slices(self, directory: str) -> bool: ...


class MetadataIndex(Protocol):
    """The metadata registered with each slice (the paper's Patient, Image, Medical, DICOM
    and Protocol tables, and the erased header values), and search over it."""

    def add(self, guid: str, metadata: ImageMetadata) -> None: ...

    def remove(self, guid: str) -> None:
        """Remove an image's metadata; its patient's too with the patient's last image."""

    def metadata(self, guid: str) -> ImageMetadata | None: ...

    def series_images(self, directory: str) -> dict[str, dict]:
        """Image-table rows (GUID → row) of the slices in a series directory: what a volume
        plan needs, without reading any pixel."""

    def sop_classes(self, guids: Sequence[str]) -> dict[str, str]:
        """The SOP Class UID each of these slices was registered with (GUID → UID): what a
        retrieve offers, without asking the PACS."""

    def original_guid(self, study: str, series: str, sop: str | None) -> str | None:
        """The GUID of the slice with these PACS (original) UIDs; with ``sop`` None, of any
        slice of that series."""

    def search(self, query: Query, attributes: Sequence[Attribute], limit: int | None = None) -> Iterator[Match]:
        """Slices whose metadata matches ``query`` (in an order stable for a given catalog), at
        most ``limit``, each with the values of ``attributes`` and of those the query filters on.
        No rights applied: the caller filters (``srm_dicom.query.visible``) and may stop early.
        Values are bound, never spliced."""

    def matches(self, guids: Sequence[str], attributes: Sequence[Attribute]) -> dict[str, Match]:
        """The entry and the values of ``attributes`` of each of these slices (GUID → Match), in
        one query per chunk of ``LOOKUP_CHUNK``; slices not in the catalog are absent."""

    def aggregate(
        self, query: Query, facts: RightsFacts, flags: Sequence[Query] = (), attributes: Sequence[Attribute] = (),
        per_study: bool = False,
    ) -> list[Group]:
        """The slices matching ``query``, counted per series directory (``per_study``: per study
        directory), rights class (``RightsFacts``) and truth of each of ``flags``, in directory
        order, each group's sample with its values of ``attributes``: what QIDO-RS answers of
        studies and series is counted in the database, never by reading every image (README,
        "QIDO-RS at scale"). A backend may split a group further by the value of one of
        ``attributes`` (the SQL core does by Modality, which it counts from an index): each
        part then holds one value. A study's group tells how many series it counts, and which
        ones whenever the study has other groups (a series may be in several). No rights
        applied: the core decides once per class (``StorageService.aggregate``)."""


@dataclass(frozen=True)
class RightsFacts:
    """What the permission decisions (``srm_dicom.access``) read of an entry for one caller,
    beside its file mode and metadata mode: whether its owner is ``dn``, whether its VO is
    ``vo``, the per-DN entry of ``dn``, and whether its LFN is each of ``paths`` or below it.
    Entries alike in all of these get the same answers for that caller (``access.reads``
    says so where the rules are), so a backend may sort entries into rights classes and the
    core decide once per class."""

    dn: str | None = None
    vo: str | None = None
    paths: tuple[str, ...] = ()


@dataclass(slots=True)
class Group:
    """Matching slices of one directory (a series, or a study) in one rights class, counted by
    the backend: the class's key (opaque to the core), the truth of each flag (a condition the
    group is split on), how many, and one of them (the least GUID) with its values of the
    attributes asked for. ``level`` is the caller's metadata level on them, set by the core,
    which also narrows ``values`` to what that level reaches. Not frozen: a QIDO-RS /series
    answer at 10^5 images holds 10^4 groups, and a frozen dataclass costs 3x as much to make."""

    directory: str
    rights: tuple[object, ...]
    flags: tuple[bool, ...]
    count: int
    sample: str
    values: dict[str, Any] = field(default_factory=dict)
    level: str | None = None
    series: int = 1  # the series directories a study's group counts
    series_directories: tuple[str, ...] = ()  # which ones, when its study has other groups


class StageStore(Protocol):
    """Stage requests and pins: they survive a restart of the server."""

    def add_stage_request(self, request: StageRequest) -> None: ...

    def stage_request(self, request_id: str) -> StageRequest | None: ...

    def set_stage_state(self, guid: str, state: str, at: int, error: str | None = None) -> None:
        """Move every not yet final file of ``guid``, in every request, to ``state``
        (STARTED or a final state); COMPLETED starts each request's pin lifetime."""

    def set_stage_states(self, states: Mapping[str, tuple[str, str | None]], at: int) -> None:
        """``set_stage_state`` for many GUIDs (GUID → (state, error)) in one statement batch, in
        one transaction: what a staging batch writes."""

    def cancel_stage_files(self, request_id: str, lfns: list[str], at: int) -> None:
        """CANCELLED for those of ``lfns`` not yet final; their pins are released."""

    def reopen_stage_files(self, request_id: str, guids: Sequence[str]) -> None:
        """SUBMITTED again, with no pin, for those of ``guids`` the request holds as COMPLETED:
        files found on disk when it was written and evicted before its pins were."""

    def release_stage_files(self, request_id: str | None, lfns: list[str] | None) -> None:
        """Release the pins of ``lfns`` (all files if None) of one request, or of every request."""

    def delete_stage_request(self, request_id: str) -> bool: ...

    def staging_guids(self) -> list[str]:
        """GUIDs that some request still waits for (SUBMITTED or STARTED), oldest request first."""

    def pinned_guids(self, now: int) -> set[str]:
        """GUIDs with a COMPLETED, unreleased file whose pin has not expired at ``now``."""

    def protected_guids(self, now: int) -> set[str]:
        """What no front end may evict from the site's cache: ``pinned_guids`` and the GUIDs of
        the jobs being staged (STARTED: their batch publishes them before marking them done), in
        one snapshot, so that a file moving from staged to pinned is never unprotected."""

    # -- staging jobs: one per GUID for the whole site, claimed by one front end at a time
    # (README, "Several front ends"). Leases are measured by the database's clock, so front
    # ends whose clocks differ still agree on when one lapses.

    def enqueue_jobs(self, batches: Mapping[str, str]) -> dict[str, int]:
        """Queue a job for each GUID (GUID → its batch) unless one is queued or running already;
        the attempt each caller waits for."""

    def claim_jobs(self, holder: str, lease: float, limit: int) -> list[StageJob]:
        """Claim for ``holder``, for ``lease`` seconds, the oldest claimable job (queued, or
        running under a lapsed lease) and up to ``limit`` claimable jobs of its batch, none of
        which any other holder can claim at the same time; [] if there are none."""

    def renew_jobs(self, holder: str, guids: Sequence[str], lease: float) -> int:
        """Extend ``holder``'s leases on ``guids`` by ``lease`` seconds from now; how many it still held."""

    def finish_jobs(self, holder: str, outcomes: Mapping[str, tuple[str, str | None]], at: int) -> None:
        """End ``holder``'s jobs (GUID → (COMPLETED or FAILED, error)) and set the files of every
        request waiting for them (``set_stage_states``), in one transaction."""

    def release_jobs(self, holder: str, guids: Sequence[str]) -> None:
        """Give ``holder``'s claims on ``guids`` back to the queue, for any front end to take now."""

    def jobs(self, guids: Sequence[str]) -> dict[str, StageJob]:
        """The jobs of these GUIDs (GUIDs never queued are absent)."""


class Backend(Protocol):
    """What a plugin of the ``srm_dicom.catalog`` group provides: the three stores over one
    database, and transactions that span them."""

    namespace: Namespace
    index: MetadataIndex
    stages: StageStore

    def transaction(self) -> AbstractContextManager[None]:
        """Everything the stores do inside it commits together or not at all (nesting joins
        the outer transaction)."""

    @property
    def schema_version(self) -> int: ...

    @property
    def latest_version(self) -> int:
        """The schema version this code writes (``mdm catalog migrate`` brings a catalog to it)."""

    def migrate(self) -> tuple[int, int]:
        """Apply the migrations not yet applied: (version before, version after)."""

    def table_counts(self) -> dict[str, int]: ...

    def copy_to(self, target: Backend, progress: Callable[[str, int], None]) -> dict[str, int]:
        """Every row into the empty ``target`` (another backend); the target's counts after."""

    def close(self) -> None: ...


class Catalog:
    """The catalog the rest of the code uses: a backend's three stores, and the domain rules
    that span them, written once here rather than in each backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.namespace = backend.namespace
        self.index = backend.index
        self.stages = backend.stages

    def register_image(
        self, entry: Entry, metadata: ImageMetadata, volume: Entry, sidecars: Sequence[Entry] = ()
    ) -> Outcome:
        """Add or update a slice with its metadata and create or bump its series volume (and
        the volume's sidecars: their content follows the series too).

        One transaction: either the entry, its metadata and the volume change are all
        stored, or nothing is. Same source digest and protection record as the stored entry:
        nothing changes.
        """
        with self.backend.transaction():
            old = self.namespace.lookup(entry.lfn)
            if old and (old.source_digest, old.protection) == (entry.source_digest, entry.protection):
                return Outcome.UNCHANGED
            now = time.time()
            if old:
                if (old.guid, old.content_version + 1) != (entry.guid, entry.content_version):
                    raise CatalogConflict(f"{entry.lfn} changed while it was being registered; register it again")
                self.namespace.replace_content(entry, now)
                self.index.remove(old.guid)
            else:
                self.namespace.insert(entry, now)
            self.index.add(entry.guid, metadata)
            for series_file in (volume, *sidecars):
                if not self.namespace.bump_volume(series_file.lfn, series_file.size, now):
                    self.namespace.insert(series_file, now)
            return Outcome.UPDATED if old else Outcome.ADDED

    def delete(self, lfn: str) -> Entry | None:
        """Remove an entry and its metadata; a slice's volume is bumped (its size is unknown
        until the next assembly), or removed with its last slice."""
        with self.backend.transaction():
            entry = self.namespace.lookup(lfn)
            if entry is None:
                return None
            self.index.remove(entry.guid)
            self.namespace.remove(entry.guid)
            if entry.kind == "slice":
                directory = posixpath.dirname(entry.lfn)
                slices_left = self.namespace.has_slices(directory)
                for name in SERIES_FILES:
                    series_lfn = posixpath.join(directory, name)
                    if slices_left:
                        self.namespace.bump_volume(series_lfn, None, time.time())
                    elif series_file := self.namespace.lookup(series_lfn):
                        self.namespace.remove(series_file.guid)
            return entry

    def lookup_uids(self, triple: UidTriple) -> Entry | None:
        """Find by the names' UIDs or by the PACS's original UIDs."""
        found = self.namespace.lookup_uids(triple)
        if found:
            return found
        guid = self.index.original_guid(triple.study, triple.series, None if triple.is_volume else triple.sop)
        image = self.namespace.lookup_guid(guid) if guid else None
        if image is None or not triple.is_volume:
            return image
        return self.namespace.lookup(posixpath.join(posixpath.dirname(image.lfn), triple.sop))

    def close(self) -> None:
        self.backend.close()


def open_catalog(config: Config, migrate: bool = True) -> Catalog:
    """Instantiate the configured backend from its entry point; its schema is brought up to
    date unless ``migrate`` is False."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=config.catalog.backend)
    if not found:
        known = ", ".join(sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)))
        raise ConfigError(
            f"config: catalog backend '{config.catalog.backend}' is not installed (known: {known})"
        )
    backend = next(iter(found)).load()
    return Catalog(backend.from_config(config, migrate))


def catalog_config(url: str) -> CatalogConfig:
    """The backend a catalog URL names: ``postgresql://…`` (or ``postgres://…``), else an
    SQLite file (a path, or ``sqlite:///path``)."""
    if url.startswith(("postgresql://", "postgres://")):
        return CatalogConfig("postgresql", url)
    return CatalogConfig("sqlite", url.removeprefix("sqlite://"))


_GUID = re.compile(r"^(?:guid:|/guid/)?([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def find_entry(catalog: Catalog, spec: list[str] | str) -> Entry:
    """Resolve any identifier users type: an LFN, a GUID (``guid:…``, ``/guid/…`` or bare),
    or a study/series/sop triple in any of the seeds' forms, with original or names' UIDs."""
    parts = [spec] if isinstance(spec, str) else spec
    text = " ".join(parts).strip()
    if text.startswith("/grid/"):
        parse_lfn(text)
        entry = catalog.namespace.lookup(text)
    elif guid := _GUID.match(text.lower()):
        entry = catalog.namespace.lookup_guid(guid.group(1))
    elif text.lower().startswith(("guid:", "/guid/")):
        raise InvalidInput(f"'{text}' is not a GUID (guid:<uuid>, e.g. guid:1b4e28ba-2fa1-41d2-883f-0016d3cca427)")
    else:
        entry = catalog.lookup_uids(parse_sop_spec(parts))
    if entry is None:
        raise NotFound(f"no such entry: {text}")
    return entry
