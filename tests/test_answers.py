"""The client's parts driven without processes: Requests (deadlines, refusals, resends,
answers matched to requests) over fake links, and the chunk map and answer reader.

What a user relies on: a wait that passes its deadline names the server that did not
answer and its address; a refused request raises with the server's reason; a request
whose connection was lost is sent again, byte for byte; an answer to a request no
longer waited for is dropped; answers land in ``params`` and the versions are checked.
"""
import numpy as np
import pytest

from common.cluster import ClusterConfig
from common.wire import codec
from common.wire.protocol import ERROR, OK, PULL, PUSH, ProtocolError
from worker.answers import AnswerReader, ChunkMap
from worker.requests import DeadlineError, RemoteError, Requests

PLACEMENT = [[0, 4, 0], [4, 8, 1], [8, 12, 0]]


class Link:
    """A DEALER stand-in: records what is sent, answers what the test queues."""
    def __init__(self, endpoint):
        self.endpoint, self.sent, self.inbox, self.lost = endpoint, [], [], 0

    def send(self, frames):
        self.sent.append([bytes(memoryview(f)) for f in frames])

    def connections(self):
        return (1, self.lost)

    def refused(self):
        return None

    def diagnose(self):
        return "connected"

    def poll(self, timeout_ms=0):
        return bool(self.inbox)

    def recv_placed(self, place):
        frames = self.inbox.pop(0)
        place(frames[0])
        return frames, None

    def recv(self):
        return self.inbox.pop(0)


class Poller:
    def __init__(self, links):
        self.links = links

    def poll(self, timeout_ms):
        return [link for link in self.links if link.inbox]


def make(timeout=0.3):
    cluster = ClusterConfig(rank=0, num_servers=2, num_workers=1, coordinator="127.0.0.1:1", timeout=timeout)
    req = Requests(cluster, b"worker:0/test", lambda: "worker:0", check_job=lambda: None)
    req.coordinator.close()
    req.links = [Link("tcp://s0"), Link("tcp://s1")]
    req.addrs = ["tcp://s0", "tcp://s1"]
    req.poller = Poller(req.links)
    chunks = ChunkMap(PLACEMENT, 2)
    reader = AnswerReader(chunks, 2, one_version=True)
    return req, chunks, reader


def answer(rid, ranges, values, version, cmd=OK, **meta):
    arrays = [np.full(e - b, v, np.float64) for (b, e), v in zip(ranges, values)]
    return [bytes(memoryview(f)) for f in codec.encode(cmd, "server:0", rid=rid, arrays=arrays, ranges=ranges,
                                                         version=version, **meta)]


def rid_of(frames):
    return codec.decode(frames).rid


def test_the_chunk_map_reads_the_placement():
    chunks = ChunkMap(PLACEMENT, 2)
    assert chunks.of_server == [[(0, 4), (8, 12)], [(4, 8)]]
    assert chunks.ids_of(0) == [0, 2] and chunks.server(1) == 1
    assert chunks.overlapping(3, 9) == [0, 1, 2] and chunks.within({0, 1, 2}, [(0, 8)]) == [0, 1]


def test_answers_land_in_params_and_the_wait_ends():
    req, chunks, reader = make()
    params = np.zeros(12)
    reader.expect(params)
    for s in (0, 1):
        req.send(s, PULL, 0, answers=chunks.ids_of(s))
    r0, r1 = rid_of(req.links[0].sent[0]), rid_of(req.links[1].sent[0])
    req.links[0].inbox.append(answer(r0, [(0, 4), (8, 12)], [1.0, 3.0], version=2))
    req.links[1].inbox.append(answer(r1, [(4, 8)], [2.0], version=2))
    req.wait(PULL, 0, reader)
    np.testing.assert_array_equal(params, [1] * 4 + [2] * 4 + [3] * 4)
    assert reader.fresh == {0, 1, 2} and reader.settle() == 2 and not req.out


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


def test_servers_at_different_versions_are_refused_where_one_is_required():
    req, chunks, reader = make()
    reader.expect(np.zeros(12))
    for s, v in ((0, 3), (1, 4)):
        req.send(s, PULL, 0, answers=chunks.ids_of(s))
        rid = rid_of(req.links[s].sent[-1])
        req.links[s].inbox.append(answer(rid, chunks.of_server[s], [0.0] * len(chunks.of_server[s]), version=v))
    req.wait(PULL, 0, reader)
    assert reader.behind() == ([0], 4)
    with pytest.raises(RemoteError, match="different versions"):
        reader.settle()


def test_an_answer_with_a_chunk_not_asked_for_is_refused():
    req, chunks, reader = make()
    reader.expect(np.zeros(12))
    req.send(1, PULL, 0, answers=chunks.ids_of(1))
    rid = rid_of(req.links[1].sent[0])
    req.links[1].inbox.append(answer(rid, [(0, 4)], [1.0], version=1))
    with pytest.raises(ProtocolError, match="not asked for"):
        req.wait(PULL, 0, reader)
