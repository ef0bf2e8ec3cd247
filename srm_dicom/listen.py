"""DICOM push: a C-STORE SCP that registers every image it receives.

A modality or the PACS itself can push images here. When the PACS is the one pushing
(``store_to_pacs = false``), images are only cataloged; otherwise they are also stored
into the PACS, so a modality can send to the storage element alone.

Pushes go through the registration pipeline of ``mdm register`` (``Registrar.register_many``):
one thread registers, taking every push waiting (from all associations) as one batch: one
catalog lookup, one bulk key request per key server, one transaction. Each C-STORE is answered
once its image is cataloged, with its own status. A series' volume is planned once pushes
pause (``PLAN_AFTER``), not from the whole series at every image (n(n-1)/2 rows for an n-image
series): until then its 3D lists no size, as a series not yet one volume does (README,
"What registration does to an image").
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from srm_dicom.catalog import Catalog
from srm_dicom.config import Config
from srm_dicom.errors import CatalogUnavailable, ConfigError, InvalidInput, MdmError, PacsError, catalog_unavailable
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pacs import nodelay
from srm_dicom.pacs.client import PacsClient
from srm_dicom.prepare import check_complete
from srm_dicom.register import BATCH, Registrar, Result, Summary

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000  # "Error: cannot understand": the data set cannot be named
STATUS_OUT_OF_RESOURCES = 0xA700  # the PACS behind us refused the image, or the catalog is unavailable
# The series volumes pushed into are planned once no push came for this long, and at the
# latest this often while pushes keep coming (seconds).
PLAN_AFTER = 0.5
PLAN_EVERY = 10.0


@dataclass
class _Push:
    """One received image on its way to the registering thread, and its answer."""

    ds: Dataset
    sender: str
    done: threading.Event = field(default_factory=threading.Event)
    status: int = STATUS_SUCCESS
    unexpected: BaseException | None = None  # a bug: raised in the association's thread, as before


class PushListener:
    """Runs the storage SCP in a background thread, and the one thread that registers what
    every association receives."""

    def __init__(self, config: Config, catalog: Catalog) -> None:
        nodelay.install()
        self._config = config
        self._pacs = PacsClient(config.pacs) if config.listen.store_to_pacs else None
        self._registrar = Registrar(config, catalog, self._pacs, KeystoreClient.from_config(config))
        self._pushes: queue.Queue[_Push | None] = queue.Queue()
        self._registering: threading.Thread | None = None
        self.summary = Summary()
        self._ae = AE(ae_title=config.listen.aet)
        self._ae.maximum_pdu_size = 0
        # Accept every storage SOP class in whatever transfer syntax the sender has: the
        # image is registered as received, never transcoded.
        self._ae.supported_contexts = [
            build_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts
        ] + [build_context(Verification)]
        self._server: ThreadedAssociationServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.server_address[:2]

    def start(self) -> None:
        listen = self._config.listen
        self._registering = threading.Thread(target=self._register_pushes, name="mdm-push-register", daemon=True)
        self._registering.start()
        try:
            self._server = self._ae.start_server(
                (listen.host, listen.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as exc:
            self._stop_registering()
            raise ConfigError(f"cannot listen on {listen.host}:{listen.port}: {exc.strerror}") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop_registering()  # after the pushes in flight: their volumes are planned
        if self._pacs is not None:
            self._pacs.close()

    def __enter__(self) -> PushListener:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _stop_registering(self) -> None:
        if self._registering is not None:
            self._pushes.put(None)
            self._registering.join()
            self._registering = None

    def _on_store(self, event: Event) -> int:
        """An association's thread: hand the image to the registering thread, answer its status."""
        sender = event.assoc.requestor.ae_title
        try:
            ds = _received(event)
        except InvalidInput as exc:
            return self._refuse(sender, exc, STATUS_CANNOT_UNDERSTAND)
        push = _Push(ds, sender)
        self._pushes.put(push)
        push.done.wait()
        if push.unexpected is not None:
            raise push.unexpected
        return push.status

    def _register_pushes(self) -> None:
        """The registering thread: pushes in batches, until ``stop``."""
        push = self._pushes.get()
        while push is not None:
            push = self._until_a_pause(push)

    def _until_a_pause(self, first: _Push) -> _Push | None:
        """Register pushes as they come, inside one registrar batch, until they pause for
        ``PLAN_AFTER`` or ``PLAN_EVERY`` has passed: the batch's end plans the series volumes.
        The next push to register (None: the listener stops)."""
        started, group = time.monotonic(), [first]
        following: _Push | None = None
        stopping = False
        try:
            with self._registrar.batch():
                while True:
                    stopping = self._gather(group)
                    self._register(group)
                    if stopping:
                        break
                    try:
                        following = self._pushes.get(timeout=PLAN_AFTER)
                    except queue.Empty:
                        break
                    if following is None:
                        stopping = True
                        break
                    if time.monotonic() - started > PLAN_EVERY:
                        break
                    group, following = [following], None
        except Exception as exc:  # noqa: BLE001 - planning failed: done again at the series' next image
            unavailable = exc if isinstance(exc, MdmError) else catalog_unavailable(exc)
            if unavailable is None:  # a bug: logged whole, and the pushes go on being answered
                log.exception("series volumes not planned")
            else:
                log.error("series volumes not planned: %s", unavailable)
        if stopping:
            return None
        return following if following is not None else self._pushes.get()

    def _gather(self, group: list[_Push]) -> bool:
        """Add the pushes waiting to ``group``, up to a registrar batch; True if ``stop`` was asked."""
        while len(group) < BATCH:
            try:
                push = self._pushes.get_nowait()
            except queue.Empty:
                return False
            if push is None:
                return True
            group.append(push)
        return False

    def _register(self, group: list[_Push]) -> None:
        """Register a group of pushes as one batch, and answer each."""
        results: list[Result] = []
        failure: MdmError | None = None
        unexpected: BaseException | None = None
        try:
            for result in self._registrar.register_many([push.ds for push in group],
                                                        store_in_pacs=self._pacs is not None):
                results.append(result)
        except MdmError as exc:  # the PACS failed: those not stored yet
            failure = exc
        except sqlite3.OperationalError as exc:  # the catalog locked: the modality sends again later
            failure = catalog_unavailable(exc)
            if failure is None:
                unexpected = exc
        except Exception as exc:  # noqa: BLE001 - a bug: pynetdicom answers 0xC211
            log.error("push registration failed by a bug, answered 0xC211: %s", _where(exc))
            unexpected = exc
        for index, push in enumerate(group):
            if index < len(results):
                result = results[index]
                if result.error is None:
                    assert result.outcome is not None  # a result without an error has its outcome
                    self.summary.add(result.outcome)
                    log.info("push from %s: %s", push.sender, result.outcome.value)
                else:
                    push.status = self._refuse(push.sender, result.error, _status(result.error))
            elif failure is not None:
                push.status = self._refuse(push.sender, failure, _status(failure))
            else:
                push.unexpected = unexpected
            push.done.set()

    def _refuse(self, sender: str, error: MdmError, status: int) -> int:
        """One reason line in the log and the summary, and the C-STORE status the sender gets."""
        level = logging.WARNING if status == STATUS_CANNOT_UNDERSTAND else logging.ERROR
        log.log(level, "push from %s refused: %s", sender, error)
        self.summary.fail("push", str(error))
        return status


def _status(error: MdmError) -> int:
    """0xA700 when sending again later may succeed (the PACS, the catalog), 0xC000 otherwise."""
    return STATUS_OUT_OF_RESOURCES if isinstance(error, (PacsError, CatalogUnavailable)) else STATUS_CANNOT_UNDERSTAND


def _where(exc: BaseException) -> str:
    """The exception's class and the code it passed through, innermost first, without its message:
    pynetdicom's logger is quiet (``srm_dicom.pacs``), and a message or a source line may quote a
    value of the pushed data set, which is patient data."""
    frames = traceback.extract_tb(exc.__traceback__)
    path = " < ".join(f"{_module(frame.filename)}:{frame.lineno} {frame.name}" for frame in reversed(frames))
    return f"{exc.__class__.__name__} at {path}" if path else exc.__class__.__name__


def _module(filename: str) -> str:
    """A source file's path from its package down (``srm_dicom/prepare.py``), not the site's."""
    parts = Path(filename).parts
    for anchor, skip in (("srm_dicom", 0), ("site-packages", 1)):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + skip:])
    return parts[-1]


def _received(event: Event) -> Dataset:
    """The pushed data set with its file meta. pynetdicom decodes it on first access (inflating a
    deflated one), and a corrupt one then raises whatever pydicom or zlib raise: here, at the
    boundary, that is one reason, as ``prepare.read_dicom`` makes of a corrupt or truncated file."""
    try:
        ds = event.dataset
    except Exception as exc:  # pydicom and zlib raise many types on corrupt input
        raise InvalidInput(f"corrupt or truncated DICOM data set ({exc.__class__.__name__})") from None
    check_complete(ds)  # pydicom stops quietly at the end of a short data set, as of a short file
    ds.file_meta = event.file_meta
    return ds

