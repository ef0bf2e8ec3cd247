"""The PostgreSQL backend's own behaviour, beyond the contract every backend meets."""

import threading

import pytest

import postgres
from srm_dicom.catalog import open_catalog
from srm_dicom.config import parse_config
from srm_dicom.errors import CatalogUnavailable


@pytest.fixture
def config(tmp_path):
    with postgres.database() as url:
        yield parse_config({"catalog": {"backend": "postgresql", "url": url}}, tmp_path)


def test_a_deadlock_between_two_writers_is_named_as_such_and_the_other_writer_commits(config):
    """Two transactions locking two stage jobs in opposite orders: the server breaks the
    deadlock by rolling one back, which is a retryable 503 with its cause named, not a
    database that "does not answer"."""
    catalogs = [open_catalog(config) for _ in range(2)]
    try:
        catalogs[0].stages.enqueue_jobs({"a": "s", "b": "s"})
        both_hold_one = threading.Barrier(2, timeout=10)
        outcomes: dict[int, BaseException | None] = {}

        def writer(n: int, first: str, second: str) -> None:
            stages = catalogs[n].stages
            try:
                with catalogs[n].backend.transaction():
                    stages.enqueue_jobs({first: "s"})  # queued already: its row is locked, no more
                    both_hold_one.wait()
                    stages.enqueue_jobs({second: "s"})
                outcomes[n] = None
            except BaseException as exc:  # noqa: BLE001 - the test reports what each writer met
                outcomes[n] = exc

        threads = [threading.Thread(target=writer, args=args) for args in ((0, "a", "b"), (1, "b", "a"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        failed = [exc for exc in outcomes.values() if exc is not None]
        assert len(outcomes) == 2 and len(failed) == 1, outcomes
        assert isinstance(failed[0], CatalogUnavailable)
        assert "rolled back a transaction that met another writer's (40P01 DeadlockDetected)" in str(failed[0])
    finally:
        for catalog in catalogs:
            catalog.close()
