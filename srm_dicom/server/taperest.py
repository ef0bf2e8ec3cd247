"""WLCG Tape REST API v1 (what dCache, StoRM and gfal2 ≥ 2.21 speak), with the PACS as tape.

Routes are accepted with and without a trailing slash (Debian's gfal2 2.21.3 posts to
``/stage/`` and ``/archiveinfo/``); unknown fields in bodies are ignored; every error is
an RFC 7807 problem.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus

from srm_dicom.access import may_list, may_stage
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.config import Config
from srm_dicom.errors import InvalidInput, NotFound, Refused
from srm_dicom.identity import Identity
from srm_dicom.server.problems import StartResponse, json_body, problem, respond_json
from srm_dicom.stager import Stager

ROOT = "/api/v1/tape"
DISCOVERY = "/.well-known/wlcg-tape-rest-api"
PLACEHOLDER = "gfal2-placeholder-id"  # gfal-evict releases by path with this request id
MAX_DISK_LIFETIME = 365 * 24 * 3600
_DURATION = re.compile(r"P(?:([0-9]{1,15})D)?(?:T(?:([0-9]{1,15})H)?(?:([0-9]{1,15})M)?(?:([0-9]{1,15})S)?)?")


def _paths(data: dict) -> list[str]:
    paths = data.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise InvalidInput("'paths' must be a non-empty list of strings")
    return paths


class TapeRestApi:
    def __init__(
        self, config: Config, catalog: Catalog, stager: Stager, resolve: Callable[[str], Entry | None]
    ) -> None:
        self._config = config
        self._catalog = catalog
        self._stager = stager
        self._resolve = resolve

    def discovery(self, start_response: StartResponse, base_url: str) -> list[bytes]:
        return respond_json(start_response, HTTPStatus.OK, {
            "sitename": self._config.server.sitename,
            "description": "srm-dicom: a PACS behind a grid storage element (the PACS plays the tape)",
            "endpoints": [{"uri": f"{base_url}{ROOT}", "version": "v1"}],
        })

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        parts = [p for p in environ.get("PATH_INFO", "").removeprefix(ROOT).split("/") if p]
        match method, parts:
            case "POST", ["stage"]:
                return self._stage(environ, start_response, identity)
            case "GET", ["stage", request_id]:
                return self._status(start_response, identity, request_id)
            case "POST", ["stage", request_id, "cancel"]:
                self._own(identity, request_id)
                self._stager.cancel(request_id, self._lfns(_paths(json_body(environ)), identity))
                return respond_json(start_response, HTTPStatus.OK, {})
            case "DELETE", ["stage", request_id]:
                self._own(identity, request_id)
                self._stager.delete(request_id)
                return respond_json(start_response, HTTPStatus.OK, {})
            case "POST", ["release", request_id]:
                lfns = self._lfns(_paths(json_body(environ)), identity)
                if request_id == PLACEHOLDER:
                    self._stager.release_paths(lfns)
                else:
                    self._own(identity, request_id)
                    self._stager.release(request_id, lfns)
                return respond_json(start_response, HTTPStatus.OK, {})
            case "POST", ["archiveinfo"]:
                return self._archiveinfo(environ, start_response, identity)
        return problem(start_response, HTTPStatus.NOT_FOUND, f"no such Tape REST operation: {method} {ROOT}/"
                       + "/".join(parts))

    def _entry(self, path: str, identity: Identity) -> Entry:
        entry = self._resolve(path)
        if entry is None or not may_list(identity, entry):
            raise NotFound(f"no such file: {path}")
        return entry

    def _lfns(self, paths: list[str], identity: Identity) -> list[str]:
        return [self._entry(path, identity).lfn for path in paths]

    def _own(self, identity: Identity, request_id: str) -> None:
        request = self._stager.request(request_id)
        if request is None:
            raise NotFound(f"no such stage request: {request_id}")
        if request.requester != identity.subject and identity.kind != "service" and "register" not in identity.groups:
            raise Refused(f"stage request {request_id} belongs to someone else")

    def _stage(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        files = json_body(environ).get("files")
        if not isinstance(files, list) or not files:
            raise InvalidInput("'files' must be a non-empty list of {\"path\": ...}")
        entries, lifetimes = [], []
        for item in files:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise InvalidInput("every file needs a 'path' string")
            entry = self._entry(item["path"], identity)
            if not may_stage(identity, entry):
                raise Refused(f"{identity.subject} may not stage {item['path']}")
            entries.append(entry)
            lifetime = item.get("diskLifetime")
            if lifetime is not None:
                lifetimes.append(_lifetime(lifetime))
        request_id = self._stager.submit(entries, max(lifetimes) if lifetimes else None, identity.subject)
        return respond_json(start_response, HTTPStatus.CREATED, {"requestId": request_id},
                            [("Location", f"{ROOT}/stage/{request_id}")])

    def _status(self, start_response: StartResponse, identity: Identity, request_id: str) -> list[bytes]:
        self._own(identity, request_id)
        request = self._stager.request(request_id)
        assert request is not None
        files = []
        for file in request.files:
            item: dict = {"path": file.lfn, "state": file.state, "onDisk": file.on_disk}
            if file.error:
                item["error"] = file.error
            if file.started_at is not None:
                item["startedAt"] = file.started_at
            if file.finished_at is not None:
                item["finishedAt"] = file.finished_at
            files.append(item)
        answer: dict = {"id": request.id, "createdAt": request.created_at, "startedAt": request.started_at or
                        request.created_at, "files": files}
        if request.completed_at is not None:
            answer["completedAt"] = request.completed_at
        return respond_json(start_response, HTTPStatus.OK, answer)

    def _archiveinfo(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        answer = []
        for path in _paths(json_body(environ)):
            entry = self._resolve(path)
            if entry is None or not may_list(identity, entry):
                answer.append({"path": path, "error": "no such file"})
            else:
                answer.append({"path": path, "locality": self._stager.locality(entry)})
        return respond_json(start_response, HTTPStatus.OK, answer)


def _lifetime(value: object) -> int:
    """diskLifetime: seconds, or an ISO 8601 duration like PT1H / P1D (what gfal2 sends). A
    longer one than MAX_DISK_LIFETIME is shortened to it, as SRM servers shorten a desired pin
    lifetime (a pin of centuries would overflow the clock and hold the cache forever)."""
    seconds = None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        seconds = value
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match and any(match.groups()):
            days, hours, minutes, secs = (int(g or 0) for g in match.groups())
            seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if seconds is None:
        raise InvalidInput(f"diskLifetime must be seconds or an ISO 8601 duration, not {str(value)[:80]!r}")
    return min(seconds, MAX_DISK_LIFETIME)
