"""Errors a person sees as one line: the CLI prints ``str(error)`` and exits with ``exit_code``."""


class MdmError(Exception):
    """Base of every error meant for a person, never shown with a traceback."""

    exit_code = 1


class ConfigError(MdmError):
    exit_code = 2


class NotFound(MdmError):
    exit_code = 3


class InvalidInput(MdmError):
    exit_code = 2


class CatalogUnavailable(MdmError):
    """The catalog database is down or restarting: a retry later may succeed (HTTP 503)."""

    exit_code = 7
    retry_after = 5


class PacsError(MdmError):
    """The PACS refused, aborted, timed out or is down; the message names the PACS and the status."""

    exit_code = 4
