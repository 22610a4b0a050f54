"""paramserver/assembly.py alone: one BSP step's pushes, chunk by chunk.

What a user relies on: a worker counts for the step only once every chunk of this
server has come from it; a chunk pushed twice in one step is refused, naming it; a
resent message is found by its name (rank, session, request id), so it is answered
once; each message is answered as soon as the chunks it carried are updated, and only
for the workers the step counts.
"""
import pytest

from common.wire.protocol import ProtocolError
from paramserver.assembly import StepAssembly


def test_a_worker_counts_once_every_chunk_has_come():
    a = StepAssembly(3)
    assert not a.started
    a.check(0, [0, 2])
    a.add(b"w0", 1, 0, 7, [0, 2], {"loss": 1.0})
    assert a.started and not a.rank_done(0)
    a.add(b"w0", 2, 0, 7, [1], {"tokens": 5})
    assert a.rank_done(0) and not a.rank_done(1)
    assert a.meta[0] == {"loss": 1.0, "tokens": 5} and a.rids[0] == [1, 2] and a.session[0] == 7


def test_a_chunk_pushed_twice_in_a_step_is_refused_naming_it():
    a = StepAssembly(3)
    a.add(b"w0", 1, 0, 7, [0, 1], {})
    with pytest.raises(ProtocolError, match=r"worker 0 already pushed chunk\(s\) \[1\] in this step"):
        a.check(0, [1, 2])
    a.check(1, [1, 2])                             # another worker's chunk 1 is its own
    assert a.count == {0: 2}                        # the refusal changed nothing


def test_a_resent_message_is_found_by_its_name():
    a = StepAssembly(2)
    a.add(b"old-link", 5, 1, 9, [0], {})
    assert a.find(1, 9, 5).identity == b"old-link"
    assert a.find(1, 8, 5) is None and a.find(1, 9, 6) is None and a.find(0, 9, 5) is None


def test_messages_are_answered_as_their_chunks_are_updated_for_the_counted_workers():
    a = StepAssembly(3)
    a.add(b"w0a", 1, 0, 1, [0], {})
    a.add(b"w0b", 2, 0, 1, [1, 2], {})
    a.add(b"w1", 1, 1, 1, [0, 1, 2], {})
    a.updated.add(0)
    assert [m.identity for m in a.answerable({0, 1})] == [b"w0a"]
    assert a.answerable({0, 1}) == []              # taken off the list: answered once
    a.updated.update({1, 2})
    assert [m.identity for m in a.answerable({0})] == [b"w0b"]    # worker 1 does not count
    assert [m.identity for m in a.waiting] == [b"w1"]


def test_reset_starts_the_next_step_empty():
    a = StepAssembly(2)
    a.add(b"w0", 1, 0, 1, [0, 1], {"loss": 2.0})
    a.updated.add(0)
    a.reset()
    assert not a.started and not a.waiting and not a.updated and a.have == [set(), set()]
    a.check(0, [0, 1])                              # the same chunks may come again
