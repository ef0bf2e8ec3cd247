"""The guard every image passes before leaving the hospital side: anonymize, then encrypt.

Registration runs it once to learn the true size and adler32 of what grid clients will
receive; staging runs it again on the image retrieved from the PACS and, because both
steps are deterministic (keyed UIDs, key- and version-derived nonces), gets the very
same bytes.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from dataclasses import dataclass

from pydicom.dataset import Dataset

from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.anonymize import ErasedValue, anonymize, to_bytes
from srm_dicom.crypto.container import encrypt_bytes
from srm_dicom.keystore import Acl, AclEntry

OWNER_READ, VO_READ, OTHERS_READ = 0o400, 0o040, 0o004


@dataclass(frozen=True)
class ProtectedImage:
    payload: bytes  # what a grid client receives: the encrypted, anonymized Part-10 file
    erased: list[ErasedValue]  # what anonymization removed, for the metadata store only
    served: Dataset  # the anonymized data set in the payload: the anonymous metadata's source

    @property
    def size(self) -> int:
        return len(self.payload)

    @property
    def adler32(self) -> str:
        return f"{zlib.adler32(self.payload):08x}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()


def key_name(guid: str, version: int) -> str:
    """The key servers' id of an entry's key: a new content version gets a new key, so a
    failed update never overwrites the shares the current version needs."""
    return f"{guid}.{version}"


def protect_image(
    ds: Dataset, secret: bytes, options: AnonymizationOptions, key: bytes, guid: str, version: int
) -> ProtectedImage:
    result = anonymize(ds, secret, options)
    payload = encrypt_bytes(key, uuid.UUID(guid).bytes, version, to_bytes(result))
    return ProtectedImage(bytes(payload), result.erased, result.dataset)


def key_acl(owner: str, vo: str, mode: int, readers: tuple[str, ...] = ()) -> Acl:
    """The key servers' ACL mirroring an entry's read rights: whoever may read the file may
    fetch the key, nobody else. The storage element's service identity is always allowed
    by the servers themselves. A per-DN refusal cannot be expressed: the servers' ACLs only
    grant, so the storage element's own refusal is what keeps such a user out."""
    # The hospital's register group reads every file at the storage element: the key must follow.
    entries = [AclEntry(rights="r", group=f"/{vo}/register"), *(AclEntry(rights="r", dn=dn) for dn in readers)]
    if mode & VO_READ:
        entries.append(AclEntry(rights="r", group=f"/{vo}"))
    if mode & OTHERS_READ:
        entries.append(AclEntry(rights="r", any=True))
    return Acl(owner=owner, entries=tuple(entries))
