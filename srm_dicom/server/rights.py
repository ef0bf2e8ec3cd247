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

from srm_dicom.errors import InvalidInput
from srm_dicom.identity import Identity
from srm_dicom.keystore import KeystoreError
from srm_dicom.server.problems import StartResponse, json_body, problem, respond_json
from srm_dicom.server.rights_paths import DELETE, RIGHTS
from srm_dicom.service import StorageService
from srm_dicom.setright import Rights, RightsChange


def _paths(data: dict) -> list[str]:
    paths = data.get("paths", [data["path"]] if "path" in data else None)
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise InvalidInput("give 'path' (a string) or 'paths' (a non-empty list of strings)")
    return paths


class RightsApi:
    """HTTP of the rights and delete APIs; who may manage what is the StorageService's."""

    def __init__(self, service: StorageService) -> None:
        self._service = service

    @staticmethod
    def handles(path: str) -> bool:
        return path.rstrip("/") in (RIGHTS, DELETE)

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "").rstrip("/")
        if method != "POST":
            return problem(start_response, HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes POST", [("Allow", "POST")])
        try:
            data = json_body(environ)
            if path == RIGHTS:
                change = RightsChange.from_json(data)
                done = self._service.set_rights(identity, _paths(data), change)
                answer = [{"path": e.lfn, **Rights.of(e).to_json()} for e in done]
                return respond_json(start_response, HTTPStatus.OK, {"entries": answer})
            return respond_json(start_response, HTTPStatus.OK, {"deleted": self._service.delete(identity,
                                                                                                _paths(data))})
        except KeystoreError as exc:
            return problem(start_response, HTTPStatus.BAD_GATEWAY, str(exc))
