"""The event bus: what a timed call reports, and that listeners never break the emitter."""

import pytest

from srm_dicom import events
from srm_dicom.events import Arg, KeyServerCall, PacsCall, timed


@pytest.fixture
def heard():
    got: list = []
    stop = events.subscribe(got.append)
    yield got
    stop()


class Peer:
    @timed(PacsCall, operation="C-ECHO")
    def echo(self, fail: bool = False) -> str:
        if fail:
            raise ConnectionError("down")
        return "ok"

    @timed(PacsCall, operation="C-GET")
    def get(self, count: int):
        yield from range(count)
        if count == 0:
            raise LookupError("nothing")

    @timed(KeyServerCall, url=Arg("url"), operation=Arg("method"), answered=lambda e: isinstance(e, KeyError))
    def request(self, method: str, url: str, missing: bool = False) -> None:
        if missing:
            raise KeyError(url)


def test_a_timed_call_reports_its_result_and_failure_by_class_name(heard):
    assert Peer().echo() == "ok"
    with pytest.raises(ConnectionError):
        Peer().echo(fail=True)
    assert [(e.operation, e.error) for e in heard] == [("C-ECHO", None), ("C-ECHO", "ConnectionError")]
    assert all(isinstance(e.seconds, float) and e.seconds >= 0 for e in heard)


def test_a_generator_reports_when_its_iteration_ends_not_when_called(heard):
    iterator = Peer().get(3)
    assert heard == []
    assert list(iterator) == [0, 1, 2]
    with pytest.raises(LookupError):
        list(Peer().get(0))
    abandoned = Peer().get(5)
    next(abandoned)
    abandoned.close()  # the consumer stopped early: no failure of the peer
    assert [e.error for e in heard] == [None, "LookupError", None]


def test_fields_come_from_the_call_and_a_proper_answer_is_no_failure(heard):
    Peer().request("GET", "https://ks1")
    with pytest.raises(KeyError):
        Peer().request("PUT", url="https://ks2", missing=True)
    got = [(e.url, e.operation, e.error) for e in heard]
    assert got == [("https://ks1", "GET", None), ("https://ks2", "PUT", None)]


def test_a_failing_listener_is_logged_and_the_others_still_hear(heard, caplog):
    def broken(event):
        raise RuntimeError("listener bug")

    stop = events.subscribe(broken)
    try:
        assert Peer().echo() == "ok"
    finally:
        stop()
    assert len(heard) == 1 and "listener failed" in caplog.text
    Peer().echo()
    assert len(heard) == 2  # unsubscribed listeners are gone
