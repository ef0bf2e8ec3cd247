"""Volume assembly time against dcm2niix converting the same series, in the same run.

Run: python tests/bench/bench_volume.py [slices] [size] [rounds]
Both start from the same Part-10 files on disk and end with an uncompressed NIfTI-1 file
on disk: ours reads the files with pydicom, assembles and writes; dcm2niix (-z n) does its
own reading, sorting and writing. Rounds alternate so load from other users hits both.
Also runs the vendor series once each, where dcm2niix's process start-up dominates.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom import dcmread

from srm_dicom.synthetic import make_series
from srm_dicom.volume import assemble


def ours(series: Path, out: Path) -> float:
    start = time.perf_counter()
    datasets = [dcmread(path) for path in sorted(series.iterdir())]
    (out / "ours.nii").write_bytes(assemble(datasets, "nifti"))
    return time.perf_counter() - start


def dcm2niix(program: str, series: Path, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([program, "-z", "n", "-b", "n", "-f", "d2n", "-o", str(out), str(series)],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def compare(program: str, series: Path, rounds: int, label: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        times: dict[str, list[float]] = {"ours": [], "dcm2niix": []}
        for _ in range(rounds):
            times["ours"].append(ours(series, out))
            times["dcm2niix"].append(dcm2niix(program, series, out))
            for path in out.iterdir():
                path.unlink()
        best = {name: min(values) for name, values in times.items()}
        print(f"{label:42s} ours {best['ours'] * 1e3:8.1f} ms  dcm2niix {best['dcm2niix'] * 1e3:8.1f} ms"
              f"  ratio ours/dcm2niix {best['ours'] / best['dcm2niix']:5.2f}")


def main() -> None:
    slices = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    program = shutil.which("dcm2niix")
    if program is None:
        sys.exit("dcm2niix is not installed (Debian package dcm2niix)")
    with tempfile.TemporaryDirectory() as scratch:
        series = Path(scratch)
        for index, ds in enumerate(make_series(slices=slices, size=size, seed="bench volume")):
            ds.save_as(series / f"{index:04d}.dcm", enforce_file_format=True)
        compare(program, series, rounds, f"synthetic CT {slices}×{size}×{size} (best of {rounds})")
    root = Path(os.environ.get("SRM_DICOM_DATA", "/work/shared/data")) / "dicom2nifti"
    for name in ("ge/anatomical/001", "philips/anatomical/001", "generic/compressed_j2k/001", "ge/fmri/001"):
        if (root / name).is_dir():
            compare(program, root / name, rounds, name)


if __name__ == "__main__":
    main()
