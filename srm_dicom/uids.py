"""Keyed, irreversible identifiers derived from PACS identifiers.

The de-identified UID of an original UID is what both the catalog's names (LFNs) and the
anonymizer write into served files, so a name never reveals more than the file it names.
A keyed hash (HMAC with the site secret) is used rather than a plain hash because UIDs
often embed guessable parts (dates, device serials): an unsalted hash could be inverted
by enumeration.
"""

import hashlib
import hmac

_UUID_ROOT = "2.25."


def _digest(secret: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()


def deidentify_uid(secret: bytes, uid: str) -> str:
    """Map a UID into the 2.25 (UUID-derived) root: same input, same output; a series stays a series."""
    return _UUID_ROOT + str(int.from_bytes(_digest(secret, "uid", uid.strip())[:16], "big"))


def patient_key(secret: bytes, patient_id: str, issuer: str = "") -> str:
    """The Patient table's index: the paper's irreversible patient key, keyed so it cannot be enumerated."""
    return _digest(secret, "patient", f"{issuer}\0{patient_id}").hex()[:32]
