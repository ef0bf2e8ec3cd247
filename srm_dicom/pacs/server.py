"""The embedded PACS: a small Query/Retrieve SCP so a demo or a test needs no hospital PACS.

Files on disk as received (the bytes the sender encoded, never re-encoded), and a SQLite
index beside them for C-FIND and for locating what C-GET and C-MOVE send. Storing the
same SOP Instance UID again replaces the earlier copy, as in Orthanc with
OverwriteInstances. pynetdicom's default C-FIND/C-GET/C-MOVE need handlers that do the
matching, so matching is written here: equality, lists of UIDs, ``*``/``?`` wildcards
and date ranges (PS3.4 C.2.2.2) over the attributes the index keeps.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

import srm_dicom.pacs  # noqa: F401  (TCP_NODELAY)
from srm_dicom.config import Config, EmbeddedPacsConfig
from srm_dicom.errors import ConfigError, PacsError
from srm_dicom.names import is_uid
from srm_dicom.pacs.client import COMPRESSED_SYNTAXES, RETRIEVE_SYNTAXES

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"

# Uncompressed first: a sender proposing several syntaxes in one context gets the one
# every sender can produce (pynetdicom accepts by the acceptor's order).
STORE_SYNTAXES = [*RETRIEVE_SYNTAXES[:4], *COMPRESSED_SYNTAXES]


@dataclass(frozen=True)
class _Key:
    """An attribute the index keeps: its column, its query level, how it matches."""

    keyword: str
    level: str
    kind: str = "text"  # text (wildcards) | uid (lists) | date (ranges)


KEYS = (
    _Key("PatientID", "PATIENT"),
    _Key("PatientName", "PATIENT"),
    _Key("PatientBirthDate", "PATIENT", "date"),
    _Key("PatientSex", "PATIENT"),
    _Key("StudyInstanceUID", "STUDY", "uid"),
    _Key("StudyDate", "STUDY", "date"),
    _Key("StudyTime", "STUDY"),
    _Key("StudyID", "STUDY"),
    _Key("AccessionNumber", "STUDY"),
    _Key("StudyDescription", "STUDY"),
    _Key("SeriesInstanceUID", "SERIES", "uid"),
    _Key("Modality", "SERIES"),
    _Key("SeriesNumber", "SERIES"),
    _Key("SeriesDescription", "SERIES"),
    _Key("SOPInstanceUID", "IMAGE", "uid"),
    _Key("SOPClassUID", "IMAGE", "uid"),
    _Key("InstanceNumber", "IMAGE"),
)
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class: str
    transfer_syntax: str

_UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID",
           "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}


def _text(value: object) -> str:
    """An element value as received: a multi-valued one (a UID list) joined by backslash."""
    if isinstance(value, MultiValue | list):
        return "\\".join(str(v) for v in value)
    return str(value or "")


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _condition(key: _Key, value: str) -> tuple[str, list[str]]:
    """SQL for one non-empty matching key (PS3.4 C.2.2.2)."""
    column = key.keyword
    if key.kind == "uid":
        uids = value.split("\\")
        return f"{column} IN ({','.join('?' * len(uids))})", uids
    if key.kind == "date" and "-" in value:
        low, high = value.split("-", 1)
        parts, args = [], []
        if low:
            parts.append(f"{column} >= ?")
            args.append(low)
        if high:
            parts.append(f"{column} <= ?")
            args.append(high)
        return " AND ".join(parts) or "1", args
    if "*" in value or "?" in value:
        return f"{column} LIKE ? ESCAPE '\\'", [_like(value)]
    return f"{column} = ?", [value]


class Index:
    """The SQLite index of stored instances; one connection shared under a lock, since
    pynetdicom runs each association's handlers in its own thread."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        columns = ", ".join(f"{k.keyword} TEXT" for k in KEYS if k.keyword != "SOPInstanceUID")
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS instances (SOPInstanceUID TEXT PRIMARY KEY, "
            f"{columns}, TransferSyntaxUID TEXT NOT NULL, path TEXT NOT NULL)"
        )
        for column in ("StudyInstanceUID", "SeriesInstanceUID", "PatientID"):
            self._db.execute(
                f"CREATE INDEX IF NOT EXISTS by_{column} ON instances ({column})"
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, ds: Dataset, transfer_syntax: str, path: Path) -> str | None:
        """Index an instance; returns the path of the copy it replaces, if elsewhere."""
        values = [str(ds.get(k.keyword, "") or "") for k in KEYS]
        names = ", ".join(k.keyword for k in KEYS)
        with self._lock:
            old = self._db.execute(
                "SELECT path FROM instances WHERE SOPInstanceUID = ?", (str(ds.SOPInstanceUID),)
            ).fetchone()
            self._db.execute(
                f"INSERT OR REPLACE INTO instances ({names}, TransferSyntaxUID, path) "
                f"VALUES ({', '.join('?' * (len(KEYS) + 2))})",
                [*values, transfer_syntax, str(path)],
            )
        return old[0] if old and old[0] != str(path) else None

    def search(self, level: str, query: Dataset) -> tuple[list[str], list[tuple[str, ...]]]:
        """Distinct rows at ``level`` matching ``query``: (columns, rows)."""
        depth = LEVELS.index(level)
        where, args = [], []
        for key in KEYS:
            value = _text(query.get(key.keyword, ""))
            if value and value != "*":
                sql, values = _condition(key, value)
                where.append(sql)
                args.extend(values)
        columns = [k.keyword for k in KEYS if LEVELS.index(k.level) <= depth]
        if level == "IMAGE":
            columns += ["TransferSyntaxUID", "path"]
        group = _UNIQUE[level]
        sql = (
            f"SELECT {', '.join(f'MAX({c})' for c in columns)} FROM instances "
            f"WHERE {' AND '.join(where) or '1'} GROUP BY {group} ORDER BY MIN(rowid)"
        )
        with self._lock:
            return columns, self._db.execute(sql, args).fetchall()

    def files(self, level: str, query: Dataset) -> list[_File]:
        """The stored files a retrieve identifier at ``level`` names."""
        columns, rows = self.search("IMAGE", _narrowed(level, query))
        at = [columns.index(c) for c in ("path", "SOPClassUID", "TransferSyntaxUID")]
        return [_File(Path(row[at[0]]), row[at[1]], row[at[2]]) for row in rows]


def _narrowed(level: str, query: Dataset) -> Dataset:
    """A retrieve identifier holds the unique keys down to its level; nothing else matches."""
    narrowed = Dataset()
    for key in LEVELS[: LEVELS.index(level) + 1]:
        if key in _UNIQUE and _UNIQUE[key] in query:
            setattr(narrowed, _UNIQUE[key], query[_UNIQUE[key]].value)
    return narrowed


def _parse_destination(aet: str, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(
            f"config: [embedded_pacs] move_destinations {aet} must be 'host:port', not {value!r}"
        )
    return host, int(port)


class EmbeddedPacs:
    """A Query/Retrieve SCP over a storage directory. ``start()`` returns at once."""

    def __init__(self, settings: EmbeddedPacsConfig, storage: Path) -> None:
        self.settings = settings
        self.storage = storage
        self.destinations = {
            aet: _parse_destination(aet, value)
            for aet, value in settings.move_destinations.items()
        }
        aets = settings.calling_aets
        if not aets or not all(isinstance(a, str) and 0 < len(a.strip()) <= 16 for a in aets):
            raise ConfigError("config: [embedded_pacs] calling_aets must list AE titles (1 to 16 characters)")
        self._index: Index | None = None
        self._server: ThreadedAssociationServer | None = None

    @classmethod
    def from_config(cls, config: Config) -> EmbeddedPacs:
        return cls(config.embedded_pacs, config.path(config.embedded_pacs.storage))

    @property
    def name(self) -> str:
        s = self.settings
        return f"embedded PACS {s.aet}@{s.host}:{s.port}"

    def __enter__(self) -> EmbeddedPacs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.settings.aet)
        ae.maximum_associations = 32
        ae.require_called_aet = True
        # Only the AE titles configured may associate (the storage element, known modalities).
        ae.require_calling_aet = [a.strip() for a in self.settings.calling_aets]
        ae.network_timeout = ae.dimse_timeout = ae.acse_timeout = 60
        ae.add_supported_context(Verification)
        for model in (
            PatientRootQueryRetrieveInformationModelFind,
            PatientRootQueryRetrieveInformationModelGet,
            PatientRootQueryRetrieveInformationModelMove,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        ):
            ae.add_supported_context(model)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(
                str(cx.abstract_syntax), STORE_SYNTAXES, scu_role=True, scp_role=True
            )
        return ae

    def start(self) -> None:
        """Listen in background threads; returns once the port is bound."""
        self.storage.mkdir(parents=True, exist_ok=True)
        self._index = Index(self.storage / INDEX_FILE)
        handlers: list = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        try:
            self._server = self._ae().start_server(
                (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
            )
        except OSError as exc:
            self._index.close()
            raise PacsError(f"{self.name}: cannot listen ({exc.strerror})") from None
        log.info("%s started, storage %s", self.name, self.storage)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._index is not None:
            self._index.close()
            self._index = None

    def serve_forever(self) -> None:
        """Run until interrupted (Ctrl-C raises KeyboardInterrupt here); then stop."""
        self.start()
        try:
            threading.Event().wait()
        finally:
            self.stop()

    # -- handlers (run in pynetdicom's association threads) ---------------------------

    @property
    def index(self) -> Index:
        if self._index is None:
            raise PacsError(f"{self.name}: not started")
        return self._index

    def _on_store(self, event: evt.Event) -> int:
        try:
            ds = event.dataset
            for _ in ds.iterall():
                pass  # pydicom decodes lazily: a malformed data set raises here, not in the index
            parts = [str(ds.get(k, "") or "").strip() for k in _UNIQUE.values() if k != "PatientID"]
        except Exception:  # pydicom's converters raise many types on corrupt input
            log.warning("%s: refused a C-STORE that cannot be decoded", self.name)
            return 0xC000  # Error: cannot understand
        if not all(parts):
            return 0xA900  # Data set does not match SOP class: no UIDs to file it under
        if not all(is_uid(p) for p in parts):
            # The file's path is built from its UIDs: "..", "/" or NUL would lead out of the storage.
            log.warning("%s: refused a C-STORE whose UIDs are not valid UIDs", self.name)
            return 0xC000
        path = self.storage.joinpath(parts[0], parts[1], f"{parts[2]}.dcm")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".part")
        partial.write_bytes(event.encoded_dataset())
        os.replace(partial, path)
        replaced = self.index.add(ds, str(event.context.transfer_syntax), path)
        if replaced:
            Path(replaced).unlink(missing_ok=True)
        return 0x0000

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = str(query.get("QueryRetrieveLevel", ""))
        if level not in LEVELS:
            yield 0xA900, None  # Identifier does not match SOP class
            return
        columns, rows = self.index.search(level, query)
        wanted = [e.keyword for e in query if e.keyword and e.keyword != "QueryRetrieveLevel"]
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            found = dict(zip(columns, row, strict=True))
            answer = Dataset()
            answer.QueryRetrieveLevel = level
            for keyword in wanted:
                setattr(answer, keyword, found.get(keyword) or "")
            yield 0xFF00, answer

    def _files(self, event: evt.Event) -> list[_File] | None:
        query = event.identifier
        level = str(query.get("QueryRetrieveLevel", ""))
        return self.index.files(level, query) if level in LEVELS else None

    def _send(self, event: evt.Event, files: list[_File]) -> Iterator[object]:
        yield len(files)
        for file in files:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, dcmread(file.path)

    def _on_get(self, event: evt.Event) -> Iterator[object]:
        files = self._files(event)
        if files is None:
            yield 0xA900, None  # Identifier does not match SOP class
            return
        yield from self._send(event, files)

    def _on_move(self, event: evt.Event) -> Iterator[object]:
        destination = self.destinations.get((event.move_destination or "").strip())
        if destination is None:
            yield None, None  # pynetdicom answers 0xA801, Move Destination Unknown
            return
        files = self._files(event) or []
        # Propose each image's own syntax, so the destination receives it unchanged.
        pairs = sorted({(f.sop_class, f.transfer_syntax) for f in files})
        contexts = [build_context(sop_class, ts) for sop_class, ts in pairs[:128]]
        yield (*destination, {"contexts": contexts or [build_context(Verification)]})
        yield from self._send(event, files)
