"""Staging jobs shared by several front ends on one catalog (the stage store's jobs, README
"Several front ends"), over every installed backend: each front end is a catalog of its
own on the same database, as two ``mdm serve`` processes are."""

import threading
import time
import uuid
from collections import Counter

import pytest

from srm_dicom.catalog import COMPLETED, FAILED, STARTED, SUBMITTED, StageFile, StageRequest, open_catalog
from srm_dicom.config import parse_config


@pytest.fixture
def config(tmp_path, catalog_section):
    return parse_config({"catalog": catalog_section}, tmp_path)


@pytest.fixture
def front_ends(config):
    """Two front ends' catalogs on one database."""
    first = open_catalog(config)
    second = open_catalog(config)
    yield first.stages, second.stages
    second.close()
    first.close()


def guids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def test_a_job_is_queued_once_for_the_site_and_claimed_by_one_holder(front_ends):
    a, b = front_ends
    series = guids(3)
    assert a.enqueue_jobs(dict.fromkeys(series, "study/series")) == dict.fromkeys(series, 1)
    assert b.enqueue_jobs(dict.fromkeys(series, "study/series")) == dict.fromkeys(series, 1)  # joins, no new job
    claimed = a.claim_jobs("a", lease=30, limit=100)
    assert sorted(job.guid for job in claimed) == sorted(series) and {job.holder for job in claimed} == {"a"}
    assert all(job.state == STARTED and job.lease_expires > time.time() for job in claimed)
    assert b.claim_jobs("b", lease=30, limit=100) == []
    assert b.enqueue_jobs({series[0]: "study/series"}) == {series[0]: 1}  # running: still the same attempt
    assert b.jobs(series)[series[0]].holder == "a"


def test_a_claim_takes_the_oldest_job_and_the_others_of_its_batch_up_to_the_limit(front_ends):
    a, _ = front_ends
    first, other, later = guids(3), guids(2), guids(2)
    a.enqueue_jobs(dict.fromkeys(first, "s1"))
    a.enqueue_jobs(dict.fromkeys(other, "s2"))
    a.enqueue_jobs(dict.fromkeys(later, "s1"))
    claimed = {j.guid for j in a.claim_jobs("a", 30, limit=4)}  # jobs queued at once: in no given order
    assert len(claimed) == 4 and set(first) < claimed
    assert {j.guid for j in a.claim_jobs("a", 30, limit=4)} == set(other)
    assert {j.guid for j in a.claim_jobs("a", 30, limit=4)} == set(later) - claimed
    assert a.claim_jobs("a", 30, limit=4) == []


def test_front_ends_claiming_at_once_never_take_the_same_job(config):
    catalogs = [open_catalog(config) for _ in range(2)]
    try:
        jobs = {guid: f"series-{n % 12}" for n, guid in enumerate(guids(120))}
        catalogs[0].stages.enqueue_jobs(jobs)
        claims: Counter[str] = Counter()
        lock = threading.Lock()

        def claimer(holder: str, stages) -> None:  # type: ignore[no-untyped-def]
            while claimed := stages.claim_jobs(holder, 30, limit=4):
                with lock:
                    claims.update(job.guid for job in claimed)
                stages.finish_jobs(holder, {job.guid: (COMPLETED, None) for job in claimed}, int(time.time()))

        threads = [threading.Thread(target=claimer, args=(f"fe{n}", catalogs[n % 2].stages)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert set(claims) == set(jobs) and set(claims.values()) == {1}
        assert {job.state for job in catalogs[1].stages.jobs(list(jobs)).values()} == {COMPLETED}
    finally:
        for catalog in catalogs:
            catalog.close()


def test_front_ends_queueing_one_series_in_different_orders_at_once_never_fail(config):
    """A slice and then its series read ahead, asked of two front ends at once, queue one
    series' jobs in different orders while a third finishes them: on PostgreSQL rows locked
    in the callers' orders deadlocked, and a GET failed with "catalog unavailable"."""
    catalogs = [open_catalog(config) for _ in range(3)]
    try:
        series = guids(30)
        failures: list[BaseException] = []
        done = threading.Event()

        def queuer(stages, order: list[str]) -> None:  # type: ignore[no-untyped-def]
            try:
                for _ in range(10):
                    stages.enqueue_jobs(dict.fromkeys(order, "study/series"))
            except Exception as failure:  # noqa: BLE001 - the test reports what broke
                failures.append(failure)

        def finisher(stages) -> None:  # type: ignore[no-untyped-def]
            try:
                while not done.is_set():
                    claimed = stages.claim_jobs("finisher", 30, limit=30)
                    outcomes = {job.guid: (COMPLETED, None) for job in reversed(claimed)}
                    stages.finish_jobs("finisher", outcomes, int(time.time()))
            except Exception as failure:  # noqa: BLE001
                failures.append(failure)

        orders = [series[n * 5:] + series[:n * 5] for n in range(5)] + [series[::-1]]
        threads = [threading.Thread(target=queuer, args=(catalogs[n % 2].stages, order))
                   for n, order in enumerate(orders)]
        finishing = threading.Thread(target=finisher, args=(catalogs[2].stages,))
        finishing.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        done.set()
        finishing.join(60)
        assert failures == []
        assert set(catalogs[2].stages.jobs(series)) == set(series)
    finally:
        for catalog in catalogs:
            catalog.close()


def test_a_dead_holders_lease_lapses_and_another_takes_the_job_but_a_renewed_lease_is_not_stolen(front_ends):
    a, b = front_ends
    dead, alive = guids(2), guids(2)
    a.enqueue_jobs(dict.fromkeys(dead, "dead series"))
    a.enqueue_jobs(dict.fromkeys(alive, "live series"))
    assert {j.guid for j in a.claim_jobs("a", lease=1.0, limit=10)} == set(dead)  # a dies holding these
    assert {j.guid for j in a.claim_jobs("a2", lease=1.0, limit=10)} == set(alive)  # a2 keeps working
    assert b.claim_jobs("b", lease=30, limit=10) == []  # both leases still run
    deadline = time.monotonic() + 1.6  # past the dead holder's lease
    while time.monotonic() < deadline:
        assert a.renew_jobs("a2", alive, lease=1.0) == 2
        time.sleep(0.2)
    taken = b.claim_jobs("b", lease=30, limit=10)
    assert {j.guid for j in taken} == set(dead) and {(j.holder, j.attempt) for j in taken} == {("b", 1)}
    assert b.claim_jobs("b", lease=30, limit=10) == []  # the renewed lease holds
    # The dead holder, had it only stalled, can neither renew nor finish what it lost.
    assert a.renew_jobs("a", dead, lease=30) == 0
    a.finish_jobs("a", {guid: (FAILED, "too late") for guid in dead}, int(time.time()))
    assert {(j.state, j.holder) for j in b.jobs(dead).values()} == {(STARTED, "b")}


def test_finishing_sets_every_request_waiting_and_a_finished_job_queues_again_as_the_next_attempt(front_ends):
    a, b = front_ends
    guid, failing = guids(2)
    now = int(time.time())
    for request_id in ("r1", "r2"):
        files = (StageFile(f"/grid/demo/mdm/s/se/{guid}", guid), StageFile(f"/grid/demo/mdm/s/se/{failing}", failing))
        a.add_stage_request(StageRequest(request_id, "bob", now, 600, files))
    a.enqueue_jobs({guid: "s", failing: "s"})
    assert len(b.claim_jobs("b", 30, 10)) == 2
    b.finish_jobs("b", {guid: (COMPLETED, None), failing: (FAILED, "the PACS refused it")}, now)
    for request_id in ("r1", "r2"):
        done, failed = a.stage_request(request_id).files
        assert (done.state, done.pin_expires, failed.state, failed.error) == (
            COMPLETED, now + 600, FAILED, "the PACS refused it")
    found = a.jobs([guid, failing])
    assert (found[guid].state, found[guid].holder, found[failing].error) == (COMPLETED, None, "the PACS refused it")
    assert a.enqueue_jobs({guid: "s"}) == {guid: 2}
    assert (a.jobs([guid])[guid].state, a.jobs([guid])[guid].error) == (SUBMITTED, None)


def test_a_released_claim_is_taken_at_once_by_another_front_end(front_ends):
    a, b = front_ends
    batch = guids(2)
    a.enqueue_jobs(dict.fromkeys(batch, "s"))
    a.claim_jobs("a", 30, 10)
    b.release_jobs("someone else", batch)  # only the holder gives a claim back
    assert b.claim_jobs("b", 30, 10) == []
    a.release_jobs("a", batch)
    assert {j.guid for j in b.claim_jobs("b", 30, 10)} == set(batch)
