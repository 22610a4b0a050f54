"""worker/requests.py without processes: every request's id, deadline, refusal and resend,
over stand-in links to two servers (tests/standins.py).

What a user relies on: a wait that passes its deadline names the server that did not
answer and its address; a refused request raises with the server's reason, and so does
a link whose handshake was refused (CurveZMQ); a request whose connection was lost is
sent again, byte for byte, once; an answer to a request no longer waited for is dropped;
a wait stops at once when the job is stopping.
"""
import numpy as np
import pytest

from common.wire import codec
from common.wire.protocol import ERROR, PULL, PUSH
from tests import standins
from tests.standins import answer, rid_of
from worker.requests import DeadlineError, RemoteError

PLACEMENT = standins.PLACEMENT
make = standins.client_parts


def test_a_wait_past_its_deadline_names_the_silent_server():
    req, chunks, reader = make(timeout=0.2)
    reader.expect(np.zeros(12))
    req.send(1, PUSH, 5, answers=chunks.ids_of(1))
    with pytest.raises(DeadlineError, match=r"no answer to push \(step 5\) .* from server 1 at tcp://s1"):
        req.wait(PUSH, 5, reader)


def test_a_refusal_raises_with_the_server_and_its_reason():
    req, chunks, reader = make()
    reader.expect(np.zeros(12))
    req.send(0, PUSH, 0, answers=chunks.ids_of(0))
    rid = rid_of(req.links[0].sent[0])
    req.links[0].inbox.append([bytes(memoryview(f)) for f in
                               codec.encode(ERROR, "server:0", rid=rid, message="push for step 0, but ...")])
    with pytest.raises(RemoteError, match="server 0 at tcp://s0 refused push: push for step 0"):
        req.wait(PUSH, 0, reader)


def test_a_request_is_sent_again_unchanged_after_a_lost_connection():
    req, chunks, reader = make()
    reader.expect(np.zeros(12))
    req.send(1, PULL, 0, answers=chunks.ids_of(1))
    req.links[1].lost += 1                                 # the link broke and came back
    for r in list(req.out.values()):
        req.maybe_resend(req.links[r.server], r, "pull")
    assert len(req.links[1].sent) == 2 and req.links[1].sent[0] == req.links[1].sent[1] and req.resends == 1
    for r in list(req.out.values()):                       # once is enough
        req.maybe_resend(req.links[r.server], r, "pull")
    assert len(req.links[1].sent) == 2


def test_an_answer_to_a_request_not_waited_for_is_dropped():
    req, chunks, reader = make()
    params = np.zeros(12)
    reader.expect(params)
    req.send(1, PULL, 0, answers=chunks.ids_of(1))
    rid = rid_of(req.links[1].sent[0])
    req.links[1].inbox += [answer(rid + 100, [(4, 8)], [9.0], version=1), answer(rid, [(4, 8)], [2.0], version=1)]
    req.wait(PULL, 0, reader)
    assert params[4:8].tolist() == [2.0] * 4


def test_a_link_whose_handshake_was_refused_fails_the_wait_naming_the_server():
    req, chunks, reader = make()
    reader.expect(np.zeros(12))
    req.send(0, PULL, 0, answers=chunks.ids_of(0))
    req.links[0].why = "the server refused our CurveZMQ key"
    with pytest.raises(RemoteError, match="cannot talk to server 0 at tcp://s0: the server refused our CurveZMQ"):
        req.wait(PULL, 0, reader)


def test_a_wait_stops_when_the_job_is_stopping():
    class Stopping(RuntimeError):
        pass

    def check_job():
        raise Stopping("the job is stopping: server 1 is dead")
    req, chunks, reader = make(timeout=30.0, check_job=check_job)
    reader.expect(np.zeros(12))
    req.send(1, PULL, 0, answers=chunks.ids_of(1))
    with pytest.raises(Stopping, match="server 1 is dead"):
        req.wait(PULL, 0, reader)                      # at once, not after 30 s


def test_request_ids_are_unique_and_each_request_waits_for_its_own_answer():
    req, chunks, reader = make()
    params = np.zeros(12)
    reader.expect(params)
    for s in (0, 1):
        req.send(s, PULL, 0, answers=chunks.ids_of(s))
    r0, r1 = rid_of(req.links[0].sent[0]), rid_of(req.links[1].sent[0])
    assert r0 != r1 and set(req.out) == {r0, r1}
    req.links[1].inbox.append(answer(r1, [(4, 8)], [2.0], version=1))
    with pytest.raises(DeadlineError, match=r"from server 0 \(the coordinator\) at tcp://s0"):   # server 1 answered, server 0 did not
        req.wait(PULL, 0, reader)
    assert set(req.out) == {r0} and params[4:8].tolist() == [2.0] * 4
