"""WLCG Tape REST API v1 (what dCache, StoRM and gfal2 ≥ 2.21 speak), with the PACS as tape.

Routes are accepted with and without a trailing slash (Debian's gfal2 2.21.3 posts to
``/stage/`` and ``/archiveinfo/``); unknown fields in bodies are ignored; every error is
an RFC 7807 problem.
"""

from __future__ import annotations

from http import HTTPStatus

from srm_dicom.catalog import StageRequest
from srm_dicom.config import Config
from srm_dicom.durations import parse_duration
from srm_dicom.errors import InvalidInput
from srm_dicom.identity import Identity
from srm_dicom.server.problems import StartResponse, json_body, problem, respond_json
from srm_dicom.service import StorageService

ROOT = "/api/v1/tape"
DISCOVERY = "/.well-known/wlcg-tape-rest-api"
PLACEHOLDER = "gfal2-placeholder-id"  # gfal-evict releases by path with this request id
MAX_DISK_LIFETIME = 365 * 24 * 3600


def _paths(data: dict) -> list[str]:
    paths = data.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise InvalidInput("'paths' must be a non-empty list of strings")
    return paths


class TapeRestApi:
    """HTTP of the Tape REST API; every operation is the StorageService's."""

    def __init__(self, config: Config, service: StorageService) -> None:
        self._config = config
        self._service = service

    def discovery(self, start_response: StartResponse, base_url: str) -> list[bytes]:
        return respond_json(start_response, HTTPStatus.OK, {
            "sitename": self._config.server.sitename,
            "description": "srm-dicom: a PACS behind a grid storage element (the PACS plays the tape)",
            "endpoints": [{"uri": f"{base_url}{ROOT}", "version": "v1"}],
        })

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        method = environ["REQUEST_METHOD"]
        parts = [p for p in environ.get("PATH_INFO", "").removeprefix(ROOT).split("/") if p]
        service = self._service
        match method, parts:
            case "POST", ["stage"]:
                request_id = service.stage(identity, _files(json_body(environ)))
                return respond_json(start_response, HTTPStatus.CREATED, {"requestId": request_id},
                                    [("Location", f"{ROOT}/stage/{request_id}")])
            case "GET", ["stage", request_id]:
                return respond_json(start_response, HTTPStatus.OK, _status(service.stage_request(identity,
                                                                                                 request_id)))
            case "POST", ["stage", request_id, "cancel"]:
                service.cancel(identity, request_id, _paths(json_body(environ)))
                return respond_json(start_response, HTTPStatus.OK, {})
            case "DELETE", ["stage", request_id]:
                service.delete_request(identity, request_id)
                return respond_json(start_response, HTTPStatus.OK, {})
            case "POST", ["release", request_id]:
                service.release(identity, None if request_id == PLACEHOLDER else request_id,
                                _paths(json_body(environ)))
                return respond_json(start_response, HTTPStatus.OK, {})
            case "POST", ["archiveinfo"]:
                answer = [{"path": path, "locality": locality} if locality else {"path": path, "error": "no such file"}
                          for path, locality in service.archiveinfo(identity, _paths(json_body(environ)))]
                return respond_json(start_response, HTTPStatus.OK, answer)
        return problem(start_response, HTTPStatus.NOT_FOUND, f"no such Tape REST operation: {method} {ROOT}/"
                       + "/".join(parts))


def _files(data: dict) -> list[tuple[str, int | None]]:
    files = data.get("files")
    if not isinstance(files, list) or not files:
        raise InvalidInput("'files' must be a non-empty list of {\"path\": ...}")
    wanted = []
    for item in files:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise InvalidInput("every file needs a 'path' string")
        lifetime = item.get("diskLifetime")
        # A pin longer than a year is shortened to one, as SRM servers shorten a desired pin
        # lifetime (a pin of centuries would overflow the clock and hold the cache forever).
        wanted.append((item["path"], None if lifetime is None else min(parse_duration(lifetime), MAX_DISK_LIFETIME)))
    return wanted


def _status(request: StageRequest) -> dict:
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
    answer: dict = {"id": request.id, "createdAt": request.created_at,
                    "startedAt": request.started_at or request.created_at, "files": files}
    if request.completed_at is not None:
        answer["completedAt"] = request.completed_at
    return answer
