"""The grid side's way to change rights and delete entries: a small JSON API.

WebDAV stays read-only for the grid (writes answer 405), so the owner of an entry, or a
member of the hospital's ``register`` group, manages it here with their certificate:

    POST /api/v1/rights  {"path" | "paths", "mode"?: "rwxr-x---",
                          "metadata"?: "private|group|anonymous|public",
                          "users"?: [{"dn", "perms": "r-x", "metadata": "none|anonymous|all"}]}
         → 200 {"entries": [{"path", "mode", "metadata", "users"}]}
    POST /api/v1/delete  {"paths"} → 200 {"deleted": [LFN, ...]}

A path is an LFN (an image, a 3D, a series or a study directory), ``/guid/<uuid>``, or
study/series/SOP UIDs (``S,SE,SOP``, ``/S/SE/SOP``, ``S,SE``…): the names' UIDs, or the
PACS's original ones, mapped here with the site secret the grid client does not have
(``mdm set-right -f LOCAL.dcm`` relies on it). Whoever may not manage an entry named by
original UIDs gets 404, as if it did not exist: such a caller must not learn which
original UIDs this site holds. Every entry named is checked before anything changes.
Errors are RFC 7807 problems; key server failures answer 502 and say which rights hold.
"""

from __future__ import annotations

from http import HTTPStatus

from srm_dicom.access import may_list, may_manage
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.config import Config
from srm_dicom.errors import InvalidInput, NotFound, Refused
from srm_dicom.identity import Identity
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.protect import key_name
from srm_dicom.server.problems import StartResponse, json_body, problem, respond_json
from srm_dicom.setright import Rights, RightsChange, RightsSetter, select, site_secret

RIGHTS = "/api/v1/rights"
DELETE = "/api/v1/delete"


def _paths(data: dict) -> list[str]:
    paths = data.get("paths", [data["path"]] if "path" in data else None)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise InvalidInput("give 'path' (a string) or 'paths' (a non-empty list of strings)")
    return paths


class RightsApi:
    def __init__(self, config: Config, catalog: Catalog) -> None:
        self._config = config
        self._catalog = catalog
        self._setter = RightsSetter.from_config(config, catalog)
        self._keystore = KeystoreClient.from_config(config)

    @staticmethod
    def handles(path: str) -> bool:
        return path.rstrip("/") in (RIGHTS, DELETE)

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").rstrip("/")
        if method != "POST":
            return problem(start_response, HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST", [("Allow", "POST")])
        data = json_body(environ)  # errors answer by their status: 400, 403, 404, 502 (key servers)
        entries = self._managed(_paths(data), identity)
        if path == RIGHTS:
            change = RightsChange.from_json(data)
            done = self._setter.apply(entries, change)
            answer = [{"path": e.lfn, **Rights.of(e).to_json()} for e in done]
            return respond_json(start_response, HTTPStatus.OK, {"entries": answer})
        return respond_json(start_response, HTTPStatus.OK, {"deleted": [self._delete(e) for e in entries]})

    def _managed(self, paths: list[str], identity: Identity) -> list[Entry]:
        """Every entry the paths name, once each; refused as a whole if any may not be managed."""
        found: dict[str, Entry] = {}
        for path in paths:
            selection = select(self._catalog, self._config.site.vo, path, site_secret(self._config))
            refused = [e for e in selection.entries if not may_manage(identity, e)]
            if refused and (selection.by_original or not all(may_list(identity, e) for e in refused)):
                raise NotFound(f"no such study, series or image: {path}")  # nothing told about what exists
            if refused:
                raise Refused(f"{identity.subject} may not change the rights of {refused[0].lfn} or delete it "
                              "(its owner and the register group only)")
            found.update((e.guid, e) for e in selection.entries)
        return list(found.values())

    def _delete(self, entry: Entry) -> str:
        """Like ``mdm del`` on the hospital side: the entry goes, its key shares too, the image stays in the PACS."""
        self._catalog.delete(entry.lfn)  # None when a series' last slice took its 3D along: its key goes below
        self._keystore.delete_key(key_name(entry.guid, entry.content_version))
        return entry.lfn
