"""One StorageService between every HTTP front end and the domain.

WebDAV, the file GETs, Tape REST, the metadata API, QIDO-RS and the rights API parse
HTTP and format answers; everything they do with the storage element goes through this
class, with the caller's ``Identity``. Every decision is asked of ``srm_dicom.access``;
refusals raise ``Refused`` (403), unknown or invisible names ``NotFound`` (404), so a
front end never decides who may do what.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from srm_dicom import access
from srm_dicom.catalog import Catalog, Entry, Group, StageRequest, find_entry
from srm_dicom.config import Config
from srm_dicom.entry_key import key_name
from srm_dicom.errors import InvalidInput, NotFound, Refused
from srm_dicom.identity import Identity, normalize_path
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.macaroons import MacaroonAuthority, MacaroonRequest
from srm_dicom.names import normalize_lfn
from srm_dicom.query import Attribute, Query, Visible, level_of, shown, visible
from srm_dicom.setright import RightsChange, RightsSetter, select, site_secret
from srm_dicom.stager import Stager


@dataclass(frozen=True)
class Opened:
    """A file a caller may read: its entry (sizes as the catalog now says), the cached
    file (None for a HEAD of a file not on disk) and whether it was not on disk before."""

    entry: Entry
    path: Path | None
    staged: bool


@dataclass(frozen=True)
class Listing:
    """What a caller sees of a directory: its subdirectories and the entries they may list."""

    directories: list[str]
    entries: list[Entry]


class StorageService:
    """The storage element's operations, each for one caller. Thread-safe as its parts are."""

    def __init__(self, config: Config, catalog: Catalog, stager: Stager) -> None:
        self.config = config
        self.catalog = catalog
        self.stager = stager
        self.vo = config.site.vo
        self._setter = RightsSetter.from_config(config, catalog)
        self._keystore = KeystoreClient.from_config(config)
        self.macaroons = MacaroonAuthority(config.site.secret_bytes, config.server.sitename,
                                           config.tokens.macaroon_max_lifetime)

    # -- names -------------------------------------------------------------------------

    def resolve(self, path: str) -> Entry | None:
        """The entry an URL path names: an LFN or /guid/<uuid>; None for anything else."""
        path = normalize_lfn(path.split("?", 1)[0])
        if path.startswith("/guid/"):
            return self.catalog.namespace.lookup_guid(path.removeprefix("/guid/"))
        if path.startswith("/grid/"):
            return self.catalog.namespace.lookup(path)
        return None

    def resolve_many(self, paths: Sequence[str]) -> list[Entry | None]:
        """``resolve`` of each path, the LFNs in one bulk lookup (a few catalog queries for a
        Tape REST request of 10^4 paths, not one per path)."""
        cleaned = [normalize_lfn(path.split("?", 1)[0]) for path in paths]
        found = self.catalog.namespace.lookup_many([p for p in cleaned if p.startswith("/grid/")])
        return [found.get(p) if p.startswith("/grid/") else self.resolve(p) for p in cleaned]

    def visible(self, identity: Identity, path: str) -> Entry | None:
        """The entry ``path`` names if the caller may list it; None otherwise (as if absent)."""
        entry = self.resolve(path)
        return entry if entry is not None and access.may_list(identity, entry) else None

    def _listed(self, identity: Identity, path: str) -> Entry:
        return self._all_listed(identity, [path])[0]

    def _all_listed(self, identity: Identity, paths: Sequence[str]) -> list[Entry]:
        """The entry of each path; NotFound naming the first the caller does not see."""
        entries = []
        for path, entry in zip(paths, self.resolve_many(paths), strict=True):
            if entry is None or not access.may_list(identity, entry):
                raise NotFound(f"no such file: {path}")
            entries.append(entry)
        return entries

    def may_browse(self, identity: Identity, path: str) -> bool:
        return access.may_browse(identity, self.vo, path)

    def listing(self, identity: Identity, path: str) -> Listing | None:
        """A directory of the namespace as the caller sees it; None if it is not one for them."""
        if not self.may_browse(identity, path):
            return None
        found = self.catalog.namespace.list_dir(path)
        if found is None:
            return None
        return Listing(found.directories, [e for e in found.entries if access.may_list(identity, e)])

    # -- files -------------------------------------------------------------------------

    def open(self, identity: Identity, entry: Entry, *, stage: bool) -> Opened:
        """A file to serve: refused unless the caller may read it; staged first when
        ``stage`` (waiting up to [cache] wait_timeout, then StagingPending)."""
        if not access.may_list(identity, entry):  # as if it did not exist: a 403 would tell that it does
            raise NotFound(f"no such file: {entry.lfn}")
        if not access.may_read(identity, entry):
            raise Refused(f"{identity.subject} may not read {entry.lfn}")
        path = self.stager.cached_path(entry)
        staged = path is None
        if path is None and stage:
            path = self.stager.fetch(entry, self.config.cache.wait_timeout)
            entry = self.catalog.namespace.lookup_guid(entry.guid) or entry  # a volume's size is known now
        return Opened(entry, path, staged)

    # -- stage requests (Tape REST) ----------------------------------------------------

    def stage(self, identity: Identity, files: Sequence[tuple[str, int | None]]) -> str:
        """Submit a stage request for (path, pin lifetime) pairs; its id."""
        entries = self._all_listed(identity, [path for path, _ in files])
        for (path, _), entry in zip(files, entries, strict=True):
            if not access.may_stage(identity, entry):
                raise Refused(f"{identity.subject} may not stage {path}")
        lifetimes = [lifetime for _, lifetime in files if lifetime is not None]
        return self.stager.submit(entries, max(lifetimes) if lifetimes else None, identity.principal)

    def stage_request(self, identity: Identity, request_id: str) -> StageRequest:
        """A request the caller submitted (or may see: the register group, the service)."""
        request = self.stager.request(request_id)
        if request is None:
            raise NotFound(f"no such stage request: {request_id}")
        if not access.may_manage_request(identity, request):
            raise Refused(f"stage request {request_id} belongs to someone else")
        return request

    def cancel(self, identity: Identity, request_id: str, paths: Iterable[str]) -> None:
        self.stage_request(identity, request_id)
        self.stager.cancel(request_id, self._lfns(identity, paths))

    def delete_request(self, identity: Identity, request_id: str) -> None:
        self.stage_request(identity, request_id)
        self.stager.delete(request_id)

    def release(self, identity: Identity, request_id: str | None, paths: Iterable[str]) -> None:
        """Release pins of one request, or (``request_id`` None, gfal-evict) of every request
        on files the caller may stage."""
        if request_id is not None:
            self.stage_request(identity, request_id)
        lfns = self._lfns(identity, paths)
        if request_id is None:
            found = self.catalog.namespace.lookup_many(lfns)
            for lfn in lfns:
                entry = found.get(lfn)
                if entry is None or not access.may_stage(identity, entry):
                    raise Refused(f"{identity.subject} may not release {lfn}")
            self.stager.release_paths(lfns)
        else:
            self.stager.release(request_id, lfns)

    def _lfns(self, identity: Identity, paths: Iterable[str]) -> list[str]:
        return [entry.lfn for entry in self._all_listed(identity, list(paths))]

    def archiveinfo(self, identity: Identity, paths: Iterable[str]) -> list[tuple[str, str | None]]:
        """(path, locality) per path; locality None where the caller sees no such file."""
        wanted = list(paths)
        return [
            (path, self.stager.locality(entry) if entry is not None and access.may_list(identity, entry) else None)
            for path, entry in zip(wanted, self.resolve_many(wanted), strict=True)
        ]

    # -- metadata ----------------------------------------------------------------------

    def search(self, identity: Identity, query: Query, attributes: Sequence[Attribute],
               needed: str | None = None) -> Iterator[Visible]:
        """The matches the caller may see, in the catalog's order, each with only the
        attributes their metadata level reaches (``needed``: the level the filters need)."""
        matches = self.catalog.index.search(query, attributes)
        return visible(matches, identity, query.level if needed is None else needed, attributes)

    def aggregate(self, identity: Identity, query: Query, needed: str, flags: Sequence[Query] = (),
                  attributes: Sequence[Attribute] = (), per_study: bool = False) -> list[Group]:
        """The matching slices the caller may see (at a level reaching ``needed``), counted per
        series (or study) directory by the catalog, each group with its level and its sample's values of
        ``attributes`` (those the level reaches). Every decision is still ``access``'s, asked
        once per rights class (``access.reads``) of one entry of the class, not once per image."""
        levels: dict[tuple[object, ...], str | None] = {}
        keywords = shown(attributes)
        found = []
        for group in self.catalog.index.aggregate(query, access.reads(identity), flags, attributes, per_study):
            if group.rights not in levels:
                entry = self.catalog.namespace.lookup_guid(group.sample)
                levels[group.rights] = None if entry is None else level_of(identity, entry, needed)
            level = levels[group.rights]
            if level is not None:
                group.level = level
                if len(keywords[level]) < len(group.values):
                    group.values = {k: group.values.get(k) for k in keywords[level]}
                found.append(group)
        return found

    def samples(self, groups: Iterable[Group], attributes: Sequence[Attribute]) -> dict[str, Visible]:
        """The sample slice of each group (GUID → what the caller sees of it at the group's level);
        one deleted meanwhile is absent."""
        wanted = list(groups)
        found = self.catalog.index.matches([g.sample for g in wanted], attributes)
        keywords = shown(attributes)
        return {g.sample: Visible(match.entry, g.level, {k: match.values.get(k) for k in keywords[g.level]})
                for g in wanted if g.level is not None and (match := found.get(g.sample)) is not None}

    def erased(self, identity: Identity, path: str) -> tuple[Entry, list[tuple[str, str, str]]]:
        """The header values anonymization erased from one image: "all" metadata rights only."""
        try:
            entry: Entry | None = find_entry(self.catalog, path)
        except (InvalidInput, NotFound):
            entry = None
        if entry is None or not access.may_list(identity, entry):
            raise NotFound(f"no such file: {path}")
        if access.metadata_level(identity, entry) != "all":
            raise Refused(f"{identity.subject} may not read the erased header values of {entry.lfn}")
        metadata = self.catalog.index.metadata(entry.guid)
        return entry, list(metadata.erased if metadata else ())

    # -- macaroons ----------------------------------------------------------------------

    def issue_macaroon(self, identity: Identity, path: str, request: object) -> str:
        """A macaroon for ``path`` (a file or a directory the caller sees), acting as the
        caller within the request's caveats (a JSON object: caveats, validity)."""
        if not access.may_issue_macaroon(identity):
            raise Refused(f"{identity.subject} may not get a macaroon: certificate (or VOMS proxy) users only")
        wanted = MacaroonRequest.from_json(request, self.macaroons.max_lifetime)
        path = normalize_path(path)
        if self.resolve(path) is not None:
            self._listed(identity, path)
        elif path not in ("/", "/grid", f"/grid/{self.vo}") and self.listing(identity, path) is None:
            raise NotFound(f"no such file or directory: {path}")
        return self.macaroons.issue(identity, path, wanted)

    # -- rights and deletion -----------------------------------------------------------

    def managed(self, identity: Identity, paths: Iterable[str]) -> list[Entry]:
        """Every entry the paths name, once each; refused as a whole if any may not be
        managed. Whoever may not manage an entry named by original UIDs, or may not even list
        it, gets NotFound, as if it did not exist: such a caller must not learn what this site
        holds."""
        found: dict[str, Entry] = {}
        for path in paths:
            selection = select(self.catalog, self.vo, path, site_secret(self.config))
            refused = [e for e in selection.entries if not access.may_manage(identity, e)]
            if refused and (selection.by_original or not all(access.may_list(identity, e) for e in refused)):
                raise NotFound(f"no such study, series or image: {path}")  # nothing told about what exists
            if refused:
                raise Refused(f"{identity.subject} may not change the rights of {refused[0].lfn} or delete it "
                                "(its owner and the register group only)")
            found.update((e.guid, e) for e in selection.entries)
        return list(found.values())

    def set_rights(self, identity: Identity, paths: Iterable[str], change: RightsChange) -> list[Entry]:
        return self._setter.apply(self.managed(identity, paths), change)

    def delete(self, identity: Identity, paths: Iterable[str]) -> list[str]:
        """Like ``mdm del`` on the hospital side: the entries go, their key shares too, the
        images stay in the PACS. Every entry is checked before anything goes."""
        deleted = []
        for entry in self.managed(identity, paths):
            self.catalog.delete(entry.lfn)  # None when a series' last slice took its 3D along: its key goes below
            self._keystore.delete_key(key_name(entry.guid, entry.content_version))
            deleted.append(entry.lfn)
        return deleted
