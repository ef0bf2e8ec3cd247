"""The health board: what the events say about the stager, the cache, the PACS and the key
servers, for ``/readyz`` and the ``/status`` page.

Readiness is judged from the same events the metrics count. When they are too old to tell
(no C-ECHO in the last half of ``[health] pacs_echo_max_age``, fewer than k key servers
heard from lately), the board asks itself, at most one probe at a time and never more often
than ``[health] probe_interval``: a load balancer polling ``/readyz`` every second costs
the PACS one C-ECHO a probe interval, not one per poll.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from srm_dicom import events
from srm_dicom.config import Config
from srm_dicom.errors import MdmError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pacs.client import PacsClient

NO_GUID = "00000000-0000-4000-8000-000000000000"
# Seconds a probe may take: readiness must answer a load balancer quickly.
PROBE_TIMEOUT = 5.0


@dataclass
class PeerState:
    """The last word from one peer: when it last answered, and the last failure."""

    answered_at: float | None = None  # wall clock (time.time), for people
    answered_mono: float | None = None
    failed_at: float | None = None
    error: str | None = None
    calls: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)

    def heard(self, operation: str, error: str | None) -> None:
        self.calls[operation] += 1
        if error is None:
            self.answered_at, self.answered_mono, self.error = time.time(), time.monotonic(), None
        else:
            self.failures[operation] += 1
            self.failed_at, self.error = time.time(), error

    def answered_within(self, seconds: float) -> bool:
        return self.answered_mono is not None and time.monotonic() - self.answered_mono <= seconds


@dataclass(frozen=True)
class Check:
    name: str  # catalog, pacs, keyservers
    ok: bool
    detail: str


class HealthBoard:
    """Listens to the events from creation until ``close``. Thread-safe: hold ``lock`` to read
    several fields as one moment's state."""

    def __init__(self, config: Config, catalog: Any) -> None:
        self._config = config
        self._catalog = catalog
        self.lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self.started = time.time()
        self.stage_queue = 0
        self.staged = Counter[str]()  # ok / failed
        self.stage_errors: deque[tuple[float, str]] = deque(maxlen=5)
        self.cache_used = 0
        self.cache_quota = config.cache.quota_bytes
        self.evictions = 0
        self.requests = Counter[str]()  # by status class: 2xx, 4xx, 5xx
        self.served_bytes = 0
        self.pacs = PeerState()
        self.echo = PeerState()  # C-ECHO alone: what readiness asks for
        self.key_servers = {url.rstrip("/"): PeerState() for url in config.keystore.urls}
        self._last_pacs_probe = self._last_key_probe = float("-inf")
        self._unsubscribe = events.subscribe(self._on_event)

    def close(self) -> None:
        self._unsubscribe()

    def _on_event(self, event: object) -> None:
        with self.lock:
            match event:
                case events.StageQueueChanged(depth=depth):
                    self.stage_queue = depth
                case events.StageFinished(error=error):
                    self.staged["failed" if error else "ok"] += 1
                    if error:
                        self.stage_errors.append((time.time(), error))
                case events.CacheUsage(used=used, quota=quota):
                    self.cache_used, self.cache_quota = used, quota
                case events.CacheEvicted(files=files):
                    self.evictions += files
                case events.PacsCall(operation=operation, error=error):
                    self.pacs.heard(operation, error)
                    if operation == "C-ECHO":
                        self.echo.heard(operation, error)
                case events.KeyServerCall(url=url, operation=operation, error=error):
                    self.key_servers.setdefault(url, PeerState()).heard(operation, error)
                case events.RequestServed(status=status):
                    self.requests[f"{status // 100}xx"] += 1
                case events.FileTransferred(bytes=sent):
                    self.served_bytes += sent

    # -- readiness -------------------------------------------------------------------

    def readiness(self) -> list[Check]:
        """The catalog, the PACS and the key servers, each ok or with one line saying why not."""
        return [self._catalog_check(), self._pacs_check(), self._keyservers_check()]

    def _catalog_check(self) -> Check:
        try:
            self._catalog.namespace.lookup_guid(NO_GUID)
        except Exception as exc:  # any backend's failure means the same thing here: not reachable
            return Check("catalog", False, f"the catalog does not answer ({type(exc).__name__})")
        return Check("catalog", True, "reachable")

    def _pacs_check(self) -> Check:
        max_age = self._config.operations.pacs_echo_max_age
        if not self.echo.answered_within(max_age / 2):
            self._probe_pacs()
        answered = self.echo.answered_mono
        if answered is not None and self.echo.answered_within(max_age):
            return Check("pacs", True, f"C-ECHO answered {time.monotonic() - answered:.0f} s ago")
        return Check("pacs", False, f"no C-ECHO answered in the last {max_age:.0f} s")

    def _keyservers_check(self) -> Check:
        max_age, k = self._config.operations.pacs_echo_max_age, self._config.keystore.k
        if self._answering(max_age / 2) < k:
            self._probe_key_servers()
        answering = self._answering(max_age)
        detail = f"{answering} of {len(self.key_servers)} answering, {k} needed"
        return Check("keyservers", answering >= k, detail)

    def _answering(self, seconds: float) -> int:
        with self.lock:
            return sum(state.answered_within(seconds) for state in self.key_servers.values())

    def _probe_pacs(self) -> None:
        if not self._probe_due("_last_pacs_probe"):
            return
        try:
            with PacsClient(replace(self._config.pacs, timeout=min(PROBE_TIMEOUT, self._config.pacs.timeout))) as pacs:
                pacs.echo()  # the PacsCall event it emits is what the board records
        except MdmError:
            pass  # recorded from its event
        finally:
            self._probe_lock.release()

    def _probe_key_servers(self) -> None:
        if not self._probe_due("_last_key_probe"):
            return
        try:
            client = KeystoreClient.from_config(self._config)
            client.timeout = min(PROBE_TIMEOUT, client.timeout)
            client.ping()  # its KeyServerCall events are what the board records
        except MdmError:
            pass
        finally:
            self._probe_lock.release()

    def _probe_due(self, last: str) -> bool:
        """Take the probe lock if this probe's interval has passed (the caller releases it)."""
        if not self._probe_lock.acquire(timeout=PROBE_TIMEOUT * 2):
            return False
        now = time.monotonic()
        if now - getattr(self, last) < self._config.operations.probe_interval:
            self._probe_lock.release()
            return False
        setattr(self, last, now)
        return True
