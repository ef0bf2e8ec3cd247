"""PS3.15 Annex E de-identification: the Basic Application Level Confidentiality Profile.

Driven by the standard's own table (srm_dicom/data/confidentiality_profile_attributes.json,
one entry per attribute with the Basic Profile action and each option's action) so a new
edition of the standard is a data update, not a code change. No library applies that table
with the properties this storage element needs (keyed UIDs shared with the catalog's
names, byte-identical pixel data, deterministic output, a record of what was erased), so
the walk over the dataset is written here.

Choices the standard leaves to the implementer:

- Combined actions (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) exist because the right action depends on
  the attribute's type in the IOD, which a generic anonymizer does not know. We always take
  the last, least destructive alternative (X/Z -> Z, X/D, Z/D, X/Z/D -> D, X/Z/U* -> U*):
  it still removes the value, and keeps the attribute present, so a type 1 or 2 attribute
  stays valid in every IOD.
- Except for sequences: an empty sequence is valid only where the sequence is type 2, and
  the sequences the table gives a choice with X (Referenced Study, Institution Code,
  Operator Identification, Referenced Performed Procedure Step) are type 3 wherever the
  image IODs use them, so X/Z and X/Z/D remove them. Acquisition Context Sequence is the
  exception: type 2 in the Acquisition Context module (PS3.3 C.7.6.14), it stays, empty.
- D on a sequence gives an empty sequence: a "dummy" item would mean nothing, and
  recursing would keep unlisted attributes such as a code meaning naming the hospital.
- U* (and U on a sequence) keeps the sequence and applies the profile to its items, which
  replaces the instance UIDs they reference with the same keyed hashes as the instances.
- C (clean) has no meaning-preserving implementation here: text is replaced like D; dates
  are shifted when the longitudinal option is on; times are kept (a whole-day shift does
  not change the time of day).
- D on Patient ID writes the keyed patient key (srm_dicom.uids.patient_key), the same
  irreversible pseudonym that indexes the Patient metadata table, so the images of one
  patient stay together without revealing the ID.
- Attributes the table does not list are removed unless they are on the safe list
  (srm_dicom/data/safe_attributes.toml: image pixel, plane, acquisition and modality
  parameters, each group with its source and reason). The Basic Profile itself keeps what
  it does not list; an allow-list does not depend on the table naming every place a
  vendor or a person may type a name (overlay descriptions and labels, curves, private
  tags, UN elements, text in content sequences). This holds at every sequence depth.
- Private elements are kept only with retain_safe_private, and only those whose private
  creator, group and element offset are on the safe-private dictionary
  (srm_dicom/data/safe_private.toml, from PS3.15 Table E.3.10-1); an element without its
  creator goes.
- clean_descriptors keeps a descriptor (study, series and protocol descriptions, comments)
  after removing from it every word of the values the profile removes from the same data
  set (names, IDs, addresses, dates): the case this option exists for is a name typed
  into a protocol name. Off by default, descriptors are replaced by a dummy.
"""

import hashlib
import hmac
import json
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from datetime import date, timedelta
from functools import lru_cache
from importlib.resources import files

from pydicom.datadict import dictionary_VR, get_entry, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID_dictionary,
)

from srm_dicom import __version__
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.encode import part10
from srm_dicom.errors import InvalidInput
from srm_dicom.uids import deidentify_uid, patient_key

# Fixed so that output bytes never depend on the host: 2.25 form of uuid5(NAMESPACE_URL,
# "https://srm-dicom/implementation").
IMPLEMENTATION_CLASS_UID = "2.25.213516390658331094463393722612738307766"
IMPLEMENTATION_VERSION_NAME = f"SRM_DICOM_{__version__}"[:16]

_TABLE_FILE = "confidentiality_profile_attributes.json"

# PS3.16 CID 7050 "De-identification Method" codes.
_BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")

_SAFE_ATTRIBUTES_FILE = "safe_attributes.toml"
_SAFE_PRIVATE_FILE = "safe_private.toml"
PROFILE_NAME = "PS3.15 E.1-1 Basic Application Level Confidentiality Profile"

DUMMY_TEXT = "ANONYMIZED"
_DUMMY: dict[str, object] = {
    "AS": "000Y",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "DS": "0",
    "IS": "0",
    "UR": "urn:anonymized",
    "FL": 0.0,
    "FD": 0.0,
    "SS": 0,
    "US": 0,
    "SL": 0,
    "UL": 0,
    "SV": 0,
    "UV": 0,
}
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_PATIENT_ID = 0x00100020
_ISSUER_OF_PATIENT_ID = 0x00100021
_SOP_CLASS_UID = 0x00080016
_SOP_INSTANCE_UID = 0x00080018
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ACQUISITION_CONTEXT = 0x00400555


@dataclass(frozen=True)
class ErasedValue:
    """One original value the anonymizer removed or replaced (PHI: stored for `all` rights only)."""

    path: str
    keyword: str
    value: str


@dataclass
class AnonymizationResult:
    dataset: Dataset
    erased: list[ErasedValue] = field(default_factory=list)


@dataclass(frozen=True)
class _Rules:
    """The table resolved for one set of options: one action letter per attribute it lists,
    the attributes the safe list keeps, and the private elements that may stay."""

    exact: dict[int, str]
    safe: frozenset[int]
    private: dict[tuple[str, int, int], str]  # (creator, group, offset) -> VR; empty: none kept


def _resolve(entry: dict[str, str], columns: list[str]) -> str:
    """Options win over the Basic Profile; among options, K (keep) wins over C (clean)."""
    chosen = {entry[c] for c in columns if c in entry}
    if "K" in chosen:
        return "K"
    if "C" in chosen:
        return "C"
    return entry["basicProfile"].split("/")[-1].rstrip("*")


def _is_sequence(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _data(name: str) -> str:
    return (files("srm_dicom") / "data" / name).read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def profile_table() -> list[dict[str, str]]:
    """The PS3.15 Annex E table as packaged (srm_dicom/data/README.md)."""
    return json.loads(_data(_TABLE_FILE))


@lru_cache(maxsize=1)
def safe_attributes() -> dict[int, str]:
    """Tag -> keyword of the safe standard attributes (srm_dicom/data/safe_attributes.toml)."""
    found: dict[int, str] = {}
    for group in tomllib.loads(_data(_SAFE_ATTRIBUTES_FILE))["group"]:
        for keyword in group["attributes"]:
            tag = tag_for_keyword(keyword)
            if tag is None:
                raise ValueError(f"{_SAFE_ATTRIBUTES_FILE}: unknown keyword {keyword}")
            found[tag] = keyword
    return found


@lru_cache(maxsize=1)
def safe_private() -> dict[tuple[str, int, int], str]:
    """(creator, group, element offset) -> VR of the safe private attributes."""
    entries = tomllib.loads(_data(_SAFE_PRIVATE_FILE))["attribute"]
    return {(e["creator"], e["group"], e["offset"]): e["vr"] for e in entries}


@lru_cache(maxsize=1)
def rules_version() -> str:
    """What the output depends on besides the code and the options: the table and both lists,
    as one short digest recorded with every entry and written into every served file."""
    digest = hashlib.sha256()
    for name in (_TABLE_FILE, _SAFE_ATTRIBUTES_FILE, _SAFE_PRIVATE_FILE):
        digest.update(_data(name).encode())
    return digest.hexdigest()[:12]


@lru_cache(maxsize=16)
def _rules(options: AnonymizationOptions) -> _Rules:
    columns = [column for column, _, _ in options.table_columns()]
    exact: dict[int, str] = {}
    keeps_private = False
    for entry in profile_table():
        action = _resolve(entry, columns)
        tag = entry["tag"].upper()
        if tag.startswith("(GGGG,EEEE)"):
            keeps_private = action != "X"
        elif "X" not in tag[1:10]:
            number = int(tag[1:5] + tag[6:10], 16)
            combined = entry["basicProfile"].startswith("X/")
            if combined and action in ("Z", "D") and _is_sequence(number) and number != _ACQUISITION_CONTEXT:
                action = "X"
            exact[number] = action
    # Repeating groups (curves 50xx, overlays 60xx) are not resolved: the table removes
    # what it names of them and the safe list names none, so all of them go.
    safe = frozenset(safe_attributes()) - frozenset(exact)
    return _Rules(exact, safe, safe_private() if keeps_private else {})


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _value_text(value: object) -> str:
    """The original value as one string for the erased-values record."""
    if isinstance(value, bytes):
        stripped = value.rstrip(b"\0 ")
        if all(32 <= c < 127 for c in stripped):
            return stripped.decode("ascii")
        return f"<{len(value)} bytes>"
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_value_text(v) for v in value)
    return "" if value is None else str(value)


def _keyword(tag: int) -> str:
    """The standard keyword, also for repeating groups (overlays, curves); '' for private tags."""
    try:
        return get_entry(tag)[4]
    except KeyError:
        return ""


def _is_well_known(uid: str) -> bool:
    return uid in UID_dictionary


def _date_offset(secret: bytes, patient_id: str, issuer: str) -> timedelta:
    """A per-patient shift of 1 to 3650 days back: keyed, so it cannot be guessed from the ID."""
    digest = hmac.new(
        secret, f"dateshift\0{issuer}\0{patient_id}".encode(), hashlib.sha256
    ).digest()
    return timedelta(days=-(1 + int.from_bytes(digest[:8], "big") % 3650))


def _shift_date(text: str, offset: timedelta) -> str | None:
    text = text.strip()
    if len(text) < 8 or not text[:8].isdigit():
        return None
    try:
        day = date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
    return (day + offset).strftime("%Y%m%d") + text[8:]


_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_IDENTIFYING_VRS = _TEXT_VRS | {"DA", "DT"}
_WORD = re.compile(r"[^\W_]{2,}")


class _Anonymizer:
    def __init__(self, secret: bytes, options: AnonymizationOptions, top: Dataset) -> None:
        self.secret = secret
        self.options = options
        self.rules = _rules(options)
        self.erased: list[ErasedValue] = []
        patient_id = _value_text(top.get(_PATIENT_ID, DataElement(0, "LO", "")).value)
        issuer = _value_text(top.get(_ISSUER_OF_PATIENT_ID, DataElement(0, "LO", "")).value)
        self.patient_key = patient_key(secret, patient_id, issuer)
        self.date_offset = _date_offset(secret, patient_id, issuer)
        self.scrub = _identifying_words(top, self.rules) if options.clean_descriptors else None

    # -- decisions -----------------------------------------------------------------------

    def _action(self, tag: int) -> str:
        action = self.rules.exact.get(tag)
        if action is not None:
            return action
        return "K" if tag in self.rules.safe else "X"

    @staticmethod
    def _vr(raw: DataElement | RawDataElement) -> str:
        vr = raw.VR
        if vr is None or vr == "UN":
            try:
                return dictionary_VR(raw.tag)
            except KeyError:
                return vr or "UN"
        return vr

    # -- records -------------------------------------------------------------------------

    def record(self, path: str, elem: DataElement | RawDataElement) -> None:
        if elem.VR == "SQ" and isinstance(elem.value, Sequence):
            for index, item in enumerate(elem.value):
                for child in item:
                    self.record(f"{path}[{index}].{_tag_text(child.tag)}", child)
            return
        text = _value_text(elem.value)
        if text:
            self.erased.append(ErasedValue(path, _keyword(elem.tag), text))

    def remove(self, src: Dataset, tag: int, path: str) -> None:
        """Record an element that does not go out; its value is read only if it can be."""
        try:
            elem: DataElement | RawDataElement = src[tag]
        except Exception:  # noqa: BLE001 - a value that breaks its VR is recorded raw
            elem = src.get_item(tag)
        self.record(path, elem)

    # -- the walk ------------------------------------------------------------------------

    def dataset(self, src: Dataset, prefix: str) -> Dataset:
        out = Dataset()
        implicit, little = src.original_encoding
        out.set_original_encoding(implicit, little, src.original_character_set)
        kept_private: list[tuple[int, str]] = []
        for tag in sorted(src.keys()):
            raw = src.get_item(tag)
            path = prefix + _tag_text(tag)
            group = tag >> 16
            if tag & 0xFFFF == 0:
                continue  # group lengths: wrong once anything is removed, and retired
            if group == 0x0002 or group & 1:
                vr = self._safe_private(src, tag) if group & 1 and self.rules.private else None
                if vr is not None:
                    kept_private.append((tag, vr))
                else:
                    self.remove(src, tag, path)
                continue
            action = self._action(tag)
            vr = self._vr(raw)
            if vr == "UN":
                action = "X"  # a value nobody can interpret cannot be known to be safe
            if action == "K" and vr != "SQ":
                out[tag] = raw if isinstance(raw, RawDataElement) else _copy(raw)
                continue
            if action == "X":
                self.remove(src, tag, path)
                continue
            new = self._apply(action, src[tag], vr, path)
            if new is not None:
                out[tag] = new
        for private, vr in kept_private:
            creator = BaseTag((private & 0xFFFF0000) | ((private >> 8) & 0xFF))
            found = src.get_item(private)
            if isinstance(found, RawDataElement) and found.VR in (None, "UN"):
                out[private] = found._replace(VR=vr)
            else:
                out[private] = _copy(src[private])
            out[creator] = _copy(src[creator])
        return out

    def _safe_private(self, src: Dataset, tag: int) -> str | None:
        """The VR of a private element on the safe-private dictionary; None if it is not."""
        element = tag & 0xFFFF
        if element < 0x1000:
            return None
        creator = src.get((tag & 0xFFFF0000) | (element >> 8))
        if creator is None:
            return None
        return self.rules.private.get((_value_text(creator.value), tag >> 16, element & 0xFF))

    def _apply(self, action: str, elem: DataElement, vr: str, path: str) -> DataElement | None:
        tag = elem.tag
        if action == "X":
            self.record(path, elem)
            return None
        if vr == "SQ":
            if action in ("K", "U", "C"):
                items = [
                    self.dataset(item, f"{path}[{i}].") for i, item in enumerate(elem.value)
                ]
                return DataElement(tag, "SQ", Sequence(items))
            self.record(path, elem)
            return DataElement(tag, "SQ", Sequence())
        if action == "Z":
            self.record(path, elem)
            return DataElement(tag, vr, b"" if vr in _BINARY_VRS else None)
        if action == "U" or vr == "UI":
            return self._uids(elem, path)
        if action == "C" and vr in ("DA", "DT") and self.options.retain_longitudinal_modified_dates:
            return self._dates(elem, vr, path)
        if action == "C" and vr == "TM":
            return _copy(elem)
        if action == "C" and vr in _TEXT_VRS and self.scrub is not None:
            return self._clean(elem, vr, path)
        if action == "K":
            return _copy(elem)
        self.record(path, elem)
        return DataElement(tag, vr, self._dummy(tag, vr))

    def _clean(self, elem: DataElement, vr: str, path: str) -> DataElement:
        """The descriptor without any word of the identifying values of this data set."""
        assert self.scrub is not None
        text = _value_text(elem.value)
        cleaned = " ".join(self.scrub.sub(" ", text).split()) if self.scrub.pattern else text
        if cleaned != text:
            self.record(path, elem)
        return DataElement(elem.tag, vr, cleaned)

    def _dummy(self, tag: int, vr: str) -> object:
        if tag == _PATIENT_ID:
            return self.patient_key
        if vr in _BINARY_VRS:
            return b"\0\0"
        return _DUMMY.get(vr, DUMMY_TEXT)

    def _uids(self, elem: DataElement, path: str) -> DataElement:
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        mapped = [
            v if not v or _is_well_known(v) else deidentify_uid(self.secret, v) for v in values
        ]
        if mapped != values:
            self.record(path, elem)
        return DataElement(elem.tag, "UI", mapped if len(mapped) > 1 else mapped[0])

    def _dates(self, elem: DataElement, vr: str, path: str) -> DataElement:
        values = list(elem.value) if isinstance(elem.value, MultiValue) else [elem.value]
        shifted = []
        for value in values:
            parts = [_shift_date(p, self.date_offset) if p else "" for p in str(value).split("-")]
            ok = all(p is not None for p in parts)
            shifted.append("-".join(parts) if ok else _DUMMY[vr])  # type: ignore[arg-type]
        if any(str(v) for v in values):
            self.record(path, elem)
        return DataElement(elem.tag, vr, shifted if len(shifted) > 1 else shifted[0])


def _identifying_words(top: Dataset, rules: _Rules) -> re.Pattern[str]:
    """One pattern matching, in any case, every word of the text and date values the profile
    removes or replaces anywhere in the data set (names, IDs, addresses, institutions)."""
    words: set[str] = set()
    for elem in top.iterall():
        group = elem.tag >> 16
        if group == 0x0002 or group & 1 or elem.VR not in _IDENTIFYING_VRS:
            continue
        action = rules.exact.get(elem.tag, "K" if elem.tag in rules.safe else "X")
        if action not in ("K", "C"):
            words.update(_WORD.findall(_value_text(elem.value)))
    alternatives = sorted(words, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, alternatives)), re.IGNORECASE)


def _copy(elem: DataElement) -> DataElement:
    """A kept element the output owns: lists are copied, immutable values shared (no deepcopy)."""
    value = elem.value
    if isinstance(value, MultiValue):
        value = list(value)
    return DataElement(elem.tag, elem.VR, value, is_undefined_length=elem.is_undefined_length)


def _transfer_syntax(src: Dataset) -> str:
    meta = getattr(src, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        return str(syntax)
    pixels = src.get_item(_PIXEL_DATA) if _PIXEL_DATA in src else None
    if isinstance(pixels, RawDataElement):
        encapsulated = pixels.length == _UNDEFINED_LENGTH
    else:
        encapsulated = pixels is not None and pixels.is_undefined_length
    if encapsulated:
        raise InvalidInput("encapsulated (compressed) pixel data but no transfer syntax in file meta")
    implicit, little = src.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian


# SOP classes whose pixels commonly show text (PS3.15 E.3.1: "burned in" annotation):
# secondary and screen captures, ultrasound, and dose reports stored as images.
_BURNED_IN_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.1": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.2": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.3": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.7.4": "a secondary capture",
    "1.2.840.10008.5.1.4.1.1.6.1": "an ultrasound image",
    "1.2.840.10008.5.1.4.1.1.6.2": "an ultrasound image",
    "1.2.840.10008.5.1.4.1.1.3.1": "an ultrasound image",
    "1.2.840.10008.5.1.4.1.1.88.67": "a dose report",
    "1.2.840.10008.5.1.4.1.1.88.68": "a dose report",
    "1.2.840.10008.5.1.4.1.1.77.1.1": "a video endoscopic image",
}
_BURNED_IN_IMAGE_TYPES = ("SCREEN SAVE", "SCREENSHOT", "DOSE INFO", "DOSE REPORT", "DOSE_REPORT")


def burned_in_reason(ds: Dataset) -> str | None:
    """Why the pixels may show text (a name, a date) that no header rule can remove; None if
    nothing says so. Pixels are never read: the header says what the image is."""
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "BurnedInAnnotation is YES: the pixels show text"
    kind = _BURNED_IN_CLASSES.get(str(ds.get("SOPClassUID", "")).strip())
    if kind is None and str(ds.get("Modality", "")).strip().upper() == "US":
        kind = "an ultrasound image"
    if kind is not None:
        return f"{kind} commonly shows text burned into its pixels"
    image_type = ds.get("ImageType") or []
    values = [str(v).upper() for v in (image_type if isinstance(image_type, MultiValue | list) else [image_type])]
    for value in values:
        if value in _BURNED_IN_IMAGE_TYPES:
            return f"ImageType {value}: a screen capture commonly shows text burned into its pixels"
    return None


def deidentification_method() -> str:
    """DeidentificationMethod (LO, 64 characters): the profile and the version of the rules."""
    return f"PS3.15 Basic Profile + safe lists; srm-dicom rules {rules_version()}"


def protection_record(options: AnonymizationOptions) -> str:
    """What an entry was protected with, as stored with it: restaging uses these options,
    whatever [anonymization] says by then, and the rules version tells whether the packaged
    table and lists are still those of the entry."""
    record = {"profile": PROFILE_NAME, "rules": rules_version(), "options": asdict(options)}
    return json.dumps(record, sort_keys=True)


def recorded_options(record: str) -> tuple[AnonymizationOptions, str]:
    """The options and rules version of a stored protection record."""
    data = json.loads(record)
    known = {f.name for f in fields(AnonymizationOptions)}
    return AnonymizationOptions(**{k: v for k, v in data["options"].items() if k in known}), data["rules"]


def _identity_removed(out: Dataset, options: AnonymizationOptions) -> None:
    codes = [_BASIC_PROFILE_CODE] + [(code, meaning) for _, code, meaning in options.table_columns()]
    items = []
    for code, meaning in codes:
        item = Dataset()
        item.add_new(0x00080100, "SH", code)  # CodeValue
        item.add_new(0x00080102, "SH", "DCM")  # CodingSchemeDesignator
        item.add_new(0x00080104, "LO", meaning)  # CodeMeaning
        items.append(item)
    modified = "MODIFIED" if options.retain_longitudinal_modified_dates else "REMOVED"
    out.add_new(0x00120062, "CS", "YES")  # PatientIdentityRemoved
    out.add_new(0x00120063, "LO", deidentification_method())  # DeidentificationMethod
    out.add_new(0x00120064, "SQ", Sequence(items))  # DeidentificationMethodCodeSequence
    out.add_new(0x00280303, "CS", modified)  # LongitudinalTemporalInformationModified


def _file_meta(src: Dataset, out: Dataset, anonymizer: _Anonymizer) -> FileMetaDataset:
    source_meta = getattr(src, "file_meta", None) or FileMetaDataset()
    sop_class = src.get(_SOP_CLASS_UID) or source_meta.get(0x00020002)
    meta = FileMetaDataset()
    meta.add_new(0x00020001, "OB", b"\x00\x01")  # FileMetaInformationVersion
    if sop_class is not None:
        meta.add_new(0x00020002, "UI", sop_class.value)  # MediaStorageSOPClassUID
    if _SOP_INSTANCE_UID in out:
        meta.add_new(0x00020003, "UI", out[_SOP_INSTANCE_UID].value)  # MediaStorageSOPInstanceUID
    meta.add_new(0x00020010, "UI", _transfer_syntax(src))  # TransferSyntaxUID
    meta.add_new(0x00020012, "UI", IMPLEMENTATION_CLASS_UID)
    meta.add_new(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME)
    for elem in source_meta:
        tag = elem.tag
        if tag & 0xFFFF and (tag not in meta or meta[tag].value != elem.value):
            anonymizer.record(_tag_text(tag), elem)
    return meta


def anonymize(
    ds: Dataset, secret: bytes, options: AnonymizationOptions | None = None
) -> AnonymizationResult:
    """De-identify `ds` into a new dataset (`ds` is not changed); pixel data is shared, never decoded."""
    options = options or AnonymizationOptions()
    anonymizer = _Anonymizer(secret, options, ds)
    out = anonymizer.dataset(ds, "")
    _identity_removed(out, options)
    out.file_meta = _file_meta(ds, out, anonymizer)
    return AnonymizationResult(out, anonymizer.erased)


def to_bytes(result: AnonymizationResult) -> bytes:
    """A Part-10 file: zero preamble, rebuilt file meta, the source's transfer syntax; the
    bytes of ``dcmwrite`` (``srm_dicom.encode``: the elements kept as read are copied)."""
    return part10(result.dataset)
