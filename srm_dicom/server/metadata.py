"""The metadata search as a JSON API: ``GET /api/v1/metadata?q=EXPR&select=A,B&limit=N``,
and the header values anonymization erased from one image: ``GET /api/v1/metadata/erased?path=ID``
(an LFN, ``/guid/<uuid>`` or study,series,sop), for callers with "all" metadata rights only.

Answers ``{"results": [{"lfn", "guid", attributes…}]}`` in the catalog's order, filtered by the
caller's rights (``srm_dicom.query``): rows they may not list are absent, attributes
above their metadata level are absent. A query that does not parse is a 400 problem
whose detail says where.
"""

from __future__ import annotations

from http import HTTPStatus
from urllib.parse import parse_qs

from srm_dicom.access import may_list, metadata_level
from srm_dicom.catalog import Catalog, find_entry
from srm_dicom.errors import InvalidInput, NotFound
from srm_dicom.identity import Identity
from srm_dicom.query import DEFAULT_ATTRIBUTES, find, parse, parse_attributes
from srm_dicom.server.problems import StartResponse, problem, respond_json

ROOT = "/api/v1/metadata"
ERASED = ROOT + "/erased"
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10000


def limit_parameter(text: str | None, default: int = DEFAULT_LIMIT) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidInput(f"limit must be a whole number, not {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
    return value


class MetadataApi:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        path = environ.get("PATH_INFO", "").rstrip("/")
        if environ["REQUEST_METHOD"] == "GET" and path == ERASED:
            return self._erased(environ, start_response, identity)
        if environ["REQUEST_METHOD"] != "GET" or path != ROOT:
            return problem(start_response, HTTPStatus.NOT_FOUND, f"no such API: {environ.get('PATH_INFO')}"
                           " (GET /api/v1/metadata?q=EXPR&select=A,B&limit=N)")
        params = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        try:
            query = parse(params.get("q", [""])[0])
            attributes = parse_attributes(params.get("select", [""])[0]) or DEFAULT_ATTRIBUTES
            limit = limit_parameter(params.get("limit", [None])[0])
        except InvalidInput as exc:
            return problem(start_response, HTTPStatus.BAD_REQUEST, str(exc))
        rows = [match.row() for match in find(self._catalog, identity, query, attributes, limit)]
        return respond_json(start_response, HTTPStatus.OK, {"results": rows})

    def _erased(self, environ: dict, start_response: StartResponse, identity: Identity) -> list[bytes]:
        wanted = parse_qs(environ.get("QUERY_STRING", "")).get("path", [""])[0]
        try:
            entry = find_entry(self._catalog, wanted)
        except (InvalidInput, NotFound):
            entry = None
        if entry is None or not may_list(identity, entry):
            return problem(start_response, HTTPStatus.NOT_FOUND, f"no such file: {wanted}")
        if metadata_level(identity, entry) != "all":
            return problem(start_response, HTTPStatus.FORBIDDEN,
                           f"{identity.subject} may not read the erased header values of {entry.lfn}")
        metadata = self._catalog.index.metadata(entry.guid)
        erased = [{"path": p, "keyword": k, "value": v} for p, k, v in (metadata.erased if metadata else ())]
        return respond_json(start_response, HTTPStatus.OK, {"lfn": entry.lfn, "guid": f"guid:{entry.guid}",
                                                             "erased": erased})
