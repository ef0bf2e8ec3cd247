"""A TCP proxy on loopback that causes network faults for real: a peer that is slow, that
hangs up on the first connections, or that breaks a transfer off in the middle.

No ``tc``/netem on these machines: a proxy in front of the real server (a PACS, a key
server, the storage element) is the fault, and the server behind it stays the real one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class FaultyProxy:
    """Forwards 127.0.0.1:``port`` to ``target``.

    ``drop_first``: that many connections are accepted and closed at once (a server that
    closed a connection, restarted, or is at its connection limit). ``delay``: seconds added
    before each chunk forwarded from the server. ``abort_after``: the connection is reset
    once that many bytes came from the server (a peer dying mid-transfer).
    """

    target: tuple[str, int]
    drop_first: int = 0
    delay: float = 0.0
    abort_after: int | None = None
    accepted: int = 0
    _listener: socket.socket = field(init=False)
    _stopped: threading.Event = field(default_factory=threading.Event, init=False)
    _open: list[socket.socket] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True, name="faulty-proxy").start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        self.cut()

    def cut(self) -> None:
        """Close every connection open now, as an idle timeout on the way does (new ones go through)."""
        while self._open:
            sock = self._open.pop()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            if self.accepted <= self.drop_first:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            self._open += [client, server]
            for sock in (client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pipe, args=(client, server, 0.0, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.delay, self.abort_after),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, delay: float, abort_after: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if delay:
                    time.sleep(delay)
                if abort_after is not None and sent + len(data) > abort_after:
                    sink.sendall(data[: max(0, abort_after - sent)])
                    for sock in (sink, source):  # the peer died: both ends reset, the other pipe woken
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                        sock.close()
                    return
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
