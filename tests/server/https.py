"""A small HTTPS client for the server tests: stdlib http.client with a demo user's certificate."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def request(url: str, pki: Path, user: str | None, method: str = "GET", path: str = "/", body: bytes | None = None,
            headers: dict[str, str] | None = None, proxy: Path | None = None) -> Answer:
    """One request as demo user ``user`` (None: no client certificate), or with the ``proxy``
    file (proxy certificate, its key, the user's certificate: what voms-proxy-fake writes)."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if proxy is not None:
        context.load_cert_chain(proxy)
    elif user:
        folder = pki / ("service" if user == "service" else f"users/{user}")
        context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    parts = urlsplit(url)
    connection = http.client.HTTPSConnection(parts.hostname, parts.port, context=context, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()
