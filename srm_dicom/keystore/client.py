"""The client of the n key servers: write shares everywhere, read any k of them back.

All servers are asked in parallel and every call is bounded by one timeout, so a dead or
hanging server costs at most that long and the error names it. Reading tolerates n - k
servers down, refusing or returning a wrong share: each k-subset is combined and checked
against the file's key commitment until one passes.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import itertools
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from srm_dicom.config import Config
from srm_dicom.crypto.shares import Share, combine_key, split_key
from srm_dicom.errors import ConfigError, InvalidInput, MdmError, NotFound
from srm_dicom.events import Arg, KeyServerCall, timed
from srm_dicom.keystore import Acl, KeyAccessDenied, KeystoreError, check_key_id

log = logging.getLogger(__name__)

# Key server answers that show it working (a refusal is the server doing its job).
ANSWERS = (403, 404)
PROBE_KEY = "mdm-health-probe"


def _answer(error: BaseException) -> bool:
    return getattr(error, "status", None) in ANSWERS


@dataclass
class ServerFailure(Exception):
    """One server's failure; ``reason`` is a short phrase ("unreachable: timed out")."""

    url: str
    reason: str
    status: int | None = None

    def __str__(self) -> str:
        return f"{self.url} {self.reason}"


def _summary(failures: Sequence[ServerFailure]) -> str:
    """``url1, url2 unreachable: timed out; url3 answered 403: ...``: servers grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for failure in failures:
        by_reason.setdefault(failure.reason, []).append(failure.url)
    return "; ".join(f"{', '.join(urls)} {reason}" for reason, urls in by_reason.items())


class KeystoreClient:
    """Talks to n key servers (mutual TLS with ``cert``/``key``, servers checked against ``ca``)."""

    def __init__(
        self,
        urls: Sequence[str],
        k: int = 2,
        *,
        ca: Path,
        cert: Path,
        key: Path,
        timeout: float = 10.0,
    ):
        if not 1 <= k <= len(urls):
            raise ConfigError(f"keystore: k={k} needs at least k server URLs, got {len(urls)}")
        for url in urls:
            if urlsplit(url).scheme != "https" or not urlsplit(url).hostname:
                raise ConfigError(f"keystore: server URL {url!r} must be https://HOST:PORT")
        for name, path in (("ca", ca), ("cert", cert), ("key", key)):
            if not Path(path).is_file():
                raise ConfigError(f"keystore: {name} file {path} not found")
        self.urls = tuple(url.rstrip("/") for url in urls)
        self.k = k
        self.timeout = timeout
        self._idle: dict[str, list[http.client.HTTPSConnection]] = {}
        self._idle_lock = threading.Lock()
        self._context = ssl.create_default_context(cafile=str(ca))
        try:
            self._context.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as exc:
            raise ConfigError(f"keystore: cannot load {cert} / {key}: {exc.reason}") from None

    @classmethod
    def from_config(cls, config: Config) -> KeystoreClient:
        section = config.keystore
        return cls(
            section.urls,
            section.k,
            ca=config.path(section.ca),
            cert=config.path(section.cert),
            key=config.path(section.key),
            timeout=section.timeout,
        )

    @property
    def n(self) -> int:
        return len(self.urls)

    def put_key(self, key_id: str, key: bytes, acl: Acl) -> None:
        """Store one share on every server; if any write fails, delete the others and raise."""
        check_key_id(key_id)
        shares = split_key(key, self.k, self.n)
        bodies = [{"index": s.index, "share": base64.b64encode(s.data).decode(), "acl": acl.to_json()} for s in shares]
        results = self._on_all("PUT", key_id, "", bodies)
        failures = [r for r in results.values() if isinstance(r, ServerFailure)]
        if not failures:
            return
        stored = [url for url, r in results.items() if not isinstance(r, ServerFailure)]
        undo = self._on_all("DELETE", key_id, "", [None] * self.n, only=stored)
        left = [r for r in undo.values() if isinstance(r, ServerFailure) and r.status != 404]
        rollback = f"; rollback failed on {_summary(left)}" if left else ", rolled back"
        raise _error(f"storing key {key_id} failed: {_summary(failures)}{rollback}", failures)

    def fetch_key(self, key_id: str, check: Callable[[bytes], bool]) -> bytes:
        """The key from the first k-subset of shares that passes ``check`` (the key commitment)."""
        check_key_id(key_id)
        shares: list[Share] = []
        failures: list[ServerFailure] = []
        tried: set[frozenset[int]] = set()
        deadline = time.monotonic() + self.timeout
        pool = ThreadPoolExecutor(max_workers=self.n)
        try:
            pending: dict[Future, str] = {
                pool.submit(self._request, "GET", url, f"/keys/{quote(key_id, safe='')}", None): url
                for url in self.urls
            }
            while pending:
                done, _ = wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
                if not done:
                    failures += [ServerFailure(u, "unreachable: timed out") for u in pending.values()]
                    break
                for future in done:
                    url = pending.pop(future)
                    try:
                        shares.append(_share_from(url, future.result()))
                    except ServerFailure as failure:
                        failures.append(failure)
                for subset in itertools.combinations(shares, self.k):
                    indices = frozenset(s.index for s in subset)
                    if indices in tried:
                        continue
                    tried.add(indices)
                    key = combine_key(list(subset))
                    if check(key):
                        return key
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        raise self._no_key(key_id, shares, failures)

    def put_keys(self, keys: Sequence[tuple[str, bytes, Acl]]) -> None:
        """``put_key`` for many keys in one request per server (``/bulk/put``): every server
        stores all of its shares or none; if any server fails, the others' are deleted."""
        if not keys:
            return
        for key_id, _, _ in keys:
            check_key_id(key_id)
        splits = [split_key(key, self.k, self.n) for _, key, _ in keys]
        bodies = [
            {"shares": [
                {"key_id": key_id, "index": shares[server].index,
                 "share": base64.b64encode(shares[server].data).decode(), "acl": acl.to_json()}
                for (key_id, _, acl), shares in zip(keys, splits, strict=True)
            ]}
            for server in range(self.n)
        ]
        results = self._on_all_paths("POST", "/bulk/put", bodies)
        failures = [r for r in results.values() if isinstance(r, ServerFailure)]
        if not failures:
            return
        stored = [url for url, r in results.items() if not isinstance(r, ServerFailure)]
        key_ids = [key_id for key_id, _, _ in keys]
        undo = self._on_all_paths("POST", "/bulk/delete", [{"key_ids": key_ids}] * self.n, only=stored)
        left = [r for r in undo.values() if isinstance(r, ServerFailure)]
        rollback = f"; rollback failed on {_summary(left)}" if left else ", rolled back"
        raise _error(f"storing {len(keys)} keys failed: {_summary(failures)}{rollback}", failures)

    def fetch_keys(self, key_ids: Sequence[str], check: Callable[[str, bytes], bool]) -> dict[str, bytes | MdmError]:
        """``fetch_key`` for many keys in one request per server (``/bulk/fetch``): each key
        the first k-subset of its shares that passes ``check(key_id, key)``, or the error
        ``fetch_key`` would have raised for it alone."""
        unique = list(dict.fromkeys(check_key_id(k) for k in key_ids))
        if not unique:
            return {}
        results = self._on_all_paths("POST", "/bulk/fetch", [{"key_ids": unique}] * self.n)
        shares: dict[str, list[Share]] = {key_id: [] for key_id in unique}
        failures: dict[str, list[ServerFailure]] = {key_id: [] for key_id in unique}
        for url, answer in results.items():
            if isinstance(answer, ServerFailure):
                for key_id in unique:
                    failures[key_id].append(answer)
                continue
            items = answer.get("shares") if isinstance(answer, dict) else None
            by_id = {i.get("key_id"): i for i in items if isinstance(i, dict)} if isinstance(items, list) else {}
            for key_id in unique:
                item = by_id.get(key_id)
                if item is None:
                    failures[key_id].append(ServerFailure(url, "answered without this key"))
                elif "status" in item:
                    status = item["status"] if isinstance(item["status"], int) else None
                    failures[key_id].append(ServerFailure(url, f"answered {status}: {item.get('detail')}", status))
                else:
                    try:
                        shares[key_id].append(_share_from(url, item))
                    except ServerFailure as failure:
                        failures[key_id].append(failure)
        found: dict[str, bytes | MdmError] = {}
        for key_id in unique:
            try:
                found[key_id] = self._combine(key_id, shares[key_id], failures[key_id],
                                              lambda key, key_id=key_id: check(key_id, key))  # type: ignore[misc]
            except MdmError as exc:
                found[key_id] = exc
        return found

    def _combine(self, key_id: str, shares: list[Share], failures: list[ServerFailure],
                 check: Callable[[bytes], bool]) -> bytes:
        """The first k-subset of ``shares`` whose key passes ``check``; else the reason, naming servers."""
        for subset in itertools.combinations(shares, self.k):
            key = combine_key(list(subset))
            if check(key):
                return key
        raise self._no_key(key_id, shares, failures)

    def _no_key(self, key_id: str, shares: list[Share], failures: list[ServerFailure]) -> Exception:
        """Why no key came out of ``shares``: wrong shares, a key on no server, or too few answers."""
        if len(shares) >= self.k:
            return KeystoreError(
                f"key {key_id}: no {self.k} of the {len(shares)} shares received match the "
                "file's key commitment (a key server returned a wrong share)"
                + (f"; {_summary(failures)}" if failures else "")
            )
        if failures and all(f.status == 404 for f in failures):
            return NotFound(f"key {key_id} is on none of the key servers")
        return _error(f"key {key_id}: got {len(shares)} of the {self.k} shares needed: {_summary(failures)}", failures)

    def ping(self) -> dict[str, str | None]:
        """Which servers answer (None) and why the others do not, asking each for a key that
        never exists: the answer proves the server up and our certificate accepted."""
        results = self._on_all("GET", PROBE_KEY, "", [None] * self.n)
        return {url: None if getattr(r, "status", 404) in ANSWERS else str(r) for url, r in results.items()}

    def set_acl(self, key_id: str, acl: Acl) -> None:
        """Replace the ACL on every server; raise naming those that did not take it."""
        check_key_id(key_id)
        results = self._on_all("PUT", key_id, "/acl", [acl.to_json()] * self.n)
        failures = [r for r in results.values() if isinstance(r, ServerFailure)]
        if failures:
            raise _error(f"ACL of key {key_id} not changed on {_summary(failures)}", failures)

    def delete_key(self, key_id: str) -> None:
        """Delete the shares everywhere; a server that has none already counts as done."""
        check_key_id(key_id)
        results = self._on_all("DELETE", key_id, "", [None] * self.n)
        failures = [r for r in results.values() if isinstance(r, ServerFailure) and r.status != 404]
        if failures:
            raise _error(f"key {key_id} not deleted on {_summary(failures)}", failures)

    def _on_all(
        self,
        method: str,
        key_id: str,
        suffix: str,
        bodies: Sequence[Any],
        only: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """One request per server in parallel (body i to server i); a result or a failure each."""
        return self._on_all_paths(method, f"/keys/{quote(key_id, safe='')}{suffix}", bodies, only)

    def _on_all_paths(
        self,
        method: str,
        path: str,
        bodies: Sequence[Any],
        only: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        targets = [(u, b) for u, b in zip(self.urls, bodies, strict=True) if only is None or u in only]
        results: dict[str, Any] = {}
        pool = ThreadPoolExecutor(max_workers=max(1, len(targets)))
        try:
            futures = {pool.submit(self._request, method, u, path, b): u for u, b in targets}
            done, late = wait(futures, timeout=self.timeout)
        finally:
            # A hanging server must not hold the caller past the timeout: leave its thread.
            pool.shutdown(wait=False, cancel_futures=True)
        for future in done:
            try:
                results[futures[future]] = future.result()
            except ServerFailure as failure:
                results[futures[future]] = failure
        for future in late:
            results[futures[future]] = ServerFailure(futures[future], "unreachable: timed out")
        return results

    def _connection(self, url: str) -> http.client.HTTPSConnection:
        """An idle kept-alive connection to ``url``, or a new one: a mutual-TLS handshake costs
        five times the request itself, and registering or staging a file asks every server."""
        with self._idle_lock:
            idle = self._idle.get(url)
            if idle:
                return idle.pop()
        parts = urlsplit(url)
        return http.client.HTTPSConnection(parts.hostname or "", parts.port or 443, context=self._context,
                                           timeout=self.timeout)

    @timed(KeyServerCall, url=Arg("url"), operation=Arg("method"), answered=_answer)
    def _request(self, method: str, url: str, resource: str, body: Any) -> Any:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        path = f"{urlsplit(url).path}{resource}"
        for attempt in (1, 2):
            connection = self._connection(url)
            reused = connection.sock is not None
            try:
                connection.request(method, path, payload, headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                # A kept-alive connection the server closed meanwhile (its idle timeout) fails on
                # first use as a TLS EOF, a reset or an empty answer: all mean "open a new one".
                # ssl.SSLError is an OSError, so it is retried too; every request here is
                # idempotent (GET, PUT, DELETE of one key; the bulk POSTs), so sending it again is safe.
                if reused and attempt == 1 and not isinstance(exc, socket.timeout):
                    continue
                raise _connection_failure(url, exc) from None
            if response.will_close:
                connection.close()
            else:
                with self._idle_lock:
                    self._idle.setdefault(url, []).append(connection)
            break
        try:
            answer = json.loads(data) if data else None
        except ValueError:
            answer = None
        if response.status >= 400:
            detail = answer.get("detail") if isinstance(answer, dict) else None
            raise ServerFailure(url, f"answered {response.status}: {detail or response.reason}", response.status)
        return answer


def _connection_failure(url: str, exc: OSError | http.client.HTTPException) -> ServerFailure:
    """One server's connection-level failure, named for a person."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ServerFailure(url, f"untrusted: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return ServerFailure(url, f"refused the TLS handshake ({exc.reason or 'connection closed'})")
    reason = "timed out" if isinstance(exc, socket.timeout) else str(exc) or type(exc).__name__
    return ServerFailure(url, f"unreachable: {reason}")


def _share_from(url: str, answer: Any) -> Share:
    try:
        return Share(int(answer["index"]), base64.b64decode(answer["share"], validate=True))
    except (TypeError, KeyError, ValueError, binascii.Error, InvalidInput):
        raise ServerFailure(url, "answered with a malformed share") from None


def _error(message: str, failures: Sequence[ServerFailure]) -> KeystoreError:
    """Access denied when the servers that answered refused; a plain failure otherwise."""
    if failures and all(f.status == 403 for f in failures):
        return KeyAccessDenied(message)
    return KeystoreError(message)
