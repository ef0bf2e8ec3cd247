"""Anonymization rate over the real vendor series, against pydicom's own read+write (the floor).

Run: python tests/bench/bench_anonymize.py [seconds per measure]
Files are read from memory so the disk is out of the picture; both loops parse every file
from bytes and write a Part-10 file, the anonymizer adding its walk in between.
"""

import os
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from pydicom import dcmread, dcmwrite

from srm_dicom.anonymize import anonymize, to_bytes

SECRET = b"b" * 32


def vendor_files() -> list[bytes]:
    root = Path(os.environ.get("SRM_DICOM_DATA", "/work/shared/data")) / "dicom2nifti"
    return [p.read_bytes() for p in sorted(root.glob("*/*/*/*")) if p.is_file()]


def read_write(blob: bytes) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, dcmread(BytesIO(blob)), enforce_file_format=True)
    return buffer.getvalue()


def read_anonymize_write(blob: bytes) -> bytes:
    return to_bytes(anonymize(dcmread(BytesIO(blob)), SECRET))


def rates(works: list[Callable[[bytes], bytes]], blobs: list[bytes], seconds: float) -> list[float]:
    """Slices/s of each work, run in alternating rounds so load from other users hits all alike."""
    spent = [0.0] * len(works)
    rounds = 0
    while sum(spent) < seconds * len(works):
        for index, work in enumerate(works):
            start = time.perf_counter()
            for blob in blobs:
                work(blob)
            spent[index] += time.perf_counter() - start
        rounds += 1
    return [rounds * len(blobs) / s for s in spent]


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    blobs = vendor_files()
    megabytes = sum(map(len, blobs)) / 1e6
    print(f"{len(blobs)} vendor slices, {megabytes:.1f} MB, {seconds:.0f} s per measure")
    floor, ours = rates([read_write, read_anonymize_write], blobs, seconds)
    print(f"pydicom read+write (floor)  {floor:8.0f} slices/s")
    print(f"read+anonymize+write        {ours:8.0f} slices/s")
    print(f"ratio anonymize/floor       {ours / floor:8.2f}")


if __name__ == "__main__":
    main()
