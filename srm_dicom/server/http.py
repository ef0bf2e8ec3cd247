"""The HTTPS server under the storage element: cheroot, with its limits set deliberately.

cheroot's defaults leave a small server open to small requests (README, "HTTP limits"):
it does the TLS handshake in its one accepting thread, so a client that connects and
says nothing stalls every other; a worker thread waits for a slow client's headers as
long as the client keeps dripping bytes; headers have no size limit; and its own
refusals are plain text. Here:

- the TLS handshake runs in a worker, within ``header_timeout``;
- the request line and headers must arrive within ``header_timeout`` in all, a body
  within ``body_timeout``, and no read waits longer than ``timeout``; past that, 408;
- headers are at most ``max_header_size`` bytes (431), bodies ``max_body_size`` (413);
- one client address holds at most ``max_connections_per_client`` connections: beyond,
  a new connection is closed at once, before it can occupy a worker;
- every refusal cheroot makes itself is an RFC 7807 problem, like the application's.

cheroot has no switch for any of this but the sizes; the hooks used are its documented
extension points (``ConnectionClass``, ``RequestHandlerClass``, the SSL adapter).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from http import HTTPStatus
from typing import Any

from cheroot import server as cheroot_server
from cheroot import wsgi
from cheroot.makefile import MakeFile, StreamReader, StreamWriter

from srm_dicom.config import Config
from srm_dicom.identity import ClientAuthSSLAdapter
from srm_dicom.server.problems import Problem

log = logging.getLogger(__name__)

PLAIN_HTTP = "this server speaks HTTPS only on this port"
# The listen backlog: cheroot's default of 5 drops connections of a burst of clients (they
# retry a second later); the per-client limit, not the backlog, is what refuses a flood.
BACKLOG = 256
# Kept-alive connections at once: past cheroot's default of 10, every answer says
# ``Connection: close``, so beyond ten grid clients each request paid a new TLS handshake
# (the load run's 64 clients did, for every request). An idle kept-alive connection waits in
# cheroot's selector, not in a worker thread, and one address holds at most
# ``max_connections_per_client``: this bounds the file descriptors they take.
KEEP_ALIVE_CONNECTIONS = 512


class _DeadlineSocketIO(socket.SocketIO):
    """A socket's raw reader whose reads give up at a deadline, however slowly bytes drip in."""

    def __init__(self, sock: socket.socket, idle: float) -> None:
        super().__init__(sock, "rb")
        self.deadline: float | None = None
        self._idle = idle
        self._socket = sock

    def readinto(self, buffer: Any) -> int | None:  # noqa: ANN401 - io's buffer protocol
        wait = self._idle
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("timed out")  # cheroot's text for a read timeout: it answers 408
        self._socket.settimeout(wait)
        return super().readinto(buffer)


class _DeadlineReader(StreamReader):
    def __init__(self, sock: socket.socket, bufsize: int, idle: float) -> None:
        # StreamReader.__init__ would make a plain socket.SocketIO: skip it for ours
        super(StreamReader, self).__init__(_DeadlineSocketIO(sock, idle), bufsize)
        self.bytes_read = 0

    def set_deadline(self, seconds: float | None) -> None:
        self.raw.deadline = None if seconds is None else time.monotonic() + seconds  # type: ignore[attr-defined]


class _SocketWriter(StreamWriter):
    """cheroot's writer copies every chunk into a bytearray, then out of it again as bytes,
    before one send (cheroot/makefile.py): two copies of each byte of a warm GET, a fifth of
    the server's CPU for a 100 MiB file (issue 9). It sends at once anyway; this sends the
    caller's bytes as they are, sendall doing what a short send left over."""

    def __init__(self, sock: socket.socket, bufsize: int) -> None:
        super().__init__(sock, "wb", bufsize)
        self._socket = sock

    def write(self, val: Any) -> int:  # noqa: ANN401 - io's buffer protocol
        self._checkClosed()  # type: ignore[attr-defined]
        with self._write_lock:  # type: ignore[attr-defined]
            self._socket.sendall(val)
        self.bytes_written += len(val)
        return len(val)


def _problem_bytes(protocol: str, status: HTTPStatus, detail: str) -> bytes:
    body = Problem(status, detail).body()
    head = (f"{protocol} {status.value} {status.phrase}\r\nContent-Type: application/problem+json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + body


class _Request(cheroot_server.HTTPRequest):
    """cheroot's request, with deadlines on the head and the body, and problem answers."""

    server: LimitedServer
    conn: _Connection

    def parse_request(self) -> None:
        self.conn.rfile.set_deadline(self.server.header_timeout)
        super().parse_request()
        self.conn.rfile.set_deadline(self.server.body_timeout if self.ready else None)

    def send_headers(self) -> None:
        """An answer with ``Connection: close`` (a 408, a 413) closes without reading the rest of
        the body first, which cheroot would otherwise wait for."""
        if any(k.lower() == b"connection" and v.lower() == b"close" for k, v in self.outheaders):
            self.close_connection = True
        super().send_headers()

    def simple_response(self, status: object, msg: object = "") -> None:
        """cheroot's own refusals (bad request line, headers too large, timeouts) as RFC 7807."""
        code = int(str(status)[:3])
        detail = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg)
        if code == 413 and "header" in detail:  # cheroot says 413 for headers: RFC 6585 has the precise status
            code = 431
        try:
            answer = HTTPStatus(code)
        except ValueError:
            answer = HTTPStatus.BAD_REQUEST
        self.close_connection = True
        with contextlib.suppress(OSError):  # the client is gone: nothing to answer, nothing to log
            self.conn.wfile.write(_problem_bytes(self.server.protocol, answer, detail or answer.description))


class _Connection(cheroot_server.HTTPConnection):
    """One client connection: counted against its address, TLS handshake in the worker."""

    RequestHandlerClass = _Request
    server: LimitedServer

    def __init__(self, server: LimitedServer, sock: socket.socket, makefile: Any = None) -> None:  # noqa: ANN401
        super().__init__(server, sock, makefile or MakeFile)
        self.rfile = _DeadlineReader(sock, self.rbufsize, server.timeout)
        self.wfile = _SocketWriter(sock, self.wbufsize)
        try:
            self._client: str | None = sock.getpeername()[0]
        except OSError:
            self._client = None
        self._admitted = server.admit(self._client)
        if not self._admitted:  # the client sees the end at once, without waiting for a worker
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._handshaken = not isinstance(sock, ssl.SSLSocket)
        self._closed = False

    def communicate(self) -> bool:
        if not self._admitted:
            return False
        if not self._handshaken and not self._handshake():
            return False
        return bool(super().communicate())

    def _handshake(self) -> bool:
        """The TLS handshake cheroot would do in its accepting thread, here in a worker, in time."""
        tls: ssl.SSLSocket = self.socket
        try:
            tls.settimeout(self.server.header_timeout)
            tls.do_handshake()
        except ssl.SSLError as exc:
            if "http request" in str(exc).lower():  # plain HTTP on the TLS port: say so, in the clear
                with contextlib.suppress(OSError):
                    socket.socket.sendall(tls, _problem_bytes("HTTP/1.1", HTTPStatus.BAD_REQUEST, PLAIN_HTTP))
            return False
        except OSError:  # the client went away or said nothing in time
            return False
        self._handshaken = True
        self.ssl_env = self.server.ssl_adapter.get_environ(tls)
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.server.release(self._client)
        super().close()


class DeferredHandshakeAdapter(ClientAuthSSLAdapter):
    """The client-certificate adapter, wrapping without a handshake (the connection does it)."""

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict]:
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), {}


class LimitedServer(wsgi.Server):
    """cheroot's WSGI server with the limits of ``[server]`` (module docstring)."""

    ConnectionClass = _Connection

    def __init__(self, bind_addr: tuple[str, int], app: Any, *, numthreads: int, server_name: str,  # noqa: ANN401
                 timeout: float, header_timeout: float, body_timeout: float, max_header_size: int,
                 max_body_size: int, max_connections_per_client: int) -> None:
        super().__init__(bind_addr, app, numthreads=numthreads, server_name=server_name,
                         request_queue_size=BACKLOG)
        self.timeout = timeout  # type: ignore[assignment] # cheroot takes float seconds, its stub says int
        self.max_request_header_size = max_header_size
        self.max_request_body_size = max_body_size
        self.keep_alive_conn_limit = KEEP_ALIVE_CONNECTIONS
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections_per_client = max_connections_per_client
        self._per_client: Counter[str | None] = Counter()
        self._lock = threading.Lock()

    def admit(self, client: str | None) -> bool:
        """Count a new connection of ``client``; False (and not counted) past the limit."""
        with self._lock:
            if self.max_connections_per_client and self._per_client[client] >= self.max_connections_per_client:
                refused = True
            else:
                self._per_client[client] += 1
                refused = False
        if refused:
            log.warning("%s holds %d connections already: one more refused", client, self.max_connections_per_client)
        return not refused

    def release(self, client: str | None) -> None:
        with self._lock:
            if self._per_client[client] > 0:
                self._per_client[client] -= 1
            if self._per_client[client] == 0:
                del self._per_client[client]

    def error_log(self, msg: str = "", level: int = 20, traceback: bool = False) -> None:
        """cheroot's messages go to the logging tree; a traceback only for a fault of ours, not
        for a client that went away mid-request (a socket or TLS error)."""
        if traceback and isinstance(sys.exc_info()[1], OSError):
            log.info("%s (%s)", msg, sys.exc_info()[1])
            return
        log.log(level, "%s", msg, exc_info=traceback)


def https_server(config: Config, app: Any) -> LimitedServer:  # noqa: ANN401 - a WSGI application
    """The HTTPS server; client certificates are asked for but optional (token users share
    the port), verified against [identity] ca, proxies accepted. OpenSSL's security level is
    left as the system sets it: a chain with a SHA-1 signature fails the handshake, proxies
    included (voms-proxy-fake signs with SHA-1 only under an ECDSA CA; README, "VOMS")."""
    settings = config.server
    server = LimitedServer(
        (settings.host, settings.port), app, numthreads=settings.threads, server_name=settings.sitename,
        timeout=settings.timeout, header_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
        max_header_size=settings.max_header_size, max_body_size=settings.max_body_size,
        max_connections_per_client=settings.max_connections_per_client,
    )
    server.ssl_adapter = DeferredHandshakeAdapter(
        str(config.path(settings.cert)), str(config.path(settings.key)),
        str(config.path(config.identity.ca)), required=False,
    )
    return server
