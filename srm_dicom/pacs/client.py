"""A DICOM client for the site's PACS: echo, store, find, get and move over one kept association.

Opening an association costs a round trip or two and, on some PACS, a process fork; a
registration or a staging run makes hundreds of calls. So one association is kept open
and reused while it offers the presentation contexts a call needs; when a call needs
more, it is reopened with the union (at most 128 contexts, the protocol's limit).

Every presentation context carries exactly one transfer syntax, so the PACS chooses a
context by the syntax an image is stored in: stored images keep their encoding, and
retrieved ones arrive as the PACS holds them (no silent transcoding).

Every failure a person can meet (refused, aborted, timed out, down, failure status) is
a ``PacsError`` whose one line names the PACS and, for DIMSE failures, the status.
"""

from __future__ import annotations

import itertools
import logging
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
    RLETransferSyntaxes,
)
from pynetdicom import (
    AE,
    AllStoragePresentationContexts,
    StoragePresentationContexts,
    _config,
    build_context,
    build_role,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import, unseen by mypy
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    VERIFICATION_SERVICE_CLASS_STATUS,
)

import srm_dicom.pacs  # noqa: F401  (TCP_NODELAY and quiet pynetdicom logging)
from srm_dicom.config import PacsConfig
from srm_dicom.errors import InvalidInput, NotFound, PacsError
from srm_dicom.events import PacsCall, timed
from srm_dicom.names import is_uid
from srm_dicom.pacs.answers import keep_answers_for_the_caller
from srm_dicom.pacs.dcmtk import GetscuIncomplete, getscu_get, getscu_stream, storescu_store

log = logging.getLogger(__name__)

# The dcmtk engine takes a series or a batch of at least this many images; fewer go over the
# kept association: starting getscu costs more than receiving a few images in process.
DCMTK_FROM = 8
MAX_CONTEXTS = 128
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")

# Transfer syntaxes offered, one context each, for every storage SOP class a C-GET may
# bring back: the uncompressed ones and the image compressions pydicom decodes.
COMPRESSED_SYNTAXES: tuple[str, ...] = tuple(
    str(ts)
    for group in (
        JPEGTransferSyntaxes,
        JPEGLSTransferSyntaxes,
        JPEG2000TransferSyntaxes,
        RLETransferSyntaxes,
    )
    for ts in group
)
RETRIEVE_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    *COMPRESSED_SYNTAXES,
)
# A pynetdicom acceptor takes the first of *its own* syntaxes the requestor proposes.
# A C-MOVE requestor that proposes several in one context lists the image's own first
# when it is compressed (DCMTK, Orthanc), so compressed syntaxes come first here.
MOVE_SCP_SYNTAXES: tuple[str, ...] = (*COMPRESSED_SYNTAXES, *RETRIEVE_SYNTAXES[:4])

# (abstract syntax, transfer syntaxes): one syntax, except in the fallback below.
Context = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class _Plan:
    """What an association offers: its presentation contexts and the SOP classes for
    which we also take the SCP role (to receive C-GET's C-STOREs)."""

    contexts: frozenset[Context] = frozenset()
    scp_roles: frozenset[str] = frozenset()

    def covers(self, other: _Plan) -> bool:
        return other.contexts <= self.contexts and other.scp_roles <= self.scp_roles

    def union(self, other: _Plan) -> _Plan:
        return _Plan(self.contexts | other.contexts, self.scp_roles | other.scp_roles)


STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_OUT_OF_RESOURCES = 0xA700
_RETRIEVED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

log = logging.getLogger(__name__)


@dataclass
class _Inbox:
    """Images a C-STORE sub-operation delivered, waiting for the caller's iteration: datasets,
    or with ``spool``, (SOP Instance UID, file) of each written there as it came over the wire.

    Only what was asked is taken: valid UIDs of the study and series (and instance) of the
    retrieve under way, and, for C-MOVE, only from the PACS's own address. Anything else
    is refused (0xC000) and never reaches the stager (README, "What reading does")."""

    datasets: deque[Any] = field(default_factory=deque)
    expected: tuple[str, str, frozenset[str] | None] | None = None  # study, series, SOPs (None: any)
    peers: frozenset[str] | None = None  # addresses allowed to send (C-MOVE); None: ours (C-GET)
    spool: Path | None = None

    def on_store(self, event: evt.Event) -> int:
        if self.peers is not None and event.assoc.requestor.address not in self.peers:
            log.warning("C-MOVE receiver: refused an image from %s, not the PACS", event.assoc.requestor.address)
            return STATUS_CANNOT_UNDERSTAND
        ds = event.dataset
        ds.file_meta = event.file_meta
        if not self.accepts(ds):
            return STATUS_CANNOT_UNDERSTAND
        if self.spool is None:
            self.datasets.append(ds)
            return 0x0000
        sop = str(ds.SOPInstanceUID).strip()
        path = self.spool / sop  # a valid UID (``accepts``): digits and dots, no path
        try:
            path.write_bytes(event.encoded_dataset())  # the bytes as sent, never encoded again
        except OSError as exc:
            log.warning("retrieve: cannot spool a received image (%s)", exc.strerror)
            return STATUS_OUT_OF_RESOURCES
        self.datasets.append((sop, path))
        return 0x0000

    def accepts(self, ds: Dataset) -> bool:
        """Whether ``ds`` is one of the images asked for, with valid UIDs (else logged)."""
        try:
            values = tuple(str(ds.get(k, "") or "").strip() for k in _RETRIEVED_UIDS)
        except Exception:  # pydicom decodes lazily: a malformed UID element raises here
            values = ("", "", "")
        asked = self.expected
        if not all(is_uid(v) for v in values) or (
            asked is not None
            and (values[:2] != asked[:2] or (asked[2] is not None and values[2] not in asked[2]))
        ):
            log.warning("retrieve: refused an image that is not of the series asked for or has invalid UIDs")
            return False
        return True

    def names(self, sop: str) -> bool:
        """Whether ``sop`` is one of the instances asked for (any, for a whole series)."""
        return self.expected is None or self.expected[2] is None or sop in self.expected[2]

    def drain(self) -> Iterator[Any]:
        while self.datasets:
            yield self.datasets.popleft()


def _sop_set(sops: Instances) -> frozenset[str] | None:
    """The SOP Instance UIDs a retrieve names; None for a whole series."""
    if not sops:
        return None
    return frozenset([sops] if isinstance(sops, str) else sops)


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if not ts:
        raise InvalidInput(
            "C-STORE: dataset has no file_meta.TransferSyntaxUID; read it from a file or set it"
        )
    return str(ts)


def _status_text(code: int, table: dict[int, tuple[str, str]]) -> str:
    meaning = table.get(code, ("", "unknown status"))[1]
    return f"status 0x{code:04X} ({meaning})"


def _category(code: int, table: dict[int, tuple[str, str]]) -> str:
    if code in table:
        return table[code][0]
    return "Failure"


# Offered on every association, so that storing, querying and retrieving in turn do
# not reopen it each time.
BASE_PLAN = _Plan(
    frozenset(
        (model, (ImplicitVRLittleEndian,))
        for model in (
            Verification,
            PatientRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelGet,
            StudyRootQueryRetrieveInformationModelMove,
        )
    )
)


class RetrieveRefused(PacsError):
    """The PACS answered a retrieve with a failure status: it refused the request as a whole
    (Orthanc does when one SOP Instance UID of a list is unknown), as opposed to being down."""


# What a retrieve names: one instance, several of one series (a UID list), or the whole series.
Instances = str | Sequence[str] | None


class PacsClient:
    """The site's PACS, as one kept association. Use as a context manager."""

    def __init__(self, config: PacsConfig) -> None:
        self.config = config
        self.name = f"PACS {config.aet}@{config.host}:{config.port}"
        self._ae = AE(ae_title=config.calling_aet)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self._ae, attr, config.timeout)
        self._assoc: Association | None = None
        self._plan = _Plan()
        self._inbox = _Inbox()
        # Whether this PACS's C-FIND returns SOP Class UID (dcmqrscp does not): asked once,
        # by the first retrieve that knows its SOP classes.
        self._finds_sop_classes: bool | None = None

    def __enter__(self) -> PacsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the kept association, if any."""
        assoc, self._assoc = self._assoc, None
        if assoc is not None and assoc.is_established:
            assoc.release()

    def _error(self, what: str) -> PacsError:
        return PacsError(f"{self.name}: {what}")

    # -- association -------------------------------------------------------------

    def _association(self, needed: _Plan) -> Association:
        """An established association offering ``needed``: the kept one, or a new one."""
        needed = needed.union(BASE_PLAN)
        if self._assoc is not None and self._assoc.is_established and self._plan.covers(needed):
            return self._assoc
        plan = needed
        if self._assoc is not None and self._assoc.is_established:
            union = self._plan.union(needed)
            if len(union.contexts) <= MAX_CONTEXTS:
                plan = union
        if len(plan.contexts) > MAX_CONTEXTS:
            raise self._error(
                f"a call needs {len(plan.contexts)} presentation contexts, more than "
                f"the {MAX_CONTEXTS} one association can carry"
            )
        self.close()
        self._assoc = self._open(plan)
        self._plan = plan
        return self._assoc

    def _open(self, plan: _Plan) -> Association:
        contexts = [build_context(abstract, list(ts)) for abstract, ts in sorted(plan.contexts)]
        roles: list[Any] = [build_role(uid, scu_role=True, scp_role=True) for uid in sorted(plan.scp_roles)]
        connected = threading.Event()
        started = time.monotonic()
        assoc = self._ae.associate(
            self.config.host,
            self.config.port,
            contexts=contexts,
            ae_title=self.config.aet,
            ext_neg=list(roles) or None,
            evt_handlers=[
                (evt.EVT_C_STORE, self._inbox.on_store),
                (evt.EVT_CONN_OPEN, lambda event: connected.set()),
            ],
        )
        if assoc.is_established:
            keep_answers_for_the_caller(assoc)
            return assoc
        if assoc.is_rejected:
            rj = assoc.acceptor.primitive
            assert rj is not None  # a rejection always carries the A-ASSOCIATE-RJ
            raise self._error(
                f"association rejected ({rj.result_str}, {rj.source_str}: {rj.reason_str})"
            )
        if not connected.is_set():
            raise self._error("cannot connect (PACS down or unreachable?)")
        if assoc.rejected_contexts:
            refused = ", ".join(
                f"{UID(cx.abstract_syntax or '').name} in {' or '.join(UID(t).name for t in cx.transfer_syntax)}"
                for cx in assoc.rejected_contexts[:3]
            )
            raise self._error(f"no presentation context accepted, refused: {refused}")
        if time.monotonic() - started < self.config.timeout:
            raise self._error("association aborted by the PACS")
        raise self._error(f"association not answered within {self.config.timeout:g} s")

    def _context_accepted(self, assoc: Association, abstract: str, ts: str) -> bool:
        return any(
            cx.abstract_syntax == abstract and cx.transfer_syntax[0] == ts
            for cx in assoc.accepted_contexts
        )

    def _single(self, abstract: str, ts: str = ImplicitVRLittleEndian) -> _Plan:
        return _Plan(frozenset({(abstract, (ts,))}))

    def _no_response(self, service: str) -> PacsError:
        self.close()
        return self._error(
            f"{service}: no response (aborted, or timed out after {self.config.timeout:g} s)"
        )

    # -- services ----------------------------------------------------------------

    @timed(PacsCall, operation="C-ECHO")
    def echo(self) -> None:
        """C-ECHO: proves the PACS answers to our AE title."""
        assoc = self._association(self._single(Verification))
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise self._no_response("C-ECHO")
        if status.Status != 0x0000:
            raise self._error(
                f"C-ECHO failed: {_status_text(status.Status, VERIFICATION_SERVICE_CLASS_STATUS)}"
            )

    @timed(PacsCall, operation="C-STORE")
    def store(self, ds: Dataset) -> None:
        """C-STORE one dataset, in exactly its own transfer syntax."""
        self._store(ds, str(ds.SOPClassUID), _transfer_syntax(ds))

    @timed(PacsCall, operation="C-STORE")
    def store_file(self, path: Path, sop_class: str, transfer_syntax: str) -> None:
        """C-STORE a Part-10 file as its bytes are, read in chunks: nothing decoded or re-encoded
        here (the registrar has read it in a worker, and checked that its file meta names the
        data set's SOP class, instance and encoding). pynetdicom sends a path so only with its
        ``STORE_SEND_CHUNKED_DATASET``; it only concerns paths, which only this method sends."""
        _config.STORE_SEND_CHUNKED_DATASET = True
        self._store(path, sop_class, transfer_syntax)

    def _store(self, what: Dataset | Path, sop_class: str, ts: str) -> None:
        assoc = self._association(self._single(sop_class, ts))
        if not self._context_accepted(assoc, sop_class, ts):
            raise self._error(
                f"C-STORE refused: {UID(sop_class).name} in {UID(ts).name} is not accepted"
            )
        try:
            status = assoc.send_c_store(what)
        except (OSError, AttributeError, ValueError) as exc:  # a file that changed since it was read
            raise InvalidInput(f"cannot be sent ({exc.__class__.__name__})") from None
        if "Status" not in status:
            raise self._no_response("C-STORE")
        if _category(status.Status, STORAGE_SERVICE_CLASS_STATUS) == "Failure":
            raise self._error(
                f"C-STORE failed: {_status_text(status.Status, STORAGE_SERVICE_CLASS_STATUS)}"
            )

    def store_files(self, files: Sequence[tuple[Path, str, str]]) -> set[Path]:
        """C-STORE a batch of files (path, SOP class, transfer syntax) the fast way the engine
        has, and return those stored: with ``[pacs] engine = "dcmtk"``, DCMTK's storescu sends a
        batch of at least ``DCMTK_FROM`` files, each in its own context (a file whose context
        the PACS refuses is simply not among those returned). Nothing with pynetdicom, and no
        kept association is opened for it (its reactor threads would wake every millisecond
        for the whole run): the caller sends the rest with ``store_file``, which tells each failure."""
        if self.config.engine != "dcmtk" or len(files) < DCMTK_FROM:
            return set()
        return storescu_store(self.config, self.name, files)

    def offer(self, contexts: Iterable[tuple[str, str]]) -> None:
        """Have the kept association offer these (SOP class, transfer syntax) pairs, opening
        it once for all of them rather than again at each new pair a batch's C-STOREs meet.
        More than one association carries: left to ``store`` to reopen as needed."""
        plan = _Plan(frozenset((sop_class, (ts,)) for sop_class, ts in contexts))
        if plan.contexts and len(plan.union(BASE_PLAN).contexts) <= MAX_CONTEXTS:
            self._association(plan)

    def store_many(self, datasets: Iterable[Dataset]) -> int:
        """C-STORE a batch over one association opened for all its contexts; returns the count."""
        batch = list(datasets)
        self.offer((str(ds.SOPClassUID), _transfer_syntax(ds)) for ds in batch)
        for ds in batch:
            self.store(ds)
        return len(batch)

    @timed(PacsCall, operation="C-FIND")
    def find(self, level: str, query: Dataset) -> list[Dataset]:
        """C-FIND at ``level``: Patient Root for PATIENT, Study Root otherwise."""
        if level not in LEVELS:
            raise InvalidInput(f"C-FIND level must be one of {', '.join(LEVELS)}, not {level!r}")
        model = (
            PatientRootQueryRetrieveInformationModelFind
            if level == "PATIENT"
            else StudyRootQueryRetrieveInformationModelFind
        )
        identifier = Dataset()
        identifier.update(query)
        identifier.QueryRetrieveLevel = level
        assoc = self._association(self._single(model))
        matches: list[Dataset] = []
        for status, found in assoc.send_c_find(identifier, model):
            if "Status" not in status:
                raise self._no_response("C-FIND")
            category = _category(status.Status, QR_FIND_SERVICE_CLASS_STATUS)
            if category == "Pending":
                if found is None:  # pynetdicom could not decode an answer: never drop a match silently
                    raise self._error("C-FIND: an answer could not be decoded")
                matches.append(found)
            elif category != "Success":
                raise self._error(
                    f"C-FIND failed: {_status_text(status.Status, QR_FIND_SERVICE_CLASS_STATUS)}"
                )
        return matches

    def _uids(self, level: str, key: str, **match: str) -> list[str]:
        query = Dataset()
        for name, value in match.items():
            setattr(query, name, value)
        setattr(query, key, "")
        uids = (str(found.get(key, "")) for found in self.find(level, query))
        return list(dict.fromkeys(uid for uid in uids if uid))

    def find_studies(self, patient_id: str | None = None) -> list[str]:
        """Study Instance UIDs, all or of one patient."""
        return self._uids("STUDY", "StudyInstanceUID", PatientID=patient_id or "")

    def find_series(self, study_uid: str) -> list[str]:
        """Series Instance UIDs of a study."""
        return self._uids("SERIES", "SeriesInstanceUID", StudyInstanceUID=study_uid)

    def find_instances(self, study_uid: str, series_uid: str) -> list[str]:
        """SOP Instance UIDs of a series."""
        return self._uids(
            "IMAGE", "SOPInstanceUID", StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid
        )

    def _retrieve_query(self, study: str, series: str, sops: Instances) -> Dataset:
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE" if sops else "SERIES"
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        if sops:
            # A list of UIDs matches any of them (PS3.4 C.2.2.2.2): one request for a batch.
            query.SOPInstanceUID = sops if isinstance(sops, str) else list(sops)
        return query

    def _catch_all_plan(self, known: frozenset[str] = frozenset()) -> _Plan:
        """The ``known`` classes and the common storage classes, each one context listing every
        syntax: the PACS picks."""
        room = MAX_CONTEXTS - len(BASE_PLAN.contexts)
        common = (str(cx.abstract_syntax) for cx in StoragePresentationContexts)
        classes = set(list(dict.fromkeys([*sorted(known), *common]))[:room])
        return _Plan(frozenset((uid, RETRIEVE_SYNTAXES) for uid in classes), frozenset(classes))

    def _get_plan(self, study: str, series: str, sops: Instances, sop_classes: frozenset[str]) -> _Plan:
        """Storage contexts for the SOP classes a C-GET will bring.

        Known classes (the catalog records them) spare the C-FIND that would find them, and
        get one context per transfer syntax, so the PACS sends each image as it holds it. A
        PACS that does not return SOP Class UID (dcmqrscp) gets the catch-all contexts of
        ``_catch_all_plan``: one C-FIND, the first time, tells which kind of PACS this is.
        """
        if sop_classes:
            if self._finds_sop_classes is None:
                self._finds_sop_classes = self._probe_sop_classes(study, series, sops)
            if self._finds_sop_classes is False:
                return self._catch_all_plan(sop_classes)
            contexts = frozenset((uid, (ts,)) for uid in sop_classes for ts in RETRIEVE_SYNTAXES)
            return _Plan(contexts, sop_classes)
        query = self._class_query(study, series, sops)
        found = self.find("IMAGE", query)
        if not found:
            what = "series" if not sops else "instance" if isinstance(sops, str) else "instances"
            raise NotFound(f"{self.name}: no such {what}")
        classes = {str(ds.get("SOPClassUID", "")) for ds in found} - {""}
        if not classes:
            return self._catch_all_plan()
        return _Plan(frozenset((uid, (ts,)) for uid in classes for ts in RETRIEVE_SYNTAXES), frozenset(classes))

    def _class_query(self, study: str, series: str, sops: Instances) -> Dataset:
        query = Dataset()
        query.StudyInstanceUID = study
        query.SeriesInstanceUID = series
        query.SOPInstanceUID = (sops if isinstance(sops, str) else list(sops)) if sops else ""
        query.SOPClassUID = ""
        return query

    def _probe_sop_classes(self, study: str, series: str, sops: Instances) -> bool | None:
        """Whether this PACS's C-FIND answers carry SOP Class UID; None when nothing matched
        (ask again next time). One instance is enough to tell."""
        first = sops if isinstance(sops, str) or not sops else sops[0]
        found = self.find("IMAGE", self._class_query(study, series, first))
        if not found:
            return None
        return any(ds.get("SOPClassUID") for ds in found)

    @timed(PacsCall, operation="C-GET")
    def get(
        self, study: str, series: str, sops: Instances = None, sop_classes: frozenset[str] = frozenset(),
        partial: list[str] | None = None,
    ) -> Iterator[Dataset]:
        """C-GET one instance, several of a series, or a whole series, over one association.

        Datasets are yielded as they arrive, with ``file_meta`` carrying the transfer
        syntax they were sent in. ``sop_classes``, when the caller knows them, spare the
        C-FIND that would find them. With ``partial``, failed sub-operations are appended
        there as one line instead of raising: the caller tells which images are missing.
        ``[pacs] engine = "dcmtk"`` has DCMTK's getscu receive a series or a batch of at least
        ``DCMTK_FROM`` images (``pacs/dcmtk.py``), and pynetdicom again when getscu complains.
        """
        self._inbox.expected = (study, series, _sop_set(sops))
        if self._takes_getscu(sops):
            received = getscu_get(self.config, self.name, study, series, sops)
            try:
                first = next(received, None)  # getscu runs to its end here
            except GetscuIncomplete as exc:
                log.info("%s; asking again with pynetdicom", exc)
            else:
                if first is not None:
                    yield from (ds for ds in itertools.chain((first,), received) if self._inbox.accepts(ds))
                return
        yield from self._c_get(study, series, sops, sop_classes, partial)

    @timed(PacsCall, operation="C-GET")
    def get_files(
        self, study: str, series: str, sops: Instances, sop_classes: frozenset[str], spool: Path,
        partial: list[str] | None = None,
    ) -> Iterator[tuple[str, Path]]:
        """``get`` into ``spool``, a private directory of the caller's: (SOP Instance UID, Part-10
        file) of each image as it arrives, for the stager's process pool to read, so that no
        image is decoded in the server. getscu writes the files itself (each handed on once
        written, ``getscu_stream``); pynetdicom's are the data sets' bytes as sent. The files are
        named by their SOP Instance UIDs, not read: the reader checks that each holds the UIDs
        its name says (``workers.protect``). When getscu complains, pynetdicom is asked for the
        same images again: the caller takes those it already has once."""
        self._inbox.expected = (study, series, _sop_set(sops))
        if self._takes_getscu(sops):
            wrote = False
            try:
                for item in getscu_stream(self.config, self.name, study, series, sops,
                                          Path(tempfile.mkdtemp(prefix="getscu-", dir=spool))):
                    wrote = True
                    if self._inbox.names(item[0]):
                        yield item
            except GetscuIncomplete as exc:
                log.info("%s; asking again with pynetdicom", exc)
            else:
                if wrote:
                    return
        self._inbox.spool = spool
        try:
            yield from self._c_get(study, series, sops, sop_classes, partial)
        finally:
            self._inbox.spool = None

    def _takes_getscu(self, sops: Instances) -> bool:
        return self.config.engine == "dcmtk" and (not sops or (not isinstance(sops, str) and len(sops) >= DCMTK_FROM))

    def _c_get(
        self, study: str, series: str, sops: Instances, sop_classes: frozenset[str], partial: list[str] | None
    ) -> Iterator[Any]:
        assoc = self._association(self._get_plan(study, series, sops, sop_classes))
        query = self._retrieve_query(study, series, sops)
        responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        yield from self._collect("C-GET", responses, QR_GET_SERVICE_CLASS_STATUS, partial=partial)

    def move(
        self, study: str, series: str, sops: Instances = None, partial: list[str] | None = None
    ) -> Iterator[Dataset]:
        """C-MOVE to our own storage SCP (AE calling_aet on move_port), run for this call."""
        return self._move(study, series, sops, partial, None)

    @timed(PacsCall, operation="C-MOVE")
    def _move(
        self, study: str, series: str, sops: Instances, partial: list[str] | None, spool: Path | None
    ) -> Iterator[Any]:
        scp = AE(ae_title=self.config.calling_aet)
        scp.network_timeout = scp.acse_timeout = scp.dimse_timeout = self.config.timeout
        # Only the PACS, calling us by our AE title, may send: not any host that finds the port.
        scp.require_called_aet = True
        scp.require_calling_aet = [self.config.aet]
        for cx in AllStoragePresentationContexts:
            scp.add_supported_context(str(cx.abstract_syntax), list(MOVE_SCP_SYNTAXES))
        inbox = _Inbox(expected=(study, series, _sop_set(sops)), peers=self._pacs_addresses(), spool=spool)
        try:
            server = scp.start_server(
                (self.config.move_host, self.config.move_port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, inbox.on_store)],
            )
            assert server is not None  # block=False returns the running server
        except OSError as exc:
            raise self._error(
                f"C-MOVE: cannot listen on port {self.config.move_port} ({exc.strerror})"
            ) from None
        assert server is not None  # start_server(block=False) returns the running server
        try:
            model = StudyRootQueryRetrieveInformationModelMove
            assoc = self._association(self._single(model))
            query = self._retrieve_query(study, series, sops)
            responses = assoc.send_c_move(query, self.config.calling_aet, model)
            yield from self._collect("C-MOVE", responses, QR_MOVE_SERVICE_CLASS_STATUS, inbox, partial)
        finally:
            server.shutdown()

    def _pacs_addresses(self) -> frozenset[str]:
        """The IP addresses of the configured PACS host, which C-MOVE's stores come from."""
        try:
            found = socket.getaddrinfo(self.config.host, None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            raise self._error(f"cannot resolve {self.config.host}: {exc.strerror}") from None
        return frozenset(str(info[4][0]) for info in found)

    def retrieve(
        self, study: str, series: str, sops: Instances = None, sop_classes: frozenset[str] = frozenset(),
        partial: list[str] | None = None,
    ) -> Iterator[Dataset]:
        """C-GET or C-MOVE, as the config's ``retrieve`` says (see ``get``)."""
        if self.config.retrieve == "move":
            return self.move(study, series, sops, partial)
        return self.get(study, series, sops, sop_classes, partial)

    def retrieve_files(
        self, study: str, series: str, sops: Instances, sop_classes: frozenset[str], spool: Path,
        partial: list[str] | None = None,
    ) -> Iterator[tuple[str, Path]]:
        """``retrieve`` into files of ``spool`` (see ``get_files``)."""
        if self.config.retrieve == "move":
            return self._move(study, series, sops, partial, spool)
        return self.get_files(study, series, sops, sop_classes, spool, partial)

    def _collect(
        self,
        service: str,
        responses: Iterable[tuple[Dataset, Any]],
        table: dict[int, tuple[str, str]],
        inbox: _Inbox | None = None,
        partial: list[str] | None = None,
    ) -> Iterator[Any]:
        """Yield what sub-operations delivered while reading a retrieve's responses.

        Stopping the iteration early aborts the association: the PACS would otherwise
        keep sending into an association the next call wants to use. A failure status
        raises ``RetrieveRefused``; failed sub-operations go to ``partial`` when given.
        """
        inbox = inbox or self._inbox
        inbox.datasets.clear()
        finished = False
        try:
            for status, _ in responses:
                if "Status" not in status:
                    raise self._no_response(service)
                yield from inbox.drain()
                category = _category(status.Status, table)
                if category == "Pending":
                    continue
                failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
                detail = f", {failed} sub-operations failed" if failed else ""
                line = f"{self.name}: {service} failed: {_status_text(status.Status, table)}{detail}"
                if category not in ("Success", "Warning"):
                    raise RetrieveRefused(line)
                # 0xB000 says some sub-operations failed even when the optional count is absent.
                if failed or status.Status == 0xB000:
                    if partial is None:
                        raise RetrieveRefused(line)
                    partial.append(line)
            yield from inbox.drain()
            finished = True
        finally:
            if not finished and self._assoc is not None:
                self._assoc.abort()
                self._assoc = None
