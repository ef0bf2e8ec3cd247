"""Errors a person sees as one line: the CLI prints ``str(error)`` and exits with ``exit_code``."""


class MdmError(Exception):
    """Base of every error meant for a person, never shown with a traceback."""

    exit_code = 1


class ConfigError(MdmError):
    exit_code = 2


class NotFound(MdmError):
    exit_code = 3


class Forbidden(MdmError):
    """The caller is known but may not do this; the message says what was refused."""

    exit_code = 5


class InvalidInput(MdmError):
    exit_code = 2


class PacsError(MdmError):
    """The PACS refused, aborted, timed out or is down; the message names the PACS and the status."""

    exit_code = 4
