"""Fuzzing the DICOM reading and registration path (issue 12: 0 crashes, 0 hangs, 0 tracebacks).

Hypothesis mutates real files where parsers break (``mutants.py``). Each mutant goes the whole way a file goes in
``mdm register`` against real key servers and a real SQLite catalog (the PACS store is the
one step left out): ``read_dicom``, then ``Registrar.register``. The only outcomes allowed
are a registration or an ``MdmError`` (one reason line); anything else is a crash, a case
over ``CASE_TIMEOUT`` a hang, a log record with a traceback a failure.

CI runs ``FUZZ_EXAMPLES`` (default 200) cases; the full run is
``FUZZ_EXAMPLES=10000 pytest tests/fuzz -q`` (README, Tests).
"""

from __future__ import annotations

import logging
import os
import signal
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from mutants import FOUND, mutants

from peers import Peer
from sites import write_site_config
from srm_dicom.catalog import open_catalog
from srm_dicom.config import load_config
from srm_dicom.errors import MdmError
from srm_dicom.keystore.client import KeystoreClient
from srm_dicom.prepare import read_dicom
from srm_dicom.register import Registrar

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
CASE_TIMEOUT = 20  # seconds: far above any real file's registration, even on a loaded machine


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"a case took more than {CASE_TIMEOUT} s")


@pytest.fixture(scope="module")
def registrar(key_servers, tmp_path_factory) -> Iterator[Registrar]:  # type: ignore[no-untyped-def]
    workdir = tmp_path_factory.mktemp("fuzz")
    nowhere = Peer("none", "NO_PACS", "127.0.0.1", 9, "MDM", 0, workdir / "pacs", lambda: None)
    config = load_config(write_site_config(workdir / "site", nowhere, key_servers))
    catalog = open_catalog(config)
    try:
        yield Registrar(config, catalog, None, KeystoreClient.from_config(config))
    finally:
        catalog.close()


@dataclass
class Tally:
    registered: int = 0
    refused: int = 0


TALLY = Tally()


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@example(data=FOUND[0])
@example(data=FOUND[1])
@example(data=FOUND[2])
@example(data=FOUND[3])
@example(data=FOUND[4])
@given(data=mutants())
def test_a_mutated_file_is_registered_or_refused_with_one_reason(registrar, tmp_path, caplog, data):
    path = tmp_path / "mutant.dcm"
    path.write_bytes(data)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT)
    caplog.clear()
    try:
        with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
            warnings.simplefilter("ignore")  # pydicom warns about every odd value it still reads
            registrar.register(read_dicom(path), store_in_pacs=False)
        TALLY.registered += 1
    except MdmError as exc:
        reason = str(exc)
        assert reason and "\n" not in reason and "Traceback" not in reason, reason
        TALLY.refused += 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_the_fuzzing_reached_both_outcomes() -> None:
    """The mutants exercised the registration as well as the refusals (a fuzzer whose every
    case fails at the first byte tests nothing); printed for the closing note."""
    print(f"fuzz: {TALLY.registered} registered, {TALLY.refused} refused with one reason")
    assert TALLY.registered > 0 and TALLY.refused > 0
