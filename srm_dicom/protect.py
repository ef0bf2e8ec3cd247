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


def protect_image(
    ds: Dataset, secret: bytes, options: AnonymizationOptions, key: bytes, guid: str, version: int
) -> ProtectedImage:
    result = anonymize(ds, secret, options)
    payload = encrypt_bytes(key, uuid.UUID(guid).bytes, version, to_bytes(result))
    return ProtectedImage(bytes(payload), result.erased, result.dataset)
