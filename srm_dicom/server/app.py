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

from srm_dicom.authenticate import Authenticator, InvalidRequest, challenge
from srm_dicom.catalog import Catalog, Entry
from srm_dicom.config import Config
from srm_dicom.errors import Forbidden, MdmError, NotFound
from srm_dicom.health import HealthBoard
from srm_dicom.identity import AuthenticationError, ClientAuthSSLAdapter, Identity, slash_dn
from srm_dicom.server import metadata, qido
from srm_dicom.server.browse import DirectoryPages, wants_html
from srm_dicom.server.files import FileService
from srm_dicom.server.macaroons import MacaroonApi, is_macaroon_request
from srm_dicom.server.observe import ObservedApp
from srm_dicom.server.operations import OperationsApi
from srm_dicom.server.problems import StartResponse, problem
from srm_dicom.server.rights import RightsApi
from srm_dicom.server.taperest import DISCOVERY, ROOT, TapeRestApi
from srm_dicom.server.webdav import IDENTITY, webdav_app
from srm_dicom.service import StorageService
from srm_dicom.stager import Stager

log = logging.getLogger(__name__)

READ_METHODS = ("GET", "HEAD", "OPTIONS", "PROPFIND")
ALLOW = ", ".join(READ_METHODS)


class StorageElement:
    """The WSGI application: one instance per server, shared by its threads."""

    def __init__(self, config: Config, catalog: Catalog, stager: Stager) -> None:
        self._config = config
        # The storage element's own service identity (its key server credential) sees everything.
        own = x509.load_pem_x509_certificate(config.path(config.keystore.cert).read_bytes())
        self.service = StorageService(config, catalog, stager)
        self._authenticator = Authenticator(config, (slash_dn(own.subject),), self.service.macaroons.identify)
        self._macaroons = MacaroonApi(self.service)
        self._files = FileService(config, self.service)
        self._tape = TapeRestApi(config, self.service)
        self._dav = webdav_app(self.service)
        self._metadata = metadata.MetadataApi(self.service)
        self._qido = qido.Qido(self.service)
        self._rights = RightsApi(self.service)
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

    def _identify(self, environ: dict) -> Identity:
        return self._authenticator.identify(environ)

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
                status = HTTPStatus.BAD_REQUEST if isinstance(exc, InvalidRequest) else HTTPStatus.UNAUTHORIZED
                return problem(start_response, status, str(exc), [("WWW-Authenticate", challenge(exc))])
            environ[IDENTITY] = identity
            if path == ROOT or path.startswith(ROOT + "/"):
                return self._tape(environ, start_response, identity)
            if path == metadata.ROOT or path.startswith(metadata.ROOT + "/"):
                return self._metadata(environ, start_response, identity)
            if path == qido.ROOT or path.startswith(qido.ROOT + "/"):
                return self._qido(environ, start_response, identity)
            if self._rights.handles(path):
                return self._rights(environ, start_response, identity)
            if is_macaroon_request(environ):
                return self._macaroons(environ, start_response, identity, self._base_url(environ))
            if method not in READ_METHODS:
                return problem(start_response, HTTPStatus.METHOD_NOT_ALLOWED,
                               f"{method} refused: the grid side of srm-dicom is read-only", [("Allow", ALLOW)])
            if method in ("GET", "HEAD"):
                entry = self.service.resolve(path)
                if entry is not None:
                    return self._files.serve(environ, start_response, entry, identity)
                if method == "GET" and wants_html(environ):
                    return self._pages(environ, start_response, identity)
                if method == "GET":
                    return problem(start_response, HTTPStatus.NOT_FOUND, f"no such file: {path}")
            return self._dav(environ, start_response)
        except NotFound as exc:  # every API's unknown file or request
            return problem(start_response, HTTPStatus.NOT_FOUND, str(exc))
        except Forbidden as exc:  # every refusal of srm_dicom.access, through the StorageService
            bearer = environ.get(IDENTITY) is not None and environ[IDENTITY].kind in ("token", "macaroon")
            headers = [("WWW-Authenticate", challenge(insufficient_scope=True))] if bearer else []
            return problem(start_response, HTTPStatus.FORBIDDEN, str(exc), headers)
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
