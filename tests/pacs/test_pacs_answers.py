"""The reactor of a real association leaves answers in the queue for the caller."""

from __future__ import annotations

import time

from pynetdicom.dimse_primitives import C_ECHO, C_FIND

from peers import Peer
from srm_dicom.pacs.client import PacsClient


def test_a_non_blocking_read_leaves_answers_and_takes_requests(embedded_pacs: Peer) -> None:
    with PacsClient(embedded_pacs.pacs_config()) as client:
        client.echo()
        assoc = client._assoc
        assoc._reactor_checkpoint.clear()  # hold the reactor, as pynetdicom does around a request
        time.sleep(0.05)
        answer, request = C_FIND(), C_ECHO()
        answer.MessageIDBeingRespondedTo, answer.Status = 1, 0xFF00
        request.MessageID = 7
        assoc.dimse.msg_queue.put((1, answer))
        assert assoc.dimse.get_msg(block=False) == (None, None)  # what the reactor would see
        assert assoc.dimse.get_msg(block=True) == (1, answer)  # what the caller gets
        assoc.dimse.msg_queue.put((1, request))
        assert assoc.dimse.get_msg(block=False) == (1, request)  # requests still reach the reactor
        assoc._reactor_checkpoint.set()
        client.echo()  # and the association still works
