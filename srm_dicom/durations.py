"""Durations as grid clients write them."""

from __future__ import annotations

import re

from srm_dicom.errors import InvalidInput

# At most 15 digits a field: a hostile duration of thousands of digits is refused, not computed.
_DURATION = re.compile(r"P(?:([0-9]{1,15})D)?(?:T(?:([0-9]{1,15})H)?(?:([0-9]{1,15})M)?(?:([0-9]{1,15})S)?)?")


def parse_duration(value: object) -> int:
    """Seconds, or an ISO 8601 duration like PT1H / P1D: what gfal2 sends as diskLifetime and
    as a macaroon's validity. Written here: the standard library parses no ISO 8601 durations."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isdigit() and len(value) <= 15:
        return int(value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match and any(match.groups()):
            days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
            return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    raise InvalidInput(f"a duration must be seconds or an ISO 8601 duration, not {str(value)[:80]!r}")
