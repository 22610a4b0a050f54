"""worker/answers.py without processes: where the chunks live (ChunkMap) and the answers
read into ``params`` (AnswerReader), over a worker's Requests on stand-in links
(tests/standins.py; Requests itself: tests/test_requests.py).

What a user relies on: answers land in ``params`` and the wait ends; servers at
different versions are refused where one version is required; an answer carrying a
chunk that was not asked for is refused.
"""
import numpy as np
import pytest

from common.wire.protocol import PULL, ProtocolError
from tests import standins
from tests.standins import answer, rid_of
from worker.answers import ChunkMap
from worker.requests import RemoteError

PLACEMENT = standins.PLACEMENT
make = standins.client_parts


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
