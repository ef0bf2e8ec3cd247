"""One key server: an HTTPS JSON service (mutual TLS) keeping one key share per key id.

Each server decides alone from its own SQLite copy of the ACL, so a compromised or
misconfigured server can leak at most one share, never a key. Callers are identified by
their client certificate (proxies allowed, DN of the end-entity certificate) and their
groups, as the storage element identifies them: from a VOMS proxy's attribute certificate
when ``vomsdir`` trusts it, else from the VO map (``identity.identity_from_cert_chain``);
so a VOMS physician fetches the shares of the keys a physician may read. The storage
element's service DN is always allowed. A limited proxy reads, never stores or manages.

API (JSON bodies, RFC 7807 problem bodies on every error):
    PUT    /keys/{key_id}      {"index", "share" (base64), "acl"}  service or register group
    GET    /keys/{key_id}      → {"key_id", "index", "share"}       ACL read
    PUT    /keys/{key_id}/acl  ACL                                  owner, service, register
    DELETE /keys/{key_id}                                           owner, service, register

Bulk, so that registering or staging a series costs one request per server, not one per
image (at most MAX_BULK keys a request):
    POST   /bulk/put    {"shares": [{"key_id", "index", "share", "acl"}, ...]}  service or register;
                        all stored in one transaction, or none (400 names the bad item)
    POST   /bulk/fetch  {"key_ids": [...]} → {"shares": [{"key_id", "index", "share"}
                        | {"key_id", "status": 403|404, "detail"}, ...]}   each by its own ACL
    POST   /bulk/delete {"key_ids": [...]} → {"results": [{"key_id", "status": 204|403|404}]}
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
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
from srm_dicom.voms import VomsTrust

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_BULK = 2000  # keys per bulk request: a series of up to 2000 images in one round trip
MAX_BULK_BODY = MAX_BULK * 1024


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
    # gLite's vomsdir (<vo>/<voms-host>.lsc), as [identity] vomsdir of the storage element;
    # None: the VO map alone gives groups. VOMS roles standing for a group, as [identity] voms_roles.
    vomsdir: Path | None = None
    voms_roles: dict[str, str] = field(default_factory=dict)
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
        vomsdir = data.get("vomsdir", "")
        if not isinstance(vomsdir, str):
            raise ConfigError(f"keystore config {path}: 'vomsdir' must be a path (\"\": VO map only)")
        data["vomsdir"] = (path.parent / vomsdir).expanduser().resolve() if vomsdir else None
        roles = data.get("voms_roles", {})
        if not isinstance(roles, dict) or not all(isinstance(v, str) for v in roles.values()):
            raise ConfigError(f"keystore config {path}: 'voms_roles' must map role names to groups")
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

    def get_many(self, key_ids: list[str]) -> dict[str, tuple[int, bytes, Acl]]:
        """The shares of those ``key_ids`` this server has (absent ones are left out)."""
        found: dict[str, tuple[int, bytes, Acl]] = {}
        with self._connect() as db:
            for start in range(0, len(key_ids), 500):  # SQLite's bound-parameter limit
                chunk = key_ids[start:start + 500]
                rows = db.execute(
                    f"SELECT key_id, idx, share, acl FROM shares WHERE key_id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                for key_id, index, share, acl in rows:
                    found[key_id] = (index, share, Acl.from_json(json.loads(acl)))
        return found

    def put_many(self, items: list[tuple[str, int, bytes, Acl]]) -> None:
        """Store every share in one transaction: all or nothing."""
        with self._connect() as db:
            db.executemany(
                "INSERT OR REPLACE INTO shares (key_id, idx, share, acl) VALUES (?, ?, ?, ?)",
                [(key_id, index, share, json.dumps(acl.to_json())) for key_id, index, share, acl in items],
            )

    def delete_many(self, key_ids: list[str]) -> None:
        with self._connect() as db:
            db.executemany("DELETE FROM shares WHERE key_id = ?", [(key_id,) for key_id in key_ids])

    def set_acl(self, key_id: str, acl: Acl) -> None:
        with self._connect() as db:
            db.execute("UPDATE shares SET acl = ? WHERE key_id = ?", (json.dumps(acl.to_json()), key_id))

    def delete(self, key_id: str) -> None:
        with self._connect() as db:
            db.execute("DELETE FROM shares WHERE key_id = ?", (key_id,))


Response = tuple[HTTPStatus, Any]


class KeystoreApp:
    """The WSGI application; every outcome is JSON, errors as RFC 7807 problems."""

    def __init__(self, store: ShareStore, vomap: VoMap, services: Iterable[str], voms: VomsTrust | None = None):
        self.store = store
        self.vomap = vomap
        self.services = tuple(services)
        self.voms = voms

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        who = "-"
        try:
            identity = identity_from_cert_chain(environ.get(ENVIRON_PEER_CHAIN) or [], self.vomap, self.services,
                                                self.voms)
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
        if parts[0] == "bulk":
            bulk = {"put": self._bulk_put, "fetch": self._bulk_fetch, "delete": self._bulk_delete}
            if len(parts) != 2 or parts[1] not in bulk:
                raise NotFound(f"no such resource {path}")
            if method != "POST":
                return _problem(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}")
            return bulk[parts[1]](identity, environ)
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
        _may_store(identity)
        index, share, acl = _share_body(_json_body(environ))
        created = self.store.put(key_id, index, share, acl)
        return (HTTPStatus.CREATED if created else HTTPStatus.OK), {"key_id": key_id}

    def _bulk_put(self, identity: Identity, environ: dict) -> Response:
        _may_store(identity)
        body = _json_body(environ, MAX_BULK_BODY)
        if not isinstance(body, dict) or set(body) != {"shares"} or not isinstance(body["shares"], list):
            raise InvalidInput('body must be {"shares": [{"key_id", "index", "share", "acl"}, ...]}')
        items = []
        for number, item in enumerate(_bulk_list(body["shares"]), 1):
            if not isinstance(item, dict) or "key_id" not in item:
                raise InvalidInput(f"share {number}: an object with key_id, index, share, acl is required")
            fields_ = dict(item)
            key_id = fields_.pop("key_id")
            if not isinstance(key_id, str):
                raise InvalidInput(f"share {number}: key_id must be a string")
            try:
                items.append((check_key_id(key_id), *_share_body(fields_)))
            except InvalidInput as exc:
                raise InvalidInput(f"share {number} ({key_id}): {exc}") from None
        self.store.put_many(items)
        return HTTPStatus.OK, {"stored": len(items)}

    def _bulk_fetch(self, identity: Identity, environ: dict) -> Response:
        key_ids = _bulk_key_ids(_json_body(environ, MAX_BULK_BODY))
        found = self.store.get_many(key_ids)
        answers: list[dict[str, Any]] = []
        for key_id in key_ids:
            if key_id not in found:
                answers.append({"key_id": key_id, "status": 404, "detail": f"no key {key_id}"})
                continue
            index, share, acl = found[key_id]
            if not acl.may_read(identity):
                answers.append({"key_id": key_id, "status": 403,
                                "detail": f"{identity.subject} may not read key {key_id}"})
                continue
            answers.append({"key_id": key_id, "index": index, "share": base64.b64encode(share).decode()})
        return HTTPStatus.OK, {"shares": answers}

    def _bulk_delete(self, identity: Identity, environ: dict) -> Response:
        key_ids = _bulk_key_ids(_json_body(environ, MAX_BULK_BODY))
        found = self.store.get_many(key_ids)
        results, doomed = [], []
        for key_id in key_ids:
            if key_id not in found:
                results.append({"key_id": key_id, "status": 404})
            elif not _may_manage(found[key_id][2], identity):
                results.append({"key_id": key_id, "status": 403})
            else:
                doomed.append(key_id)
                results.append({"key_id": key_id, "status": 204})
        self.store.delete_many(doomed)
        return HTTPStatus.OK, {"results": results}

    def _put_acl(self, key_id: str, identity: Identity, environ: dict) -> Response:
        acl = Acl.from_json(_json_body(environ))
        _, _, current = self.store.get(key_id)
        if not _may_manage(current, identity):
            raise Forbidden(f"{identity.subject} may not change the ACL of key {key_id}")
        self.store.set_acl(key_id, acl)
        return HTTPStatus.OK, {"key_id": key_id}

    def _delete(self, key_id: str, identity: Identity, environ: dict) -> Response:
        _, _, current = self.store.get(key_id)
        if not _may_manage(current, identity):
            raise Forbidden(f"{identity.subject} may not delete key {key_id}")
        self.store.delete(key_id)
        return HTTPStatus.NO_CONTENT, None


def _may_store(identity: Identity) -> None:
    if identity.kind != "service" and ("register" not in identity.groups or identity.limited):
        raise Forbidden(f"{identity.subject} may not store keys (service or register only, no limited proxy)")


def _may_manage(acl: Acl, identity: Identity) -> bool:
    """The ACL's managers (owner, service, register), and never through a limited proxy."""
    return acl.may_manage(identity) and not identity.limited


def _share_body(body: Any) -> tuple[int, bytes, Acl]:
    """A share to store: ``{"index", "share", "acl"}``, checked field by field."""
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
    return index, share, Acl.from_json(body["acl"])


def _bulk_list(items: list[Any]) -> list[Any]:
    if not 0 < len(items) <= MAX_BULK:
        raise InvalidInput(f"a bulk request names 1 to {MAX_BULK} keys, not {len(items)}")
    return items


def _bulk_key_ids(body: Any) -> list[str]:
    if not isinstance(body, dict) or set(body) != {"key_ids"} or not isinstance(body["key_ids"], list):
        raise InvalidInput('body must be {"key_ids": [...]}')
    key_ids = _bulk_list(body["key_ids"])
    if not all(isinstance(k, str) for k in key_ids):
        raise InvalidInput("key_ids must be strings")
    return list(dict.fromkeys(check_key_id(k) for k in key_ids))


def _problem(status: HTTPStatus, detail: str) -> Response:
    return status, {"status": status.value, "title": status.phrase, "detail": detail}


def _json_body(environ: dict, limit: int = MAX_BODY) -> Any:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise InvalidInput("bad Content-Length") from None
    if not 0 < length <= limit:
        raise InvalidInput(f"a JSON body of at most {limit} bytes is required")
    try:
        return json.loads(environ["wsgi.input"].read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidInput("body is not valid JSON") from None


def make_server(config: KeystoreServerConfig) -> wsgi.Server:
    """A cheroot server for ``config``, not yet started (``prepare`` binds, ``serve`` runs)."""
    for name in ("cert", "key", "ca"):
        if not getattr(config, name).is_file():
            raise ConfigError(f"keystore: {name} file {getattr(config, name)} not found")
    voms = VomsTrust.from_config(config.vomsdir, config.ca, config.voms_roles) if config.vomsdir else None
    app = KeystoreApp(ShareStore(config.database), VoMap.load(config.vomap), config.services, voms)
    server = wsgi.Server((config.host, config.port), app, numthreads=config.threads,
                         timeout=config.idle_timeout)  # type: ignore[arg-type]  # cheroot takes float seconds; its stub says int
    server.ssl_adapter = ClientAuthSSLAdapter(str(config.cert), str(config.key), str(config.ca))
    return server
