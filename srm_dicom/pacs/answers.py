"""Keep pynetdicom's reactor thread off the answers a caller is waiting for.

pynetdicom 3.0.4 pauses an association's reactor before each request by clearing an event
and waiting for a flag the reactor sets at the top of its loop. The flag still set by the
reactor's previous pass lets a request go out while the reactor is past that point; the
reactor then takes the peer's first answer off the queue and drops it: a C-FIND match goes
missing, silently, or a C-STORE answer does and the call times out. Seen once in about 600
operations on a loaded machine. The reactor only has business with requests (a C-STORE
sub-operation during our C-GET is read by the caller's own loop), so its non-blocking
reads are made to leave answers in the queue for the caller.
"""

from __future__ import annotations

from pynetdicom.association import Association


def _is_answer(message: object) -> bool:
    return getattr(message, "Status", None) is not None


def keep_answers_for_the_caller(assoc: Association) -> None:
    dimse = assoc.dimse
    waiting_get = dimse.get_msg
    messages = dimse.msg_queue

    def get_msg(block: bool = False):  # noqa: ANN202 - pynetdicom's (context id, message) pair
        if block:
            return waiting_get(block=True)
        with messages.mutex:  # peek and take as one step: no answer slips through in between
            if not messages.queue or _is_answer(messages.queue[0][1]):
                return None, None
            item = messages.queue.popleft()
            messages.not_full.notify()
            return item

    dimse.get_msg = get_msg  # type: ignore[method-assign]  # the point: replace pynetdicom's reader
