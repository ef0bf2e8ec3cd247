"""Fuzzing DICOM push into a running ``mdm listen`` (issue 12: 0 crashes, 0 hangs, 0 tracebacks).

The mutants of ``mutants.py`` go over the wire as they are: pynetdicom sends each file's
data set bytes without decoding them (``STORE_SEND_CHUNKED_DATASET``), as a broken
modality would. The listener is the real command (real key servers, a real SQLite catalog;
images cataloged only, ``store_to_pacs = false``). Each C-STORE must be answered within
``CASE_TIMEOUT`` with a status the listener gives on purpose (success, 0xC000 "cannot
understand", 0xA700), never pynetdicom's 0xC211 "exception in the handler", and the
listener's log must hold no traceback. Mutants whose file meta the sender itself cannot
read are never sent (they test pynetdicom's sender, not us).

CI runs ``FUZZ_PUSH_EXAMPLES`` (default 60) cases; the long run is
``FUZZ_PUSH_EXAMPLES=10000 pytest tests/fuzz/test_fuzz_listen.py -q -s`` (README, Tests).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, reject, settings
from mutants import FOUND, SEEDS, mutants
from pydicom import dcmread
from pynetdicom import AE, _config
from pynetdicom.association import Association

from peers import Peer, free_port
from sites import write_site_config

EXAMPLES = int(os.environ.get("FUZZ_PUSH_EXAMPLES", "60"))
CASE_TIMEOUT = 20  # seconds: far above any real image's registration, even on a loaded machine
DELIBERATE = {0x0000: "registered", 0xC000: "refused", 0xA700: "refused (PACS)"}


@dataclass
class Listener:
    process: subprocess.Popen[str]
    port: int
    log: Path
    read: int = 0  # how much of the log the cases before have seen
    association: Association | None = None
    outcomes: dict[str, int] = field(default_factory=dict)

    def new_log(self) -> str:
        text = self.log.read_text(errors="replace")
        new, self.read = text[self.read:], len(text)
        return new


def _contexts() -> list[tuple[str, str]]:
    """Each of the seeds' SOP classes in each of their transfer syntaxes, one context each (an
    SCP accepts one syntax per context)."""
    classes, syntaxes = set(), set()
    for seed in SEEDS:
        meta = dcmread(io.BytesIO(seed.data), stop_before_pixels=True).file_meta
        classes.add(str(meta.MediaStorageSOPClassUID))
        syntaxes.add(str(meta.TransferSyntaxUID))
    return [(sop_class, syntax) for sop_class in sorted(classes) for syntax in sorted(syntaxes)]


@pytest.fixture(scope="module")
def listener(key_servers, tmp_path_factory) -> Iterator[Listener]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("fuzz-listen")
    nowhere = Peer("none", "NO_PACS", "127.0.0.1", 9, "MDM", 0, workdir / "pacs", lambda: None)
    port = free_port()
    config = write_site_config(workdir / "site", nowhere, key_servers, store_to_pacs=False, listen_port=port)
    log = workdir / "listen.log"
    process = subprocess.Popen([shutil.which("mdm") or "mdm", "listen"], env={**os.environ, "MDM_CONFIG": str(config)},
                               stdout=subprocess.PIPE, stderr=log.open("w"), text=True, stdin=subprocess.DEVNULL)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("listening as"), line + log.read_text()
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    found = Listener(process, port, log)
    try:
        yield found
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if found.association is not None:
            found.association.release()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        print(f"push fuzz: {found.outcomes}")
        assert "Traceback" not in log.read_text()


def _associate(listener: Listener) -> Association:
    if listener.association is None or not listener.association.is_established:
        ae = AE(ae_title="FUZZER")
        ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = CASE_TIMEOUT
        for sop_class, syntax in _contexts():
            ae.add_requested_context(sop_class, syntax)
        listener.association = ae.associate("127.0.0.1", listener.port, ae_title="MDM_PUSH")
        assert listener.association.is_established, "the listener refused an association"
    return listener.association


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@example(data=FOUND[0])
@example(data=FOUND[1])
@example(data=FOUND[2])
@example(data=FOUND[3])
@example(data=FOUND[4])
@given(data=mutants())
def test_a_pushed_mutant_is_registered_or_refused_on_purpose(listener, tmp_path, data):
    path = tmp_path / "mutant.dcm"
    path.write_bytes(data)
    association = _associate(listener)
    try:
        answer = association.send_c_store(path)
    except Exception:  # noqa: BLE001 - pydicom raises many types on a corrupt file meta
        reject()  # the sender cannot read this file's meta or has no context for it: never sent
    status = int(answer.Status) if answer is not None and "Status" in answer else None
    log = listener.new_log()
    assert "Traceback" not in log and "Exception in the handler" not in log, log[-3000:]
    assert status in DELIBERATE, f"status {status if status is None else hex(status)}; log: {log[-2000:]}"
    listener.outcomes[DELIBERATE[status]] = listener.outcomes.get(DELIBERATE[status], 0) + 1
