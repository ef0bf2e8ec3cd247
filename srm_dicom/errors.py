"""Errors a person sees as one line: the CLI prints ``str(error)`` and exits with ``exit_code``;
a program gets ``http_status`` with an RFC 7807 body (``srm_dicom.server.problems``)."""


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


class CatalogUnavailable(MdmError):
    """The catalog database is down or restarting: a retry later may succeed (HTTP 503)."""

    exit_code = 7
    http_status = 503
    http_headers = (("Retry-After", "5"),)


class PacsError(MdmError):
    """The PACS refused, aborted, timed out or is down; the message names the PACS and the status."""

    exit_code = 4
    http_status = 502
