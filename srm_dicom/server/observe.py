"""Every request, observed: an id, its status, the bytes its body really sent, its duration.

A WSGI middleware in front of the application: the request id comes from a load
balancer's ``X-Request-Id`` when it is a plain token (HAProxy's ``unique-id-header``), or is
new, and goes back in the answer, so a user's complaint and the log line meet. The
``RequestServed`` event is emitted when the body is finished or the client went away (cheroot
calls ``close``), and with it, for a file GET, the billing record ``FileTransferred``: the
file service marks the environ with what it served (``mark_transfer``).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from srm_dicom.catalog import Entry
from srm_dicom.events import FileTransferred, RequestServed, emit
from srm_dicom.server.problems import StartResponse
from srm_dicom.server.webdav import IDENTITY

REQUEST_ID = "srm_dicom.request_id"
TRANSFER = "srm_dicom.transfer"
_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class Transfer:
    entry: Entry
    staged: bool


def mark_transfer(environ: dict, entry: Entry, staged: bool) -> None:
    """Say that this request sends ``entry``'s bytes (``staged``: it waited for the PACS)."""
    environ[TRANSFER] = Transfer(entry, staged)


class _Body:
    """The application's body, counted; ``close`` reports the request once."""

    def __init__(self, body: Iterable[bytes], done: Callable[[int], None]) -> None:
        self._body = body
        self._done: Callable[[int], None] | None = done
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            self.sent += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            done, self._done = self._done, None
            if done is not None:
                done(self.sent)


class ObservedApp:
    """Wraps a WSGI application; ``name`` tells how a billing record names a file."""

    def __init__(self, app: Callable[[dict, StartResponse], Iterable[bytes]], name: Callable[[Entry], str]) -> None:
        self._app = app
        self._name = name

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        offered = environ.get("HTTP_X_REQUEST_ID", "")
        request_id = offered if _TOKEN.fullmatch(offered) else uuid.uuid4().hex
        environ[REQUEST_ID] = request_id
        status = [0]

        def start(line: str, headers: list[tuple[str, str]], exc_info: object = None) -> object:
            status[0] = int(line[:3])
            return start_response(line, [*headers, ("X-Request-Id", request_id)], exc_info)

        def done(sent: int) -> None:
            self._report(environ, request_id, status[0], sent, time.monotonic() - started)

        return _Body(self._app(environ, start), done)

    def _report(self, environ: dict, request_id: str, status: int, sent: int, seconds: float) -> None:
        identity = environ.get(IDENTITY)
        kind = identity.kind if identity is not None else "none"
        method = environ.get("REQUEST_METHOD", "")
        emit(RequestServed(request_id, method, status, sent, seconds, kind))
        transfer: Transfer | None = environ.get(TRANSFER)
        if transfer is not None and identity is not None and method == "GET":
            entry = transfer.entry
            emit(FileTransferred(request_id, self._name(entry), entry.guid, identity.subject, kind,
                                 environ.get("REMOTE_ADDR", ""), status, sent, entry.size or 0, seconds,
                                 transfer.staged))
