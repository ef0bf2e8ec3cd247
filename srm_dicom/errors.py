"""Errors a person sees as one line: the CLI prints ``str(error)`` and exits with ``exit_code``;
a program gets ``http_status`` with an RFC 7807 body (``srm_dicom.server.problems``)."""

import sqlite3


class MdmError(Exception):
    """Base of every error meant for a person, never shown with a traceback."""

    exit_code = 1
    http_status = 400


class ConfigError(MdmError):
    exit_code = 2
    http_status = 500


class NotFound(MdmError):
    exit_code = 3
    http_status = 404


class InvalidInput(MdmError):
    exit_code = 2
    http_status = 400


class TooLarge(InvalidInput):
    """A request body, a list or a header beyond the limits the server sets."""

    http_status = 413


class Refused(MdmError):
    """The caller is known but may not do this (a 403)."""

    exit_code = 5
    http_status = 403
    # A bearer credential's refusal says so (RFC 6750 insufficient_scope); see server/app.py.
    http_headers: tuple[tuple[str, str], ...] = ()


class CatalogUnavailable(MdmError):
    """The catalog database is down or restarting: a retry later may succeed (HTTP 503)."""

    exit_code = 7
    http_status = 503
    http_headers = (("Retry-After", "5"),)


# SQLite's OperationalError texts for a database that cannot be used now, not for a bug.
_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open database file", "disk I/O error", "database or disk is full",
                       "readonly database")


def catalog_unavailable(error: BaseException) -> CatalogUnavailable | None:
    """A backend's own error for a database that cannot be used now (SQLite's "database is
    locked" once its busy timeout ran out, an unreadable file, a full disk) as the one clear
    CatalogUnavailable: exit code 7, HTTP 503 with Retry-After. None for any other error, a
    bug that keeps its traceback. (The PostgreSQL plugin raises CatalogUnavailable itself.)"""
    if not isinstance(error, sqlite3.OperationalError):
        return None
    text = str(error)
    if "locked" in text or "busy" in text:
        return CatalogUnavailable(f"the catalog database is locked by another process (SQLite: {text});"
                                  " try again when it has finished")
    if any(known in text for known in _SQLITE_UNAVAILABLE):
        return CatalogUnavailable(f"the catalog database cannot be used (SQLite: {text})")
    return None


class PacsError(MdmError):
    """The PACS refused, aborted, timed out or is down; the message names the PACS and the status."""

    exit_code = 4
    http_status = 502
