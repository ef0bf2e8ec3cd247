"""What happened, told once: small frozen records on a tiny in-process bus.

The stager, the PACS client, the key-server client, the cache and the request handler
emit these; the health board (``/readyz``, ``/status``), the Prometheus metrics and the
JSON request and billing logs listen. Emitting costs a function call when nobody
listens, and a listener that fails is logged, never raised into the code that emitted:
observing must not break serving. No event carries patient data: files are named by
their LFN (de-identified UIDs) or GUID, callers by DN.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestServed:
    """One HTTP request answered (its body sent or abandoned by the client)."""

    request_id: str
    method: str
    status: int
    bytes: int
    seconds: float
    identity_kind: str  # x509, jwt, service, or "none" before authentication


@dataclass(frozen=True)
class FileTransferred:
    """One file sent to a grid client: the billing record (dCache's "transfer" record)."""

    request_id: str
    name: str  # the LFN, or guid:<uuid> where LFNs carry the PACS's own UIDs
    guid: str
    subject: str
    identity_kind: str
    client: str
    status: int
    bytes: int
    size: int
    seconds: float
    staged: bool  # it was not on disk: the request waited for the PACS


@dataclass(frozen=True)
class StageQueueChanged:
    """Files being staged or waiting for a worker."""

    depth: int


@dataclass(frozen=True)
class StageFinished:
    """One file's staging ended; ``error`` is its one-line reason when it failed."""

    seconds: float
    error: str | None


@dataclass(frozen=True)
class PacsCall:
    operation: str  # C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE
    seconds: float
    error: str | None


@dataclass(frozen=True)
class KeyServerCall:
    url: str
    operation: str  # GET, PUT, DELETE (of a share or an ACL)
    seconds: float
    error: str | None


@dataclass(frozen=True)
class CacheUsage:
    used: int
    quota: int


@dataclass(frozen=True)
class CacheEvicted:
    files: int
    bytes: int


Event = (RequestServed | FileTransferred | StageQueueChanged | StageFinished | PacsCall | KeyServerCall
         | CacheUsage | CacheEvicted)
Listener = Callable[[Any], None]

_listeners: tuple[Listener, ...] = ()
_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener`` with every event from now on; returns the function that stops it."""
    global _listeners
    with _lock:
        _listeners = (*_listeners, listener)

    def unsubscribe() -> None:
        global _listeners
        with _lock:
            _listeners = tuple(x for x in _listeners if x is not listener)

    return unsubscribe


def emit(event: Event) -> None:
    for listener in _listeners:
        try:
            listener(event)
        except Exception:
            log.exception("an event listener failed on %s", type(event).__name__)


@dataclass(frozen=True)
class Arg:
    """In ``timed``: take this field's value from the decorated call's argument of that name."""

    name: str


F = TypeVar("F", bound=Callable[..., Any])


def timed(
    event: Callable[..., Event], *, answered: Callable[[BaseException], bool] | None = None, **fields: object
) -> Callable[[F], F]:
    """Emit ``event(**fields, seconds=..., error=...)`` after each call of the decorated
    function (for a generator: when its iteration ends); ``error`` is the exception's class
    name, or None when there was none or ``answered`` says it is a peer's proper answer (a
    404 is no failure of the server). Fields given as ``Arg("x")`` take the value of the
    call's argument ``x``."""

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        from_args = {k: v.name for k, v in fields.items() if isinstance(v, Arg)}

        def values(args: tuple, kwargs: dict) -> dict[str, object]:
            if not from_args:
                return fields
            bound = signature.bind(*args, **kwargs)
            return {**fields, **{k: bound.arguments.get(name) for k, name in from_args.items()}}

        def finish(started: float, known: dict[str, object], error: BaseException | None) -> None:
            quiet = error is None or isinstance(error, GeneratorExit) or (answered is not None and answered(error))
            failed = None if quiet or error is None else type(error).__name__
            emit(event(**known, seconds=time.monotonic() - started, error=failed))

        if inspect.isgeneratorfunction(function):
            @functools.wraps(function)
            def generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
                known, started = values(args, kwargs), time.monotonic()
                try:
                    yield from function(*args, **kwargs)
                except BaseException as exc:
                    finish(started, known, exc)
                    raise
                finish(started, known, None)

            return generator  # type: ignore[return-value]

        @functools.wraps(function)
        def call(*args: Any, **kwargs: Any) -> Any:
            known, started = values(args, kwargs), time.monotonic()
            try:
                result = function(*args, **kwargs)
            except BaseException as exc:
                finish(started, known, exc)
                raise
            finish(started, known, None)
            return result

        return call  # type: ignore[return-value]

    return decorate
