"""One key server: an HTTPS JSON service (mutual TLS) keeping one key share per key id.

Each server decides alone from its own SQLite copy of the ACL, so a compromised or
misconfigured server can leak at most one share, never a key. Callers are identified by
their client certificate (proxies allowed, DN of the end-entity certificate) and their
groups from the VO map; the storage element's service DN is always allowed.

API (JSON bodies, RFC 7807 problem bodies on every error):
    PUT    /keys/{key_id}      {"index", "share" (base64), "acl"}  service or register group
    GET    /keys/{key_id}      → {"key_id", "index", "share"}       ACL read
    PUT    /keys/{key_id}/acl  ACL                                  owner, service, register
    DELETE /keys/{key_id}                                           owner, service, register
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from http import HTTPStatus
from pathlib import Path
from typing import Any

from cheroot import wsgi

from srm_dicom.config import read_toml
from srm_dicom.crypto.shares import KEY_SIZE
from srm_dicom.errors import ConfigError, InvalidInput, NotFound
from srm_dicom.identity import (
    ENVIRON_PEER_CHAIN,
    AuthenticationError,
    ClientAuthSSLAdapter,
    Identity,
    VoMap,
    identity_from_cert_chain,
)
from srm_dicom.keystore import Acl, check_key_id
from srm_dicom.private_files import private_file

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


class Forbidden(Exception):
    """The caller is authenticated but this server's ACL refuses the request."""


@dataclass(frozen=True)
class KeystoreServerConfig:
    """conf/keystore-N.toml: top-level keys, paths relative to the file."""

    cert: Path
    key: Path
    ca: Path
    database: Path
    vomap: Path
    services: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8441
    threads: int = 8
    # Seconds a kept-alive connection may sit idle (and a request may take to arrive) before
    # the server closes it: clients reconnect transparently (README, Configuration).
    idle_timeout: float = 10.0
    # "text" for people, "json" for log collectors (one object a line), as [log] format.
    log_format: str = "text"

    @classmethod
    def load(cls, path: Path) -> KeystoreServerConfig:
        data = read_toml(path, "keystore config")
        known = {f.name for f in fields(cls)}
        for name in data:
            if name not in known:
                raise ConfigError(f"keystore config {path}: unknown key '{name}'")
        for name in ("cert", "key", "ca", "database", "vomap"):
            if not isinstance(data.get(name), str):
                raise ConfigError(f"keystore config {path}: '{name}' (a path) is required")
            data[name] = (path.parent / data[name]).expanduser().resolve()
        services = data.get("services")
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise ConfigError(f"keystore config {path}: 'services' must list the service DNs")
        data["services"] = tuple(services)
        for name, kinds in (("host", (str,)), ("port", (int,)), ("threads", (int,)), ("idle_timeout", (int, float))):
            if name in data and (not isinstance(data[name], kinds) or isinstance(data[name], bool)):
                raise ConfigError(f"keystore config {path}: '{name}' must be a {kinds[-1].__name__}")
        if data.get("log_format", "text") not in ("text", "json"):
            raise ConfigError(f"keystore config {path}: 'log_format' must be \"text\" or \"json\"")
        if data.get("idle_timeout", 1) <= 0:
            raise ConfigError(f"keystore config {path}: 'idle_timeout' must be > 0 seconds")
        return cls(**data)


class ShareStore:
    """The server's SQLite table: one share and one ACL per key id."""

    def __init__(self, path: Path):
        self.path = private_file(path)  # one share of every key
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS shares ("
                " key_id TEXT PRIMARY KEY, idx INTEGER NOT NULL,"
                " share BLOB NOT NULL, acl TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        # One connection per request: cheroot serves from a thread pool.
        return sqlite3.connect(self.path, timeout=10)

    def get(self, key_id: str) -> tuple[int, bytes, Acl]:
        with self._connect() as db:
            row = db.execute("SELECT idx, share, acl FROM shares WHERE key_id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no key {key_id}")
        return row[0], row[1], Acl.from_json(json.loads(row[2]))

    def put(self, key_id: str, index: int, share: bytes, acl: Acl) -> bool:
        with self._connect() as db:
            existed = db.execute("SELECT 1 FROM shares WHERE key_id = ?", (key_id,)).fetchone()
            db.execute(
                "INSERT OR REPLACE INTO shares (key_id, idx, share, acl) VALUES (?, ?, ?, ?)",
                (key_id, index, share, json.dumps(acl.to_json())),
            )
        return existed is None

    def set_acl(self, key_id: str, acl: Acl) -> None:
        with self._connect() as db:
            db.execute("UPDATE shares SET acl = ? WHERE key_id = ?", (json.dumps(acl.to_json()), key_id))

    def delete(self, key_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM shares WHERE key_id = ?", (key_id,))


Response = tuple[HTTPStatus, Any]


class KeystoreApp:
    """The WSGI application; every outcome is JSON, errors as RFC 7807 problems."""

    def __init__(self, store: ShareStore, vomap: VoMap, services: Iterable[str]):
        self.store = store
        self.vomap = vomap
        self.services = tuple(services)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        who = "-"
        try:
            identity = identity_from_cert_chain(environ.get(ENVIRON_PEER_CHAIN) or [], self.vomap, self.services)
            who = identity.subject
            status, body = self._route(method, path, identity, environ)
        except (AuthenticationError, Forbidden) as exc:
            status, body = _problem(HTTPStatus.FORBIDDEN, str(exc))
        except NotFound as exc:
            status, body = _problem(HTTPStatus.NOT_FOUND, str(exc))
        except InvalidInput as exc:
            status, body = _problem(HTTPStatus.BAD_REQUEST, str(exc))
        except Exception:
            log.exception("%s %s failed", method, path)
            status, body = _problem(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error, see the log")
        log.info("%s %s by %s: %d", method, path, who, status)
        payload = b"" if body is None else json.dumps(body).encode()
        content_type = "application/problem+json" if status >= 400 else "application/json"
        headers = [("Content-Length", str(len(payload)))]
        if payload:
            headers.append(("Content-Type", content_type))
        start_response(f"{status.value} {status.phrase}", headers)
        return [payload]

    def _route(self, method: str, path: str, identity: Identity, environ: dict) -> Response:
        parts = path.strip("/").split("/")
        if len(parts) not in (2, 3) or parts[0] != "keys" or parts[2:] not in ([], ["acl"]):
            raise NotFound(f"no such resource {path}")
        key_id = check_key_id(parts[1])
        handlers: dict[tuple[str, bool], Callable[[str, Identity, dict], Response]] = {
            ("GET", False): self._get,
            ("PUT", False): self._put,
            ("DELETE", False): self._delete,
            ("PUT", True): self._put_acl,
        }
        handler = handlers.get((method, len(parts) == 3))
        if handler is None:
            return _problem(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}")
        return handler(key_id, identity, environ)

    def _get(self, key_id: str, identity: Identity, environ: dict) -> Response:
        index, share, acl = self.store.get(key_id)
        if not acl.may_read(identity):
            raise Forbidden(f"{identity.subject} may not read key {key_id}")
        return HTTPStatus.OK, {
            "key_id": key_id,
            "index": index,
            "share": base64.b64encode(share).decode(),
        }

    def _put(self, key_id: str, identity: Identity, environ: dict) -> Response:
        if identity.kind != "service" and "register" not in identity.groups:
            raise Forbidden(f"{identity.subject} may not store keys (service or register only)")
        body = _json_body(environ)
        if not isinstance(body, dict) or set(body) != {"index", "share", "acl"}:
            raise InvalidInput('body must be {"index", "share", "acl"}')
        index = body["index"]
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= 255:
            raise InvalidInput("index must be an integer 1..255")
        try:
            share = base64.b64decode(body["share"], validate=True)
        except (binascii.Error, TypeError):
            raise InvalidInput("share must be base64") from None
        if len(share) != KEY_SIZE:
            raise InvalidInput(f"share must be {KEY_SIZE} bytes")
        created = self.store.put(key_id, index, share, Acl.from_json(body["acl"]))
        return (HTTPStatus.CREATED if created else HTTPStatus.OK), {"key_id": key_id}

    def _put_acl(self, key_id: str, identity: Identity, environ: dict) -> Response:
        acl = Acl.from_json(_json_body(environ))
        _, _, current = self.store.get(key_id)
        if not current.may_manage(identity):
            raise Forbidden(f"{identity.subject} may not change the ACL of key {key_id}")
        self.store.set_acl(key_id, acl)
        return HTTPStatus.OK, {"key_id": key_id}

    def _delete(self, key_id: str, identity: Identity, environ: dict) -> Response:
        _, _, current = self.store.get(key_id)
        if not current.may_manage(identity):
            raise Forbidden(f"{identity.subject} may not delete key {key_id}")
        self.store.delete(key_id)
        return HTTPStatus.NO_CONTENT, None


def _problem(status: HTTPStatus, detail: str) -> Response:
    return status, {"status": status.value, "title": status.phrase, "detail": detail}


def _json_body(environ: dict) -> Any:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise InvalidInput("bad Content-Length") from None
    if not 0 < length <= MAX_BODY:
        raise InvalidInput(f"a JSON body of at most {MAX_BODY} bytes is required")
    try:
        return json.loads(environ["wsgi.input"].read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("body is not valid JSON") from None


def make_server(config: KeystoreServerConfig) -> wsgi.Server:
    """A cheroot server for ``config``, not yet started (``prepare`` binds, ``serve`` runs)."""
    for name in ("cert", "key", "ca"):
        if not getattr(config, name).is_file():
            raise ConfigError(f"keystore: {name} file {getattr(config, name)} not found")
    app = KeystoreApp(ShareStore(config.database), VoMap.load(config.vomap), config.services)
    server = wsgi.Server((config.host, config.port), app, numthreads=config.threads,
                         timeout=config.idle_timeout)  # type: ignore[arg-type]  # cheroot takes float seconds; its stub says int
    server.ssl_adapter = ClientAuthSSLAdapter(str(config.cert), str(config.key), str(config.ca))
    return server
