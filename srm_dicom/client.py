"""The grid side's download of one file: HTTPS GET, wait out staging, fetch the key, decrypt.

The storage element serves encrypted containers (see DESIGN.md, HTTP contracts): a file
not yet staged from the PACS answers 503 with Retry-After, so the client retries within
a bounded total time. The key id is in the container's clear header, so the key shares
are fetched only once the first bytes arrived, and the body is decrypted as it streams
into a temporary file beside the destination, renamed over it only when every chunk
authenticated: a failed download never leaves a half file.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import json
import logging
import os
import re
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode, urlsplit

from srm_dicom.config import Config
from srm_dicom.crypto.container import HEADER_SIZE, check_key, decrypt_stream, read_header
from srm_dicom.entry_key import key_name
from srm_dicom.errors import ConfigError, InvalidInput, MdmError, NotFound, PacsError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.names import SIDECARS, normalize_lfn, parse_lfn

log = logging.getLogger(__name__)

# A transfer that delivers no byte for this long is given up (the staging wait is separate).
STALL_TIMEOUT = 60.0
# Retry-After missing or unreadable: what to wait before asking again.
DEFAULT_RETRY_AFTER = 5.0
# Never ask again sooner than this, even when told "Retry-After: 0".
MIN_RETRY_AFTER = 0.1

Progress = Callable[[int, int], None]


class AccessDenied(MdmError):
    """The storage element refused the caller (401/403) or the TLS handshake failed."""

    exit_code = 5


class StillStaging(PacsError):
    """The storage element kept answering 503 (staging from the PACS) past the time allowed."""


class DownloadFailed(MdmError):
    """The connection broke, the server failed, or it answered something unexpected."""


class ConnectionClosed(DownloadFailed):
    """The server closed the connection before answering (at its connection limit, restarting,
    or closing a connection it had kept): asking again on a new connection is the cure."""


# How a connection the server closed shows before any answer: a TLS EOF or close_notify
# (ssl.SSLError subclasses, so they must be told from a refused handshake), a reset, an
# empty answer (http.client.RemoteDisconnected is a ConnectionResetError).
_CLOSED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError)
# Asking again is only safe for requests that change nothing.
_IDEMPOTENT = ("GET", "HEAD")
# One sidecar link of a volume's answer (server/files.py): </guid/UUID>; rel="describedby"; title="3D.json"
_SIDECAR_LINK = re.compile(r'<(?P<target>/guid/[0-9a-f-]{36})>;\s*rel="describedby";\s*title="(?P<title>[^"]+)"')


def guid_path(guid: str) -> str:
    """``/guid/<uuid>`` from ``guid:<uuid>``, ``/guid/<uuid>`` or a bare UUID."""
    text = guid.strip().removeprefix("guid:").removeprefix("/guid/").rstrip("/")
    try:
        return f"/guid/{uuid.UUID(text)}"
    except ValueError:
        raise InvalidInput(f"'{guid}' is not a GUID (guid:<uuid>)") from None


def lfn_path(lfn: str) -> str:
    """The URL path of an LFN naming one image or volume."""
    if parse_lfn(lfn)[1] is None:
        raise InvalidInput(f"'{lfn}' names a directory, not an image (/grid/<vo>/mdm/S/SE/SOP or .../3D)")
    return normalize_lfn(lfn)


@dataclass(frozen=True)
class Download:
    """What ``get`` wrote: the file's GUID, its decrypted size and how long staging took."""

    guid: str
    size: int
    encrypted_size: int
    attempts: int
    seconds: float


class StorageClient:
    """HTTPS client of one storage element, with the caller's certificate for TLS client auth."""

    def __init__(self, url: str, *, ca: Path, cert: Path, key: Path, timeout: float = 300.0) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"config: [storage] url {url!r} must be https://HOST:PORT")
        for name, path in (("ca", ca), ("cert", cert), ("key", key)):
            if not Path(path).is_file():
                raise ConfigError(f"config: [keystore] {name} file {path} not found")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=str(ca))
        try:
            self._context.load_cert_chain(str(cert), str(key))
        except ssl.SSLError as exc:
            raise ConfigError(f"config: cannot load {cert} / {key}: {exc.reason}") from None

    @classmethod
    def from_config(cls, config: Config, timeout: float | None = None) -> StorageClient:
        """[storage] url and timeout; the credential and CA are the [keystore] ones (one identity)."""
        if not config.storage.url:
            raise ConfigError("config: [storage] url is not set (the storage element's https://HOST:PORT)")
        section = config.keystore
        return cls(
            config.storage.url,
            ca=config.path(section.ca),
            cert=config.path(section.cert),
            key=config.path(section.key),
            timeout=config.storage.timeout if timeout is None else timeout,
        )

    def get(
        self,
        path: str,
        destination: Path,
        keystore: KeystoreClient,
        progress: Progress | None = None,
    ) -> Download:
        """Download ``path``, decrypt it and put it at ``destination`` (replacing any file there)."""
        directory = destination.resolve().parent
        if not directory.is_dir():
            raise InvalidInput(f"{destination}: directory {directory} does not exist")
        started = time.monotonic()
        response, connection, attempts = self._open(path)
        try:
            body = _Body(response, self.url, progress)
            header = read_header(body)
            guid = str(header.key_uuid)
            log.info("guid:%s: %d bytes, version %d; fetching the key shares", guid, header.encrypted_size,
                     header.version)
            key = keystore.fetch_key(key_name(guid, header.version), lambda k: check_key(header, k))
            body.rewind_header()
            _write_atomically(destination, lambda out: decrypt_stream(key, body, out))
        finally:
            connection.close()
        return Download(guid, header.plain_size, header.encrypted_size, attempts, time.monotonic() - started)

    def get_json(self, path: str, query: dict[str, str]) -> Any:
        """The answer of a JSON API (the metadata search), refusals and failures as for a file."""
        return self._json(path, urlencode(query))

    def post_json(self, path: str, data: object) -> Any:
        """POST a JSON body to an API of the storage element (rights, delete); its JSON answer."""
        return self._json(path, "", json.dumps(data).encode())

    def _json(self, path: str, query: str, payload: bytes | None = None) -> Any:
        """GET (or POST ``payload``) and decode the JSON answer."""
        method = "GET" if payload is None else "POST"
        connection, response = self._ask(self.timeout, path, query, "application/json", method, payload)
        try:
            if response.status != 200:
                raise _refusal(response.status, path, _problem(response))
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DownloadFailed(f"{self.url}{path}: answer broken off ({type(exc).__name__})") from None
        finally:
            connection.close()
        try:
            return json.loads(body)
        except ValueError:
            raise DownloadFailed(f"{self.url}{path} answered something that is not JSON") from None

    def exists(self, path: str) -> bool:
        """Whether the storage element has ``path``: a HEAD, which never stages."""
        connection, response = self._ask(self.timeout, path, method="HEAD")
        try:
            if response.status == 404:
                return False
            if response.status != 200:
                raise _refusal(response.status, path, _problem(response))
            return True
        finally:
            connection.close()

    def guid_of(self, path: str) -> str:
        """The GUID of the entry at ``path``, from the ETag ("<guid>-<version>") of a HEAD."""
        connection, response = self._ask(self.timeout, path, method="HEAD")
        try:
            if response.status != 200:
                raise _refusal(response.status, path, _problem(response))
            return response.getheader("ETag", "").strip('"')[:36]
        finally:
            connection.close()

    def sidecars_of(self, path: str) -> dict[str, str]:
        """The sidecars the storage element links to the volume at ``path`` (RFC 8288 Link,
        rel="describedby"), name → URL path, from a HEAD, which never stages; empty when it
        links none or the HEAD fails (the download then says why)."""
        connection, response = self._ask(self.timeout, path, method="HEAD")
        try:
            if response.status != 200:
                return {}
            links = _SIDECAR_LINK.finditer(response.getheader("Link") or "")
            return {match["title"]: match["target"] for match in links if match["title"] in SIDECARS}
        finally:
            connection.close()

    def _open(self, path: str) -> tuple[http.client.HTTPResponse, http.client.HTTPSConnection, int]:
        """GET ``path`` until it answers 200; 503 is retried as told by Retry-After until the deadline."""
        deadline = time.monotonic() + self.timeout
        attempts = 0
        while True:
            attempts += 1
            remaining = max(1.0, deadline - time.monotonic())
            connection, response = self._ask(remaining, path)
            if response.status == 200:
                connection.sock.settimeout(STALL_TIMEOUT)
                return response, connection, attempts
            problem = _problem(response)
            connection.close()
            if response.status != 503:
                raise _refusal(response.status, path, problem)
            wait = _retry_after(response.getheader("Retry-After"))
            if time.monotonic() + wait >= deadline:
                raise StillStaging(
                    f"still staging after {attempts} attempts in {self.timeout:g} s: {_naming(path, problem)}; "
                    "try again later or give a longer --timeout"
                )
            log.info("%s: 503 %s; retrying in %g s", self.url, problem or "staging", wait)
            time.sleep(wait)

    def _ask(
        self, timeout: float, path: str, query: str = "", accept: str = "*/*", method: str = "GET",
        body: bytes | None = None,
    ) -> tuple[http.client.HTTPSConnection, http.client.HTTPResponse]:
        """A new connection and the answer on it; a GET or HEAD the server hung up on before
        answering is asked once more on a fresh connection."""
        for attempt in (1, 2):
            connection = http.client.HTTPSConnection(self.host, self.port, context=self._context, timeout=timeout)
            try:
                return connection, self._request(connection, path, query, accept, method, body)
            except ConnectionClosed:
                connection.close()
                if attempt == 2 or method not in _IDEMPOTENT:
                    raise
                log.info("%s closed the connection before answering; asking again", self.url)
            except BaseException:
                connection.close()
                raise
        raise AssertionError("unreachable")

    def _request(
        self, connection: http.client.HTTPSConnection, path: str, query: str = "", accept: str = "*/*",
        method: str = "GET", body: bytes | None = None,
    ) -> http.client.HTTPResponse:
        target = self.prefix + quote(path) + (f"?{query}" if query else "")
        headers = {"Accept": accept} | ({"Content-Type": "application/json"} if body is not None else {})
        try:
            connection.request(method, target, body, headers)
            return connection.getresponse()
        except ssl.SSLCertVerificationError as exc:
            raise AccessDenied(f"{self.url}: server certificate not trusted: {exc.verify_message}") from None
        except _CLOSED:
            raise ConnectionClosed(f"{self.url} closed the connection before answering") from None
        except ssl.SSLError as exc:
            raise AccessDenied(f"{self.url} refused the TLS handshake ({exc.reason or 'connection closed'})") from None
        except TimeoutError:
            # The server holds a GET while it stages: silence until the deadline is staging not ended.
            raise StillStaging(
                f"{path}: no answer from {self.url} within {self.timeout:g} s; "
                "try again later or give a longer --timeout"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
            raise DownloadFailed(f"{self.url} unreachable: {reason}") from None


class _Body(io.RawIOBase):
    """The response body as a file for ``decrypt_stream``, header bytes kept for a second read.

    The header is read once to learn the key id, then handed to ``decrypt_stream`` again,
    which authenticates it; network failures become one-line errors counting the bytes.
    """

    def __init__(self, response: http.client.HTTPResponse, url: str, progress: Progress | None) -> None:
        super().__init__()
        self._response = response
        self._url = url
        self._progress = progress
        self._total = response.length or 0
        self._received = 0
        self._kept = bytearray()
        self._replay = memoryview(b"")

    def readable(self) -> bool:
        return True

    def rewind_header(self) -> None:
        self._replay = memoryview(bytes(self._kept))

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._replay:
            count = min(len(view), len(self._replay))
            view[:count] = self._replay[:count]
            self._replay = self._replay[count:]
            return count
        try:
            count = self._response.readinto(view)
        except (OSError, http.client.HTTPException) as exc:
            raise self._broken("stalled" if isinstance(exc, TimeoutError) else type(exc).__name__) from None
        if not count and view and self._received < self._total:
            # http.client returns a short body without complaint when the server hangs up early.
            raise self._broken("connection closed")
        if len(self._kept) < HEADER_SIZE:
            self._kept += view[: min(count, HEADER_SIZE - len(self._kept))]
        self._received += count
        if self._progress and count:
            self._progress(self._received, self._total)
        return count

    def _broken(self, reason: str) -> DownloadFailed:
        return DownloadFailed(
            f"download from {self._url} broken after {self._received} of {self._total} bytes ({reason})"
        )


def _write_atomically(destination: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Fill a temporary file beside ``destination``, then rename it over; remove it on any failure."""
    with tempfile.NamedTemporaryFile(dir=destination.resolve().parent, prefix=".mdm-get-", delete=False) as out:
        try:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        except BaseException:
            os.unlink(out.name)
            raise
    try:
        os.replace(out.name, destination)
    except OSError as exc:
        os.unlink(out.name)
        raise InvalidInput(f"cannot write {destination}: {exc.strerror}") from None


def _problem(response: http.client.HTTPResponse) -> str:
    """The RFC 7807 ``detail`` (else ``title``) of an error answer, or its reason phrase."""
    try:
        body = response.read(65536)
    except (OSError, http.client.HTTPException):
        body = b""
    try:
        problem = json.loads(body)
    except ValueError:
        problem = None
    if isinstance(problem, dict):
        text = problem.get("detail") or problem.get("title")
        if isinstance(text, str) and text:
            return " ".join(text.split())
    return response.reason


def _naming(path: str, problem: str) -> str:
    """The server's explanation, with the path in front unless it already names it (say it once)."""
    return problem if path in problem else f"{path}: {problem}"


def _refusal(status: int, path: str, problem: str) -> MdmError:
    if status == 404:
        return NotFound(f"not found: {_naming(path, problem)}")
    if status in (401, 403):
        return AccessDenied(f"access denied ({status}): {_naming(path, problem)}")
    return DownloadFailed(f"the storage element answered {status}: {_naming(path, problem)}")


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date (RFC 9110)."""
    if value is None:
        return DEFAULT_RETRY_AFTER
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = DEFAULT_RETRY_AFTER
    return max(MIN_RETRY_AFTER, seconds)
