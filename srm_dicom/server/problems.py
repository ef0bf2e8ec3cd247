"""RFC 7807 problem answers: what a program gets instead of a page or a traceback."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from http import HTTPStatus

StartResponse = Callable[..., object]


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
