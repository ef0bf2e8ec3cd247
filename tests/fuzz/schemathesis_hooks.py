"""Schemathesis hooks of the HTTP fuzz run (``SCHEMATHESIS_HOOKS``, set by ``http_fuzz.py``).

A macaroon request's body is JSON sent as ``application/macaroon-request`` (dCache's media
type, which gfal2 sends): schemathesis knows no serializer for that name, so it reuses its
JSON one.
"""

import schemathesis

schemathesis.serializer.alias("application/macaroon-request", "application/json")
