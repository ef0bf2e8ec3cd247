"""``mdm demo`` under tracemalloc, for the load run's ``--tracemalloc``: each SIGUSR1 writes a
snapshot of the Python heap (``snapshot-N.pickle`` in the folder given first), so that the
growth of RSS under load can be told apart: Python objects that pile up (a leak, named by
the lines that allocated them) or memory that plateaus (caches, arenas, OpenSSL, SQLite).
SIGUSR2 asks glibc to give back the free memory it keeps (``malloc_trim``): what RSS then
loses was free, not leaked.

    python tests/load/traced_demo.py SNAPSHOT_DIR --workdir DEMO_DIR
"""

from __future__ import annotations

import ctypes
import signal
import sys
import tracemalloc
from pathlib import Path

from srm_dicom.cli import main

FRAMES = 8


def run(snapshots: Path, argv: list[str]) -> int:
    snapshots.mkdir(parents=True, exist_ok=True)
    taken = 0

    def dump(signum: int, frame: object) -> None:
        nonlocal taken
        taken += 1
        tracemalloc.take_snapshot().dump(str(snapshots / f"snapshot-{taken}.pickle"))

    def trim(signum: int, frame: object) -> None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)

    tracemalloc.start(FRAMES)
    signal.signal(signal.SIGUSR1, dump)
    signal.signal(signal.SIGUSR2, trim)
    return main(["demo", *argv])


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
