"""The storage element's WSGI application and its HTTPS server.

Every request is authenticated first (client certificate, proxies included, or a WLCG
bearer token), then routed: the Tape REST API, GET/HEAD of files (staged on the fly),
PROPFIND/OPTIONS through wsgidav, and a refusal for every write: the grid side only reads.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from importlib import resources
from urllib.parse import unquote_to_bytes

from cryptography import x509

from srm_dicom.catalog import Catalog, Entry
from srm_dicom.config import Config
from srm_dicom.errors import InvalidInput, NotFound
from srm_dicom.health import HealthBoard
from srm_dicom.identity import (
    ENVIRON_PEER_CHAIN,
    AuthenticationError,
    Identity,
    VoMap,
    identity_from_bearer,
    identity_from_cert_chain,
    issuers_from_config,
    slash_dn,
)
from srm_dicom.names import normalize_lfn
from srm_dicom.server import metadata, qido
from srm_dicom.server.browse import DirectoryPages, wants_html
from srm_dicom.server.files import FileService
from srm_dicom.server.http import LimitedServer, https_server
from srm_dicom.server.observe import ObservedApp
from srm_dicom.server.operations import OperationsApi
from srm_dicom.server.problems import FINITE_DEPTH, HttpProblem, StartResponse, problem_of
from srm_dicom.server.rights import RightsApi
from srm_dicom.server.taperest import DISCOVERY, ROOT, TapeRestApi
from srm_dicom.server.webdav import IDENTITY, webdav_app
from srm_dicom.stager import Stager

READ_METHODS = ("GET", "HEAD", "OPTIONS", "PROPFIND")
OPENAPI = "/api/v1/openapi.json"
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # RFC 9110 field-value: no CR, LF, NUL or controls
ALLOW = ", ".join(READ_METHODS)


class StorageElement:
    """The WSGI application: one instance per server, shared by its threads."""

    def __init__(self, config: Config, catalog: Catalog, stager: Stager) -> None:
        self._config = config
        self._catalog = catalog
        self._vomap = VoMap.load(config.path(config.identity.vomap))
        self._issuers = issuers_from_config(config.identity.issuers, config.base_dir)
        # The storage element's own service identity (its key server credential) sees everything.
        own = x509.load_pem_x509_certificate(config.path(config.keystore.cert).read_bytes())
        self._services = (slash_dn(own.subject),)
        self._files = FileService(config, catalog, stager)
        self._tape = TapeRestApi(config, catalog, stager, self.resolve)
        self._dav = webdav_app(catalog, config.site.vo)
        self._metadata = metadata.MetadataApi(catalog)
        self._qido = qido.Qido(catalog, self._base_url)
        self._rights = RightsApi(config, catalog)
        self._pages = DirectoryPages(catalog, stager, config.site.vo)
        self.health = HealthBoard(config, catalog)
        self._operations = OperationsApi(config, self.health)

    def close(self) -> None:
        """Stop listening to events (the server has stopped)."""
        self._operations.close()
        self.health.close()

    def billing_name(self, entry: Entry) -> str:
        """How logs name a file: its LFN, unless the site's LFNs carry the PACS's own UIDs."""
        return entry.lfn if self._config.site.uids == "deidentified" else f"guid:{entry.guid}"

    def resolve(self, path: str) -> Entry | None:
        """The entry an URL path names: an LFN or /guid/<uuid>."""
        path = normalize_lfn(path.split("?", 1)[0])
        if path.startswith("/guid/"):
            return self._catalog.namespace.lookup_guid(path.removeprefix("/guid/"))
        if path.startswith("/grid/"):
            return self._catalog.namespace.lookup(path)
        return None

    def _identify(self, environ: dict) -> Identity:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        if authorization.lower().startswith("bearer "):
            return identity_from_bearer(authorization[7:].strip(), self._issuers)
        chain = environ.get(ENVIRON_PEER_CHAIN)
        if chain:
            return identity_from_cert_chain(chain, self._vomap, self._services)
        raise AuthenticationError("a client certificate (or proxy) or a bearer token is required")

    def _caller(self, environ: dict) -> Identity | None:
        """The caller if it shows credentials that hold, else None (the operations endpoints
        also answer callers from trusted networks, and probes without credentials)."""
        try:
            return self._identify(environ)
        except AuthenticationError:
            return None

    def _base_url(self, environ: dict) -> str:
        if self._config.server.public_url:
            return self._config.server.public_url.rstrip("/")
        host = environ.get("HTTP_HOST") or environ["SERVER_NAME"]
        port = str(environ.get("SERVER_PORT", "443"))
        if ":" not in host.rsplit("]", 1)[-1] and port != "443":
            # Some clients (dicomweb-client) send Host without the port they connected to.
            host = f"{host}:{port}"
        return f"https://{host}"

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        """Route the request; any error before the first byte of the body is answered by the
        one mapping of errors to RFC 7807 (``problems.problem_of``), whichever layer raised it."""
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        deferred = _DeferredStart(start_response)
        try:
            chunks = iter(self._route(environ, deferred, method, path))
            first = next(chunks, None)  # a lazy body (wsgidav's, a file's) raises here, still answerable
        except Exception as exc:  # noqa: BLE001 - every error becomes a problem answer, 500 only when unexpected
            return problem_of(exc, f"{method} {_printable(path)}").answer(start_response)
        deferred.send()
        return _Body(first, chunks)

    def _route(self, environ: dict, start_response: StartResponse, method: str, path: str) -> Iterable[bytes]:
        try:  # WSGI gives the path as latin-1 characters of the bytes sent; names are UTF-8
            sent = path.encode("latin-1")
            (unquote_to_bytes(sent) if method == "OPTIONS" else sent).decode("utf-8")  # cheroot leaves OPTIONS' quoted
        except UnicodeError:
            raise InvalidInput("the path is not valid UTF-8") from None
        if path.rstrip("/") == DISCOVERY and method == "GET":
            return self._tape.discovery(start_response, self._base_url(environ))
        if path == OPENAPI and method == "GET":  # what client authors read: no credentials needed
            return _openapi(start_response)
        if self._operations.handles(path):
            return self._operations(environ, start_response, self._caller(environ))
        identity = self._identify(environ)
        environ[IDENTITY] = identity
        if path == ROOT or path.startswith(ROOT + "/"):
            return self._tape(environ, start_response, identity)
        if path == metadata.ROOT or path.startswith(metadata.ROOT + "/"):
            return self._metadata(environ, start_response, identity)
        if path == qido.ROOT or path.startswith(qido.ROOT + "/"):
            return self._qido(environ, start_response, identity)
        if self._rights.handles(path):
            return self._rights(environ, start_response, identity)
        if method not in READ_METHODS:
            raise HttpProblem(HTTPStatus.METHOD_NOT_ALLOWED,
                              f"{method} refused: the grid side of srm-dicom is read-only", [("Allow", ALLOW)])
        if method in ("GET", "HEAD"):
            entry = self.resolve(path)
            if entry is not None:
                return self._files.serve(environ, start_response, entry, identity)
            if method == "GET" and wants_html(environ):
                return self._pages(environ, start_response, identity)
            if method == "GET":
                raise NotFound(f"no such file: {path}")
        depth = environ.get("HTTP_DEPTH", "infinity").strip().lower()
        if method == "PROPFIND" and depth == "infinity":
            # RFC 4918 §9.1: a server may refuse Depth: infinity (the default), naming this precondition.
            raise HttpProblem(HTTPStatus.FORBIDDEN, "PROPFIND takes Depth: 0 or 1 (infinity walks the whole namespace)",
                              condition=FINITE_DEPTH)
        if method == "PROPFIND" and depth not in ("0", "1"):
            raise InvalidInput("Depth must be 0 or 1")
        environ["wsgidav.auth.user_name"] = identity.subject
        return self._dav(environ, start_response)


@functools.cache
def _openapi_document() -> bytes:
    return (resources.files("srm_dicom") / "data" / "openapi.json").read_bytes()


def _openapi(start_response: StartResponse) -> list[bytes]:
    """The OpenAPI 3 document of the JSON APIs (``srm_dicom/data/openapi.json``)."""
    body = _openapi_document()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _printable(path: str) -> str:
    """A request path fit for one log line (control characters escaped)."""
    return path.encode("unicode_escape").decode("ascii")[:300]


class _DeferredStart:
    """start_response held back until the body's first chunk exists, so that an error raised
    while producing it can still be answered as a problem."""

    def __init__(self, start_response: StartResponse) -> None:
        self._start_response = start_response
        self._held: tuple | None = None

    def __call__(self, status: str, headers: list, exc_info: object = None) -> None:
        for name, value in headers:  # a value built from input must never split the answer
            if not _HEADER_VALUE.fullmatch(value):
                raise ValueError(f"header {name} holds a character HTTP does not allow: {value[:80]!r}")
        self._held = (status, headers)

    def send(self) -> None:
        if self._held is not None:
            self._start_response(*self._held)


class _Body:
    """The rest of a body after its first chunk; closes the producer as WSGI asks."""

    def __init__(self, first: bytes | None, rest: Iterator[bytes]) -> None:
        self._first, self._rest = first, rest

    def __iter__(self) -> Iterator[bytes]:
        if self._first is not None:
            yield self._first
        yield from self._rest

    def close(self) -> None:
        close = getattr(self._rest, "close", None)
        if close is not None:
            close()


def make_server(config: Config, app: StorageElement) -> LimitedServer:
    """The HTTPS server (``server/http.py``: its limits and TLS) around the observed application."""
    return https_server(config, ObservedApp(app, app.billing_name))
