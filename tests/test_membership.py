"""paramserver/membership.py alone: the coordinator's book of who is in the job.

What a user relies on: the job starts once every server and worker registered, the
unranked workers taking the free ranks in order; a process whose model, dtype,
optimizer or job settings differ, a rank taken twice, a process too many are refused
with a message that says what differs, and a refused registration changes nothing;
``missing`` names who has not come; a dropped worker rejoins with a new session (its
rank, or a free one), a finished or a live one cannot; a resumed job starts at the
newest checkpoint version every server holds, and says which server lacks one.
(The tokenizer check: tests/test_tokenizer.py.)
"""
import pytest

from common.layout import gpt_layout
from common.wire.protocol import ProtocolError
from paramserver.membership import Membership
from tests.standins import server_meta, worker_meta

OPTIM = {"optimizer": "sgd", "lr": 0.1}


def book(servers=1, workers=2, job=None):
    return Membership(servers, workers, dict(OPTIM), job or {"mode": "bsp"})


def placement(layout, num_servers):
    return [[0, layout.size, 0]]


def test_the_job_starts_when_everyone_is_here_and_free_ranks_go_in_order():
    m = book(servers=2, workers=3)
    m.register(b"s0", server_meta(0))
    m.register(b"w-a", worker_meta(-1, pid=1))
    m.register(b"w-b", worker_meta(0, pid=2))
    assert not m.complete() and m.missing() == "server(s) [1] and 1 worker(s) (ranks not yet claimed: [1, 2])"
    m.register(b"s1", server_meta(1))
    m.register(b"w-c", worker_meta(-1, pid=3))
    assert m.complete() and m.missing() == "nobody"
    replies = dict(m.start(placement))
    assert {ident: r["rank"] for ident, r in replies.items()} == {b"s0": 0, b"s1": 1, b"w-a": 1, b"w-b": 0, b"w-c": 2}
    sessions = [r["session"] for r in replies.values()]
    assert len(set(sessions)) == 5 and m.view == 1 and sorted(m.live) == [0, 1, 2]
    assert replies[b"w-a"]["servers"] == ["tcp://h0:5700", "tcp://h0:5701"]


def refused(m, identity, meta, why):
    before = (dict(m.servers), list(m.workers), m.layout_hash)
    with pytest.raises(ProtocolError, match=why):
        m.register(identity, meta)
    assert (dict(m.servers), list(m.workers), m.layout_hash) == before        # nothing changed


def test_a_worker_with_another_model_is_refused_naming_both_hashes():
    m = book()
    m.register(b"w0", worker_meta(0))
    other = gpt_layout(vocab_size=11, block_size=4, n_layer=2, n_embd=8)
    refused(m, b"w1", worker_meta(1, layout=other),
            f"has layout hash {other.hash()}, but the job's is {m.layout_hash}.*model configurations differ")
    refused(m, b"w1", worker_meta(1, dtype="float64"), "uses float64, the job uses float32")


def test_a_worker_whose_hash_does_not_match_its_own_table_is_refused():
    m = book()
    refused(m, b"w0", dict(worker_meta(0), layout_hash="0" * 16), "does not match its own table")


def test_ranks_taken_twice_and_processes_too_many_are_refused():
    m = book(servers=1, workers=2)
    m.register(b"s0", server_meta(0))
    refused(m, b"s0b", server_meta(0, addr="tcp://h9:1"), "server rank 0 is already taken")
    refused(m, b"s1", server_meta(1), "server rank 1 out of range")
    m.register(b"w0", worker_meta(0))
    refused(m, b"w0b", worker_meta(0, pid=9), "worker rank 0 is already taken")
    m.register(b"w1", worker_meta(-1, pid=2))
    refused(m, b"w2", worker_meta(-1, pid=3), "the job already has its 2 worker")


def test_other_optimizer_or_job_settings_are_refused_naming_what_differs():
    m = book(job={"mode": "bsp", "chunk_mb": 4.0})
    refused(m, b"s1", server_meta(0, optim={"optimizer": "adamw", "lr": 0.1}), r"optimizer settings differ .* \['optimizer'\]")
    refused(m, b"w0", worker_meta(0, job={"mode": "asp", "chunk_mb": 4.0}),
            r"job settings differ from the coordinator's in \['mode'\]: mode: coordinator 'bsp', this process 'asp'")


def test_nobody_joins_a_started_job_by_registering():
    m = book(workers=1)
    m.register(b"s0", server_meta(0))
    m.register(b"w0", worker_meta(0))
    m.start(placement)
    with pytest.raises(ProtocolError, match="already started"):
        m.register(b"w1", worker_meta(-1, pid=5))


def started(workers=2):
    m = book(workers=workers)
    m.register(b"s0", server_meta(0))
    for r in range(workers):
        m.register(b"w%d" % r, worker_meta(r, pid=r + 1))
    m.start(placement)
    return m


def test_a_dropped_worker_rejoins_with_a_new_session_and_the_view_moves_on():
    m = started()
    old = m.live[1]
    assert m.drop(1, "no heartbeat for 5.0 s") and m.view == 2 and 1 not in m.live
    assert not m.drop(1, "again")                           # dropping twice changes nothing
    job = m.rejoin(b"w1-new", worker_meta(-1, pid=77), alive=lambda r: False)
    assert job["rank"] == 1 and job["session"] > old and job["rejoin"] and m.view == 3
    assert m.live[1] == job["session"] and m.rejoined[-1]["rank"] == 1
    assert m.dropped == [{"rank": 1, "session": old, "why": "no heartbeat for 5.0 s"}]


def test_a_rank_that_is_alive_or_finished_cannot_be_taken():
    m = started()
    with pytest.raises(ProtocolError, match="taken by a live process"):
        m.rejoin(b"x", worker_meta(0, pid=99), alive=lambda r: True)
    m.mark_done(1)
    m.drop(1, "done and silent")
    with pytest.raises(ProtocolError, match="has already finished"):
        m.rejoin(b"x", worker_meta(1, pid=99), alive=lambda r: False)
    with pytest.raises(ProtocolError, match="all alive"):
        m.rejoin(b"x", worker_meta(-1, pid=99), alive=lambda r: False)       # no free rank


def test_the_job_is_done_when_every_worker_of_the_view_is():
    m = started(workers=2)
    assert not m.mark_done(0)
    m.drop(1, "gone")
    assert m.all_done()


def test_a_resumed_job_starts_at_the_newest_version_every_server_holds():
    m = Membership(2, 1, dict(OPTIM))
    m.versions = {0: [50, 100, 150], 1: [100, 150, 200]}
    assert m.resume_version() == 150
    m.versions = {0: [50], 1: []}
    with pytest.raises(ProtocolError, match=r"server\(s\) \[1\] have no checkpoint to resume from"):
        m.resume_version()
    m.versions = {0: [50], 1: [100]}
    with pytest.raises(ProtocolError, match="no checkpoint of a common version"):
        m.resume_version()
    assert Membership(2, 1, dict(OPTIM)).resume_version() == 0                 # a fresh job


def test_a_server_comes_back_with_a_checkpoint_at_its_old_or_a_new_address():
    m = started(workers=1)
    with pytest.raises(ProtocolError, match="came back without a checkpoint"):
        m.returning_server(b"s0b", server_meta(0, versions=[]))
    with pytest.raises(ProtocolError, match="without a tcp:// address"):
        m.returning_server(b"s0b", server_meta(0, addr="h9:1", versions=[50]))
    member = m.returning_server(b"s0b", server_meta(0, pid=4242, versions=[50, 100]))
    assert member.identity == b"s0b" and member.pid == 4242 and m.versions[0] == [50, 100]
    moved = m.returning_server(b"s0c", server_meta(0, addr="tcp://h9:1", versions=[100]))   # on another host
    assert moved.identity == b"s0c" and moved.addr == "tcp://h9:1" and m.versions[0] == [100]
