"""The catalog as a read-only WebDAV tree, for PROPFIND and OPTIONS (wsgidav).

``/grid/<vo>/mdm/<Study>/<Series>/<SOP|3D>`` are the names; ``/guid/<uuid>`` reaches an
entry by GUID. Collections list only what the caller may list (``x``); the caller's
identity is put in the environ by the application in front of wsgidav.
"""

from __future__ import annotations

import posixpath

from wsgidav.dav_provider import DAVCollection, DAVNonCollection, DAVProvider
from wsgidav.request_resolver import RequestResolver
from wsgidav.wsgidav_app import WsgiDAVApp

from srm_dicom.access import may_browse, may_list
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.identity import Identity
from srm_dicom.names import normalize_lfn

IDENTITY = "srm_dicom.identity"


def _identity(environ: dict) -> Identity:
    return environ[IDENTITY]


class EntryResource(DAVNonCollection):
    def __init__(self, path: str, environ: dict, entry: Entry) -> None:
        super().__init__(path, environ)
        self.entry = entry

    def get_content_length(self) -> int | None:
        return self.entry.size

    def get_content_type(self) -> str:
        return "application/octet-stream"

    def get_creation_date(self) -> float:
        return self.entry.created

    def get_last_modified(self) -> float:
        return self.entry.modified

    def get_etag(self) -> str:
        return f"{self.entry.guid}-{self.entry.content_version}"

    def support_etag(self) -> bool:
        return True

    def support_ranges(self) -> bool:
        return True

    def get_content(self):  # noqa: ANN201 - GET and HEAD of files never reach wsgidav (server/files.py)
        raise NotImplementedError("files are served by FileService")


class Directory(DAVCollection):
    """A directory implied by the LFNs (or one of the fixed levels above them)."""

    def __init__(self, path: str, environ: dict, provider: CatalogProvider) -> None:
        super().__init__(path, environ)
        self._provider = provider

    def get_member_names(self) -> list[str]:
        return [posixpath.basename(p.rstrip("/")) for p in self._provider.children(self.path, self.environ)]

    def get_member(self, name: str):  # noqa: ANN201 - a wsgidav resource
        return self._provider.get_resource_inst(posixpath.join(self.path, name), self.environ)

    def get_creation_date(self) -> None:
        return None

    def get_last_modified(self) -> None:
        return None


class CatalogProvider(DAVProvider):
    def __init__(self, catalog: Catalog, vo: str) -> None:
        super().__init__()
        self._catalog = catalog
        self._vo = vo

    def is_readonly(self) -> bool:
        return True

    def _fixed(self, path: str) -> list[str] | None:
        """Members of the levels above the catalog's directories: /, /grid, /grid/<vo>, /guid."""
        return {"/": ["/grid", "/guid"], "/grid": [f"/grid/{self._vo}"], f"/grid/{self._vo}": [f"/grid/{self._vo}/mdm"],
                "/guid": []}.get(path)

    def children(self, path: str, environ: dict) -> list[str]:
        identity = _identity(environ)
        fixed = self._fixed(path)
        if fixed is not None:
            return fixed
        if not may_browse(identity, self._vo, path):
            return []
        listing = self._catalog.namespace.list_dir(path)
        if listing is None:
            return []
        return listing.directories + [e.lfn for e in listing.entries if may_list(identity, e)]

    def get_resource_inst(self, path: str, environ: dict):  # noqa: ANN201 - a wsgidav resource or None
        path = normalize_lfn(path) if path not in ("", "/") else "/"
        identity = _identity(environ)
        if self._fixed(path) is not None:
            return Directory(path, environ, self)
        if path.startswith("/guid/"):
            entry = self._catalog.namespace.lookup_guid(path.removeprefix("/guid/"))
            return EntryResource(path, environ, entry) if entry and may_list(identity, entry) else None
        root = f"/grid/{self._vo}/mdm"
        if not (path == root or path.startswith(root + "/")):
            return None
        entry = self._catalog.namespace.lookup(path)
        if entry is not None:  # an entry its mode lets a caller list is visible even outside its VO
            return EntryResource(path, environ, entry) if may_list(identity, entry) else None
        if not may_browse(identity, self._vo, path):
            return None
        exists = path == root or self._catalog.namespace.list_dir(path) is not None
        return Directory(path, environ, self) if exists else None


def webdav_app(catalog: Catalog, vo: str) -> WsgiDAVApp:
    """wsgidav for PROPFIND/OPTIONS only: no authentication of its own (done in front of it),
    no locks, no dead properties, no HTML browser, and no error pages: its only middleware is
    the request resolver, so its errors (DAVError) reach the application's one mapping to
    RFC 7807 (``problems.problem_of``)."""
    return WsgiDAVApp(
        {
            "provider_mapping": {"/": CatalogProvider(catalog, vo)},
            "middleware_stack": [RequestResolver],
            "http_authenticator": {"domain_controller": None, "accept_basic": False, "accept_digest": False,
                                   "default_to_digest": False},
            "simple_dc": {"user_mapping": {"*": True}},
            "lock_storage": False,
            "property_manager": None,
            "dir_browser": {"enable": False},
            "verbose": 1,
            "logging": {"enable": False},
            "suppress_version_info": True,
        }
    )
