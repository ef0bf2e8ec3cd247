"""The sysadmin's endpoints: /healthz, /readyz, /metrics and the /status page.

/healthz (the process answers) and /readyz (catalog, PACS, key servers) answer anyone over
the same TLS port: load balancers and orchestrators probe without credentials, and the
answers name only the failing part, never a host or a file. /metrics and /status show the
site's traffic, so only operators read them: certificate users in ``[operations] groups``,
the service identity, or callers from ``[operations] networks`` (README, Operations).
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from http import HTTPStatus
from importlib.metadata import entry_points
from typing import Any, Protocol

from srm_dicom.access import may_operate
from srm_dicom.config import Config
from srm_dicom.health import HealthBoard, PeerState
from srm_dicom.identity import Identity
from srm_dicom.server.problems import StartResponse, problem, respond_json

log = logging.getLogger(__name__)

HEALTHZ, READYZ, METRICS, STATUS = "/healthz", "/readyz", "/metrics", "/status"
PUBLIC = (HEALTHZ, READYZ)
ROUTES = (HEALTHZ, READYZ, METRICS, STATUS)


class Metrics(Protocol):
    content_type: str

    def exposition(self) -> bytes: ...

    def close(self) -> None: ...


def load_metrics(config: Config) -> Metrics | None:
    """The metrics plugin (entry point group ``srm_dicom.metrics``), if on and installed."""
    if not config.operations.metrics:
        return None
    for point in entry_points(group="srm_dicom.metrics"):
        try:
            factory = point.load()
        except ImportError as exc:
            log.warning("metrics off: %s (pip install 'srm-dicom[metrics]')", exc)
            return None
        metrics: Metrics = factory(config.keystore.urls)
        return metrics
    log.warning("metrics off: no metrics plugin installed (pip install 'srm-dicom[metrics]')")
    return None


class OperationsApi:
    def __init__(self, config: Config, board: HealthBoard) -> None:
        self._config = config
        self._board = board
        self._networks = [ipaddress.ip_network(n) for n in config.operations.networks]
        self.metrics = load_metrics(config)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    @staticmethod
    def handles(path: str) -> bool:
        return path in ROUTES

    def __call__(self, environ: dict, start_response: StartResponse, identity: Identity | None) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        if method not in ("GET", "HEAD"):
            return problem(start_response, HTTPStatus.METHOD_NOT_ALLOWED, f"{method} refused on {path}",
                           [("Allow", "GET, HEAD")])
        if path not in PUBLIC and not self._operator(environ, identity):
            return problem(start_response, HTTPStatus.FORBIDDEN,
                           f"{path} is for operators: a certificate in one of the groups {self._groups()}")
        if path == HEALTHZ:
            return respond_json(start_response, HTTPStatus.OK, {"status": "alive"})
        if path == READYZ:
            return self._readyz(start_response)
        if path == METRICS:
            return self._metrics(start_response)
        return self._status(start_response)

    def _groups(self) -> str:
        return ", ".join(self._config.operations.groups) or "(none configured)"

    def _operator(self, environ: dict, identity: Identity | None) -> bool:
        if identity is not None and may_operate(identity, self._config.operations.groups):
            return True
        try:
            address = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def _readyz(self, start_response: StartResponse) -> list[bytes]:
        checks = self._board.readiness()
        summary = {c.name: c.detail for c in checks}
        failing = [c for c in checks if not c.ok]
        if not failing:
            return respond_json(start_response, HTTPStatus.OK, {"status": "ready", "checks": summary})
        detail = "not ready: " + "; ".join(f"{c.name}: {c.detail}" for c in failing)
        status = HTTPStatus.SERVICE_UNAVAILABLE
        body = {"type": "about:blank", "status": status.value, "title": status.phrase, "detail": detail,
                "failing": [c.name for c in failing], "checks": summary}
        data = json.dumps(body).encode()
        start_response(f"{status.value} {status.phrase}", [
            ("Content-Type", "application/problem+json"), ("Content-Length", str(len(data))),
            ("Retry-After", str(int(self._config.operations.probe_interval)))])
        return [data]

    def _metrics(self, start_response: StartResponse) -> list[bytes]:
        if self.metrics is None:
            return problem(start_response, HTTPStatus.NOT_FOUND,
                           "metrics are off: set [operations] metrics = true and pip install 'srm-dicom[metrics]'")
        body = self.metrics.exposition()
        start_response("200 OK", [("Content-Type", self.metrics.content_type), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]

    def _status(self, start_response: StartResponse) -> list[bytes]:
        body = status_page(self._config, self._board).encode()
        start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]


def _when(wall: float | None) -> str:
    if wall is None:
        return "never"
    ago = max(0, int(time.time() - wall))
    return f"{datetime.fromtimestamp(wall, UTC):%Y-%m-%d %H:%M:%S} UTC ({ago} s ago)"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def _rows(rows: Iterable[tuple[Any, ...]]) -> str:
    return "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)


def _peer_rows(name: str, state: PeerState) -> list[tuple[str, str, str, str]]:
    calls = ", ".join(f"{op} {n}" for op, n in sorted(state.calls.items())) or "none"
    failures = ", ".join(f"{op} {n}" for op, n in sorted(state.failures.items())) or "none"
    return [(name, _when(state.answered_at), state.error or "", f"calls: {calls}; failures: {failures}")]


STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin-bottom:1.5em}
td,th{border:1px solid #bbb;padding:.3em .7em;text-align:left}th{background:#eee}.ok{color:#070}.bad{color:#b00}"""


def status_page(config: Config, board: HealthBoard) -> str:
    """The /status page: readiness, stage queue, cache, PACS, key servers, requests."""
    checks = board.readiness()
    with board.lock:
        ready = "".join(
            f'<tr><td>{c.name}</td><td class="{"ok" if c.ok else "bad"}">{"ok" if c.ok else "failing"}</td>'
            f"<td>{html.escape(c.detail)}</td></tr>" for c in checks)
        used, quota = board.cache_used, board.cache_quota
        stage = _rows([("queue depth", board.stage_queue), ("staged", board.staged["ok"]),
                       ("failed", board.staged["failed"])]
                      + [("last failure", f"{_when(at)}: {reason}") for at, reason in board.stage_errors])
        cache = _rows([("used", f"{_size(used)} of {_size(quota)} ({100 * used / quota if quota else 0:.1f} %)"),
                       ("evictions", board.evictions)])
        pacs = _rows(_peer_rows(f"{config.pacs.aet}@{config.pacs.host}:{config.pacs.port} (C-ECHO)", board.echo)
                     + _peer_rows("all calls", board.pacs))
        keys = _rows(row for url, state in sorted(board.key_servers.items()) for row in _peer_rows(url, state))
        requests = _rows([(cls, n) for cls, n in sorted(board.requests.items())]
                         + [("file bytes sent", _size(board.served_bytes))])
    title = f"srm-dicom status: {html.escape(config.server.sitename)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="15">
<title>{title}</title><style>{STYLE}</style></head><body>
<h1>{title}</h1><p>Up since {_when(board.started)}; this page reloads every 15 s.</p>
<h2>Readiness</h2><table id="readiness"><tr><th>part</th><th>state</th><th>detail</th></tr>{ready}</table>
<h2>Stage queue</h2><table id="stage">{stage}</table>
<h2>Cache</h2><table id="cache">{cache}</table>
<h2>PACS</h2><table id="pacs"><tr><th>peer</th><th>last answer</th><th>last error</th><th>calls</th></tr>{pacs}</table>
<h2>Key servers</h2><table id="keyservers"><tr><th>server</th><th>last answer</th><th>last error</th><th>calls</th></tr>
{keys}</table>
<h2>Requests</h2><table id="requests">{requests}</table>
</body></html>
"""
