"""The storage element's WSGI application and its HTTPS server.

Every request is authenticated first (client certificate, proxies included, or a WLCG
bearer token), then routed: the Tape REST API, GET/HEAD of files (staged on the fly),
PROPFIND/OPTIONS through wsgidav, and a refusal for every write: the grid side only reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from http import HTTPStatus

from cheroot import wsgi
from cryptography import x509

from srm_dicom.catalog import Catalog, Entry
from srm_dicom.config import Config
from srm_dicom.errors import MdmError, NotFound
from srm_dicom.health import HealthBoard
from srm_dicom.identity import (
    ENVIRON_PEER_CHAIN,
    AuthenticationError,
    ClientAuthSSLAdapter,
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
from srm_dicom.server.observe import ObservedApp
from srm_dicom.server.operations import OperationsApi
from srm_dicom.server.problems import StartResponse, problem
from srm_dicom.server.rights import RightsApi
from srm_dicom.server.taperest import DISCOVERY, ROOT, TapeRestApi
from srm_dicom.server.webdav import IDENTITY, webdav_app
from srm_dicom.stager import Stager

log = logging.getLogger(__name__)

READ_METHODS = ("GET", "HEAD", "OPTIONS", "PROPFIND")
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
        self._qido = qido.Qido(catalog)
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
        host = environ.get("HTTP_HOST") or f"{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
        return f"https://{host}"

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        try:
            if path.rstrip("/") == DISCOVERY and method == "GET":
                return self._tape.discovery(start_response, self._base_url(environ))
            if self._operations.handles(path):
                return self._operations(environ, start_response, self._caller(environ))
            try:
                identity = self._identify(environ)
            except AuthenticationError as exc:
                return problem(start_response, HTTPStatus.UNAUTHORIZED, str(exc),
                               [("WWW-Authenticate", 'Bearer realm="srm-dicom"')])
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
                return problem(start_response, HTTPStatus.METHOD_NOT_ALLOWED,
                               f"{method} refused: the grid side of srm-dicom is read-only", [("Allow", ALLOW)])
            if method in ("GET", "HEAD"):
                entry = self.resolve(path)
                if entry is not None:
                    return self._files.serve(environ, start_response, entry, identity)
                if method == "GET" and wants_html(environ):
                    return self._pages(environ, start_response, identity)
                if method == "GET":
                    return problem(start_response, HTTPStatus.NOT_FOUND, f"no such file: {path}")
            return self._dav(environ, start_response)
        except NotFound as exc:  # every API's unknown file or request
            return problem(start_response, HTTPStatus.NOT_FOUND, str(exc))
        except MdmError as exc:  # every API's bad input (InvalidInput and the like)
            return problem(start_response, HTTPStatus.BAD_REQUEST, str(exc))
        except Exception:
            log.exception("internal error on %s %s", method, path)
            return problem(start_response, HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the server log")


def make_server(config: Config, app: StorageElement) -> wsgi.Server:
    """A cheroot HTTPS server; client certificates are asked for but optional (token users
    share the port), verified against [identity] ca, proxies accepted."""
    server_config = config.server
    observed = ObservedApp(app, app.billing_name)
    server = wsgi.Server((server_config.host, server_config.port), observed, numthreads=server_config.threads,
                         server_name=server_config.sitename)
    server.ssl_adapter = ClientAuthSSLAdapter(
        str(config.path(server_config.cert)), str(config.path(server_config.key)),
        str(config.path(config.identity.ca)), required=False,
    )
    return server
