"""JSON in and out of the APIs, and the one mapping of errors to RFC 7807 problem answers.

Every layer answers errors the same way, as ``application/problem+json``: the front ends
(they raise errors that carry their HTTP status, ``srm_dicom.errors``), wsgidav (its
``DAVError``), and cheroot's own refusals (``srm_dicom.server.http``). What a program
gets is never a page, plain text or a traceback; only an unexpected error is logged with
its traceback, and answers 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

from wsgidav.dav_error import DAVError

from srm_dicom.errors import InvalidInput, MdmError, TooLarge, catalog_unavailable

log = logging.getLogger(__name__)

StartResponse = Callable[..., object]
MAX_BODY = 8 << 20  # a Tape REST request of 10^4 paths is ~1.5 MB
MAX_DEPTH = 16  # the deepest body an API takes is 4 levels ({"files": [{"targetedMetadata": {…}}]})
# RFC 4918 §9.1: the precondition a server names when it refuses PROPFIND Depth: infinity.
FINITE_DEPTH = "propfind-finite-depth"


class HttpProblem(MdmError):
    """An error a front end answers with a status (and headers) of its choosing: 405 with
    ``Allow``, 503 with ``Retry-After``, 403 with an RFC 4918 precondition."""

    def __init__(self, status: HTTPStatus, detail: str, headers: Iterable[tuple[str, str]] = (),
                 condition: str | None = None) -> None:
        super().__init__(detail)
        self.http_status = status.value
        self.http_headers = tuple(headers)
        self.condition = condition


@dataclass(frozen=True)
class Problem:
    """An RFC 7807 answer: ``{"type", "status", "title", "detail"}``, plus ``condition`` for a
    WebDAV precondition (RFC 4918 names them; a problem body carries the name)."""

    status: HTTPStatus
    detail: str
    headers: tuple[tuple[str, str], ...] = ()
    condition: str | None = None
    extra: dict = field(default_factory=dict)

    def body(self) -> bytes:
        data: dict = {"type": "about:blank", "status": self.status.value, "title": self.status.phrase,
                      "detail": self.detail}
        if self.condition:
            data["type"] = f"https://www.rfc-editor.org/rfc/rfc4918#{self.condition}"
            data["condition"] = self.condition
        return json.dumps({**data, **self.extra}).encode()

    def answer(self, start_response: StartResponse) -> list[bytes]:
        data = self.body()
        start_response(
            f"{self.status.value} {self.status.phrase}",
            [("Content-Type", "application/problem+json"), ("Content-Length", str(len(data))), *self.headers],
        )
        return [data]


def _status(code: int) -> HTTPStatus:
    try:
        return HTTPStatus(code)
    except ValueError:
        return HTTPStatus.INTERNAL_SERVER_ERROR


def problem_of(error: BaseException, where: str = "") -> Problem:
    """The one mapping of an error to its answer, for every layer. Bad input is a 4xx and is
    not logged as a fault; an unexpected error is logged once with its traceback and is a 500."""
    if isinstance(error, MdmError):
        status = _status(error.http_status)
        headers = tuple(getattr(error, "http_headers", ()))
        if status is HTTPStatus.UNAUTHORIZED and not any(k.lower() == "www-authenticate" for k, _ in headers):
            headers += (("WWW-Authenticate", 'Bearer realm="srm-dicom"'),)
        if status >= 500:
            log.warning("%s: %s", where or "request", error)
        return Problem(status, str(error), headers, getattr(error, "condition", None))
    if isinstance(error, DAVError):
        status = _status(error.value)
        condition = error.err_condition.condition_code if error.err_condition else None
        detail = str(error.context_info) if error.context_info else status.description or status.phrase
        return Problem(status, detail, tuple(error.add_headers or ()), condition)
    if (unavailable := catalog_unavailable(error)) is not None:  # the catalog locked or unreachable: a 503
        return problem_of(unavailable, where)
    if isinstance(error, TimeoutError):  # the client stopped sending (socket.timeout is TimeoutError)
        return Problem(HTTPStatus.REQUEST_TIMEOUT, "the request was not received in time", (("Connection", "close"),))
    log.error("internal error on %s", where or "a request", exc_info=error)
    return Problem(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server log")


def problem(
    start_response: StartResponse, status: HTTPStatus, detail: str, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    return Problem(status, detail, tuple(headers)).answer(start_response)


def _depth(data: object) -> int:
    """Nesting depth of parsed JSON, without recursion (the input is hostile)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                break
            stack.extend((v, level + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def json_body(environ: dict) -> dict:
    """The request's JSON object, at most MAX_BODY bytes and MAX_DEPTH levels deep; anything
    else is one clear 400 (or 413)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise InvalidInput("bad Content-Length") from None
    if length < 0:
        raise InvalidInput("bad Content-Length")
    if length > MAX_BODY:
        raise TooLarge(f"request body over {MAX_BODY} bytes")
    raw = environ["wsgi.input"].read(length)
    if len(raw) < length:
        raise InvalidInput(f"request body shorter than its Content-Length ({len(raw)} of {length} bytes)")
    try:
        data = json.loads(raw or b"{}")
    except RecursionError:
        raise InvalidInput(f"request body nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # not JSON, not UTF-8, or an integer of more than 4300 digits
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
    if _depth(data) > MAX_DEPTH:
        raise InvalidInput(f"request body nested deeper than {MAX_DEPTH} levels")
    return data


def respond_json(
    start_response: StartResponse, status: HTTPStatus, data: object, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    body = json.dumps(data).encode()
    start_response(
        f"{status.value} {status.phrase}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers],
    )
    return [body]
