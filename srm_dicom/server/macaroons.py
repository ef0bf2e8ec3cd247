"""HTTP of macaroon requests: ``POST <path>`` with ``Content-Type: application/macaroon-request``
(what dCache answers, and what gfal2 sends the source of a third-party copy); the
StorageService issues (README, "Macaroons")."""

from __future__ import annotations

from http import HTTPStatus
from urllib.parse import quote

from srm_dicom.identity import Identity
from srm_dicom.macaroons import MEDIA_TYPE
from srm_dicom.server.problems import StartResponse, json_body, respond_json
from srm_dicom.service import StorageService


def is_macaroon_request(environ: dict) -> bool:
    media_type = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
    return environ["REQUEST_METHOD"] == "POST" and media_type == MEDIA_TYPE


class MacaroonApi:
    def __init__(self, service: StorageService) -> None:
        self._service = service

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity, base_url: str) -> list[bytes]:
        path = environ.get("PATH_INFO", "/") or "/"
        macaroon = self._service.issue_macaroon(identity, path, json_body(environ))
        authz = quote(macaroon, safe="")
        return respond_json(start_response, HTTPStatus.OK, {
            "macaroon": macaroon,
            "uri": {"targetWithMacaroon": f"{base_url}{quote(path)}?authz={authz}",
                    "baseWithMacaroon": f"{base_url}/?authz={authz}"},
        })
