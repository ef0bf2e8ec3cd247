"""JSON in and out of the APIs: request bodies, answers, and RFC 7807 problem answers (what
a program gets instead of a page or a traceback)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from http import HTTPStatus

from srm_dicom.errors import InvalidInput

StartResponse = Callable[..., object]
MAX_BODY = 1 << 20


def json_body(environ: dict) -> dict:
    """The request's JSON object; anything else is one clear InvalidInput (a 400)."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise InvalidInput("bad Content-Length") from None
    if length > MAX_BODY:
        raise InvalidInput(f"request body over {MAX_BODY} bytes")
    try:
        data = json.loads(environ["wsgi.input"].read(length) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("request body must be a JSON object")
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


def problem(
    start_response: StartResponse, status: HTTPStatus, detail: str, headers: Iterable[tuple[str, str]] = ()
) -> list[bytes]:
    body = json.dumps({"type": "about:blank", "status": status.value, "title": status.phrase, "detail": detail})
    data = body.encode()
    start_response(
        f"{status.value} {status.phrase}",
        [("Content-Type", "application/problem+json"), ("Content-Length", str(len(data))), *headers],
    )
    return [data]
