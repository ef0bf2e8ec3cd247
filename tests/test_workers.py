"""The protection pool: real worker processes give the bytes protection in process gives."""

from __future__ import annotations

import io
import os
import signal
import uuid
from concurrent.futures.process import BrokenProcessPool

import pytest
from pydicom import dcmread

from srm_dicom import workers
from srm_dicom.anonymization_options import AnonymizationOptions
from srm_dicom.crypto.container import decrypt_bytes, new_file_key
from srm_dicom.errors import PacsError
from srm_dicom.protect import protect_image
from srm_dicom.synthetic import make_series

SECRET = b"workers test secret"


def part10(ds) -> bytes:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_a_worker_protects_bytes_and_datasets_exactly_as_protection_in_process(tmp_path):
    ds = dcmread(io.BytesIO(part10(make_series(slices=2, size=32, seed="workers")[0])))  # as read from a file
    key, guid, options = new_file_key(), str(uuid.uuid4()), AnonymizationOptions()
    expected = protect_image(ds, SECRET, options, key, guid, 3)
    from_bytes = workers.submit(workers.protect, workers.ProtectTask(part10(ds), SECRET, options, key, guid, 3))
    output = tmp_path / "slice"
    to_file = workers.submit(workers.protect, workers.ProtectTask(ds, SECRET, options, key, guid, 3, str(output)))
    sent, written = from_bytes.result(), to_file.result()
    assert sent.payload == expected.payload and written.payload is None
    assert output.read_bytes() == expected.payload and os.stat(output).st_mode & 0o777 == 0o600
    for result in (sent, written):
        assert (result.size, result.adler32, result.sha256) == (expected.size, expected.adler32, expected.sha256)
        assert list(result.erased) == expected.erased
    served = dcmread(io.BytesIO(decrypt_bytes(key, expected.payload)))
    assert str(served.get("PatientName", "")) != str(ds.PatientName)


def test_a_worker_reads_a_spooled_file_and_refuses_one_that_is_not_the_image_its_name_says(tmp_path):
    first, second = make_series(slices=2, size=32, seed="spooled")
    spooled = tmp_path / "spool" / str(first.SOPInstanceUID)
    spooled.parent.mkdir()
    spooled.write_bytes(part10(first))
    key, guid, options = new_file_key(), str(uuid.uuid4()), AnonymizationOptions()
    expected = protect_image(dcmread(spooled), SECRET, options, key, guid, 3)
    uids = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID), str(first.SOPInstanceUID))
    read = workers.submit(workers.protect, workers.ProtectTask(spooled, SECRET, options, key, guid, 3, expected=uids))
    assert read.result().payload == expected.payload
    other = (*uids[:2], str(second.SOPInstanceUID))
    refused = workers.submit(workers.protect, workers.ProtectTask(spooled, SECRET, options, key, guid, 3,
                                                                  str(tmp_path / "out"), expected=other))
    with pytest.raises(PacsError, match="another image than the one asked for"):
        refused.result()
    assert not (tmp_path / "out").exists()


def test_the_pool_is_sized_to_the_cores_and_runs_in_other_processes():
    workers.warm()
    pids = {workers.submit(os.getpid).result() for _ in range(4 * workers.size())}
    assert os.getpid() not in pids and 1 <= len(pids) <= workers.size() == len(os.sched_getaffinity(0))


def test_a_worker_killed_during_its_task_fails_that_task_and_the_next_task_gets_a_new_pool():
    workers.warm()
    with pytest.raises(BrokenProcessPool):
        workers.submit(signal.raise_signal, signal.SIGKILL).result(timeout=30)
    first = workers.submit(os.getpid).result(timeout=30)
    assert first != os.getpid() and workers.submit(os.getpid).result(timeout=30)


def test_the_fork_server_s_warm_up_protects_its_sample_and_a_failing_one_is_ignored(monkeypatch):
    """Every worker is forked from a fork server that protected a sample image once (so the
    first task does not pay for lazy imports); were the sample refused, that would be silent."""
    from srm_dicom import worker_start

    sample = worker_start._sample()
    done = workers.protect(workers.ProtectTask(sample, b"\0" * 32, AnonymizationOptions(), new_file_key(),
                                               str(uuid.uuid4()), 1))
    assert done.payload and done.size == len(done.payload)

    def refused(task):
        raise PacsError("refused")

    monkeypatch.setattr(worker_start, "protect", refused)
    worker_start._protect_once()  # logged at debug, never raised into the fork server
