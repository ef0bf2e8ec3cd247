"""DICOM push: a C-STORE SCP that registers every image it receives.

A modality or the PACS itself can push images here. When the PACS is the one pushing
(``store_to_pacs = false``), images are only cataloged; otherwise they are also stored
into the PACS, so a modality can send to the storage element alone.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from srm_dicom.catalog import Catalog
from srm_dicom.config import Config
from srm_dicom.errors import ConfigError, InvalidInput, MdmError, PacsError, catalog_unavailable
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.pacs import nodelay
from srm_dicom.pacs.client import PacsClient
from srm_dicom.register import Registrar, Summary, check_complete

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_CANNOT_UNDERSTAND = 0xC000  # "Error: cannot understand": the data set cannot be named
STATUS_OUT_OF_RESOURCES = 0xA700  # the PACS behind us refused the image


class PushListener:
    """Runs the storage SCP in a background thread; one registrar, used by one association at a time."""

    def __init__(self, config: Config, catalog: Catalog) -> None:
        nodelay.install()
        self._config = config
        self._pacs = PacsClient(config.pacs) if config.listen.store_to_pacs else None
        self._registrar = Registrar(config, catalog, self._pacs, KeystoreClient.from_config(config))
        self._lock = threading.Lock()
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
        try:
            self._server = self._ae.start_server(
                (listen.host, listen.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {listen.host}:{listen.port}: {exc.strerror}") from None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._pacs is not None:
            self._pacs.close()

    def __enter__(self) -> PushListener:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _on_store(self, event: Event) -> int:
        try:
            ds = _received(event)
        except InvalidInput as exc:
            return self._refuse(event, exc, STATUS_CANNOT_UNDERSTAND)
        with self._lock:
            try:
                outcome = self._registrar.register(ds, store_in_pacs=self._pacs is not None)
            except PacsError as exc:
                return self._refuse(event, exc, STATUS_OUT_OF_RESOURCES)
            except MdmError as exc:
                return self._refuse(event, exc, STATUS_CANNOT_UNDERSTAND)
            except sqlite3.OperationalError as exc:  # the catalog locked: the modality sends again later
                if (unavailable := catalog_unavailable(exc)) is None:
                    raise
                return self._refuse(event, unavailable, STATUS_OUT_OF_RESOURCES)
            self.summary.add(outcome)
            log.info("push from %s: %s", event.assoc.requestor.ae_title, outcome.value)
        return STATUS_SUCCESS

    def _refuse(self, event: Event, error: MdmError, status: int) -> int:
        """One reason line in the log and the summary, and the C-STORE status the sender gets."""
        level = logging.WARNING if status == STATUS_CANNOT_UNDERSTAND else logging.ERROR
        log.log(level, "push from %s refused: %s", event.assoc.requestor.ae_title, error)
        self.summary.fail("push", str(error))
        return status


def _received(event: Event) -> Dataset:
    """The pushed data set with its file meta. pynetdicom decodes it on first access (inflating a
    deflated one), and a corrupt one then raises whatever pydicom or zlib raise: here, at the
    boundary, that is one reason, as ``register.read_dicom`` makes of a corrupt or truncated file."""
    try:
        ds = event.dataset
    except Exception as exc:  # pydicom and zlib raise many types on corrupt input
        raise InvalidInput(f"corrupt or truncated DICOM data set ({exc.__class__.__name__})") from None
    check_complete(ds)  # pydicom stops quietly at the end of a short data set, as of a short file
    ds.file_meta = event.file_meta
    return ds

