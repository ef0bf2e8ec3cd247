"""Prometheus metrics from srm-dicom's events (entry point ``srm_dicom.metrics: prometheus``).

Optional: installed with ``pip install 'srm-dicom[metrics]'`` (prometheus_client). Each
instance has its own registry, so several storage elements in one process (tests) never
count each other twice. Labels stay few and bounded: methods outside HTTP's usual ones
count as "other", key servers are the configured URLs, never anything a caller chose.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from srm_dicom import events

METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PROPFIND", "POST", "PUT", "DELETE", "PATCH", "MKCOL", "MOVE",
                     "COPY", "LOCK", "UNLOCK", "PROPPATCH"})
PACS_OPERATIONS = ("C-ECHO", "C-STORE", "C-FIND", "C-GET", "C-MOVE")
# PACS retrievals of a series and stagings of volumes take seconds; a key share milliseconds.
SLOW = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class PrometheusMetrics:
    """Counts events from creation until ``close``; ``exposition`` is the /metrics body."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, key_servers: Iterable[str] = ()) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("mdm_http_requests", "HTTP requests answered, by method and status",
                                ["method", "status"], registry=registry)
        self.request_seconds = Histogram("mdm_http_request_duration_seconds", "Time to answer a request, body sent",
                                         ["method"], buckets=SLOW, registry=registry)
        self.response_bytes = Counter("mdm_http_response_bytes", "Bytes of response bodies sent", registry=registry)
        self.served_bytes = Counter("mdm_served_bytes", "Bytes of files sent to grid clients", registry=registry)
        self.transfers = Counter("mdm_transfers", "Files sent to grid clients, by whether they waited for staging",
                                 ["staged"], registry=registry)
        self.stage_seconds = Histogram("mdm_stage_duration_seconds", "Time to stage one file from the PACS",
                                       ["outcome"], buckets=SLOW, registry=registry)
        self.stage_queue = Gauge("mdm_stage_queue_depth", "Files being staged or waiting for a worker",
                                 registry=registry)
        self.pacs_seconds = Histogram("mdm_pacs_call_duration_seconds", "Time of a DICOM call to the PACS",
                                      ["operation"], buckets=SLOW, registry=registry)
        self.pacs_failures = Counter("mdm_pacs_failures", "DICOM calls to the PACS that failed", ["operation"],
                                     registry=registry)
        self.key_seconds = Histogram("mdm_keyserver_call_duration_seconds", "Time of a request to a key server",
                                     ["server"], buckets=FAST, registry=registry)
        self.key_failures = Counter("mdm_keyserver_failures", "Key server requests that failed (no answer, 5xx)",
                                    ["server"], registry=registry)
        self.cache_used = Gauge("mdm_cache_used_bytes", "Bytes in the disk cache", registry=registry)
        self.cache_quota = Gauge("mdm_cache_quota_bytes", "The disk cache's quota", registry=registry)
        self.evictions = Counter("mdm_cache_evictions", "Files evicted from the disk cache", registry=registry)
        self.evicted_bytes = Counter("mdm_cache_evicted_bytes", "Bytes evicted from the disk cache",
                                     registry=registry)
        for operation in PACS_OPERATIONS:  # every series present from the start, at 0
            self.pacs_failures.labels(operation)
        for url in key_servers:
            self.key_failures.labels(url.rstrip("/"))
        self._unsubscribe = events.subscribe(self._on_event)

    def close(self) -> None:
        self._unsubscribe()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _on_event(self, event: object) -> None:
        match event:
            case events.RequestServed(method=method, status=status, bytes=sent, seconds=seconds):
                method = method if method in METHODS else "other"
                self.requests.labels(method, str(status)).inc()
                self.request_seconds.labels(method).observe(seconds)
                self.response_bytes.inc(sent)
            case events.FileTransferred(bytes=sent, staged=staged):
                self.served_bytes.inc(sent)
                self.transfers.labels("yes" if staged else "no").inc()
            case events.StageQueueChanged(depth=depth):
                self.stage_queue.set(depth)
            case events.StageFinished(seconds=seconds, error=error):
                self.stage_seconds.labels("failed" if error else "ok").observe(seconds)
            case events.PacsCall(operation=operation, seconds=seconds, error=error):
                self.pacs_seconds.labels(operation).observe(seconds)
                if error:
                    self.pacs_failures.labels(operation).inc()
            case events.KeyServerCall(url=url, seconds=seconds, error=error):
                self.key_seconds.labels(url).observe(seconds)
                if error:
                    self.key_failures.labels(url).inc()
            case events.CacheUsage(used=used, quota=quota):
                self.cache_used.set(used)
                self.cache_quota.set(quota)
            case events.CacheEvicted(files=files, bytes=freed):
                self.evictions.inc(files)
                self.evicted_bytes.inc(freed)
