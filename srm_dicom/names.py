"""Grid names of images: LFNs, PFNs and the CLI's "study, series, sop" forms.

An LFN is ``/grid/<vo>/mdm/<Study>/<Series>/<SOP>`` for a slice and ``.../<Series>/3D``
for the series volume. ``S,SE,SOP``, ``S SE SOP`` and ``/S/SE/SOP`` all name the same
entry; ``3D`` may stand in place of the SOP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from srm_dicom.errors import InvalidInput

VOLUME = "3D"
# Beside a series' volume (README "Volumes"): its BIDS sidecar and, for diffusion series,
# its b-values and vectors in FSL's format, named as dcm2niix names them.
SIDECARS = (f"{VOLUME}.json", f"{VOLUME}.bval", f"{VOLUME}.bvec")
# The volume gzip-compressed, listed only with [volume] gzip = true (README "Volumes").
COMPRESSED_VOLUME = f"{VOLUME}.nii.gz"
SERIES_FILES = (VOLUME, *SIDECARS, COMPRESSED_VOLUME)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(text: str) -> bool:
    return len(text) <= 64 and bool(_UID.match(text))


def vo_root(vo: str) -> str:
    return f"/grid/{vo}/mdm"


@dataclass(frozen=True)
class UidTriple:
    """Study, series and SOP (or ``3D``) UIDs, as given by a user or read from a header."""

    study: str
    series: str
    sop: str

    @property
    def is_volume(self) -> bool:
        """The series volume or one of its sidecars: a file of the series, not of an image."""
        return self.sop in SERIES_FILES

    def lfn(self, vo: str) -> str:
        return f"{vo_root(vo)}/{self.study}/{self.series}/{self.sop}"


def parse_sop_spec(parts: list[str] | str) -> UidTriple:
    """Parse ``S,SE,SOP``, ``S SE SOP`` (one or three arguments) or ``/S/SE/SOP``."""
    text = " ".join(parts) if isinstance(parts, list) else parts
    fields = [f for f in re.split(r"[,\s/]+", text.strip()) if f]
    if len(fields) != 3:
        raise InvalidInput(
            f"'{text}' is not a study, series, sop triple (use S,SE,SOP or /S/SE/SOP, "
            "with 3D in place of the SOP for a volume)"
        )
    study, series, sop = fields
    for uid in (study, series) + (() if sop in SERIES_FILES else (sop,)):
        if not is_uid(uid):
            raise InvalidInput(f"'{uid}' is not a DICOM UID (digits and dots, at most 64)")
    return UidTriple(study, series, sop)


def parse_lfn(lfn: str) -> tuple[str, UidTriple | None]:
    """Split an LFN into its VO and, when it names an image or volume, its UID triple."""
    parts = [p for p in lfn.split("/") if p]
    if len(parts) < 3 or parts[0] != "grid" or parts[2] != "mdm":
        raise InvalidInput(f"'{lfn}' is not an LFN of the form /grid/<vo>/mdm/...")
    if len(parts) == 6:
        return parts[1], parse_sop_spec(parts[3:])
    if len(parts) > 6:
        raise InvalidInput(f"'{lfn}' has too many components for an LFN")
    return parts[1], None


def normalize_lfn(lfn: str) -> str:
    return "/" + "/".join(p for p in lfn.split("/") if p)


def pfn(aet: str, host: str, port: int, study: str, series: str, sop: str | None = None) -> str:
    """Where the bytes really are: a DICOM address, resolved by a DICOM transaction."""
    tail = f"/{study}/{series}" + (f"/{sop}" if sop else "")
    return f"dicom://{aet}@{host}:{port}{tail}"


@dataclass(frozen=True)
class Pfn:
    """A parsed PFN: the PACS to ask and the PACS's original UIDs (no SOP for a series)."""

    aet: str
    host: str
    port: int
    study: str
    series: str
    sop: str | None


_PFN = re.compile(r"^dicom://([^@/]{1,16})@([^:/]+):([0-9]{1,5})/([0-9.]+)/([0-9.]+)(?:/([0-9.]+))?$")


def parse_pfn(text: str) -> Pfn:
    """The inverse of ``pfn``; a malformed PFN is an error in the catalog, named without its UIDs."""
    found = _PFN.match(text)
    if not found or not all(is_uid(u) for u in found.groups()[3:] if u is not None):
        raise InvalidInput("a catalog PFN is not of the form dicom://AET@host:port/Study/Series[/SOP]")
    aet, host, port, study, series, sop = found.groups()
    return Pfn(aet, host, int(port), study, series, sop)
