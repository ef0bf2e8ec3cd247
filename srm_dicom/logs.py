"""Logs for people or for machines (``[log] format``), and the request and billing lines.

In "json" every record is one JSON object a line, with its fields at the top level, as log
collectors (journald's JSON export, Loki, Elasticsearch) index them. The formatter is a few
lines over the standard library's ``logging``: the records' own fields are all it adds, not
worth a dependency.

``srm_dicom.access`` gets a line per request (request id, identity kind, status, bytes,
duration); ``srm_dicom.billing`` a record per file sent, as dCache's billing does (name, DN,
client, bytes, whether it was staged). Neither carries patient data: files are named by LFN
(de-identified UIDs) or, where a site keeps the PACS's UIDs in its names, by GUID; query
strings, where searches put patient names, are never logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from srm_dicom import events

ACCESS, BILLING = "srm_dicom.access", "srm_dicom.billing"
FIELDS = "mdm_fields"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, FIELDS, {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(format: str, verbosity: int = 0) -> None:
    """The root handler on stderr in ``format``; ``verbosity`` 1 shows info, 2 debug."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING - 10 * min(verbosity, 2))


def log_requests() -> Callable[[], None]:
    """Write the access and billing lines from the events (always, whatever the verbosity:
    they are the service's record); returns the function that stops them."""
    access, billing = logging.getLogger(ACCESS), logging.getLogger(BILLING)
    access.setLevel(logging.INFO)
    billing.setLevel(logging.INFO)

    def on_event(event: object) -> None:
        if isinstance(event, events.RequestServed):
            access.info("%s %s %d %d bytes %.3f s by %s", event.request_id, event.method, event.status,
                        event.bytes, event.seconds, event.identity_kind,
                        extra={FIELDS: {"record": "request", "duration": round(event.seconds, 6),
                                        **_fields(event, exclude=("seconds",))}})
        elif isinstance(event, events.FileTransferred):
            billing.info("%s transfer %s %d/%d bytes to %s %s%s", event.request_id, event.name, event.bytes,
                         event.size, event.subject, event.client, " (staged)" if event.staged else "",
                         extra={FIELDS: {"record": "transfer", "duration": round(event.seconds, 6),
                                         **_fields(event, exclude=("seconds",))}})

    return events.subscribe(on_event)


def _fields(event: object, exclude: tuple[str, ...]) -> dict[str, object]:
    return {k: v for k, v in dataclasses.asdict(event).items() if k not in exclude}  # type: ignore[call-overload]
