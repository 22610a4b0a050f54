"""The server's parts driven without processes or sockets: a recording replier stands in
for the ROUTER, messages are real codec frames, the shard and the optimizer are real.

What a user relies on: a BSP step answers every worker with the average's update (the
same as the optimizer run by hand), a resent push is answered where it came from and
stored once, a late push is answered ``dropped``; ssp holds a read until the slowest
worker catches up; pulls wait for a version or the initial parameters and are refused
at their deadline; a stale view changes nothing; checkpoints make answers wait.
"""
import numpy
import pytest

from common.optim import OptimConfig, make_optimizer
from common.wire import codec
from common.wire.protocol import ERROR, NORM, OK, ProtocolError
from paramserver.checkpointing import Checkpointer
from paramserver.dedupe import Applied
from paramserver.modes import AsyncServing, ServingParts
from paramserver.pulls import PullQueue
from paramserver.replier import Replier
from paramserver.shard import Shard
from common.durability import DurabilityConfig
from paramserver.steps import SyncServing
from paramserver.traffic import Traffic
from paramserver.view import WorkerView
from common.trace import NULL_TRACER
from tests.standins import Clock, Peer, Router, decoded, push_message

N = 8
CHUNKS = [(0, 4), (4, 8)]


class NoCheckpoints:
    def __init__(self, every=0):
        self.every, self.saved = every, []

    def answers_wait(self, version):
        return bool(self.every and version % self.every == 0)

    def after_update(self, version):
        if self.answers_wait(version):
            self.saved.append(version)


def push(rank, step, grad, rid=1, chunks=CHUNKS, **meta):
    return push_message(rank, step, grad, rid, chunks, **meta)


def make(mode="bsp", workers=2, backup=0, servers=1, staleness=None, checkpoints=None):
    optim = OptimConfig(optimizer="sgd", lr=0.5)
    shard = Shard(CHUNKS, "float32", optim)
    shard.set_params([numpy.ones(4, numpy.float32), numpy.ones(4, numpy.float32)], CHUNKS)
    router, clock = Router(), Clock()
    replier = Replier("server:0", router, Traffic(servers, workers), snapshot=mode in ("asp", "ssp") or backup > 0)
    peers = {s: Peer() for s in range(1, servers)}
    replier.serve(shard, peers)
    view = WorkerView(workers)
    view.update(1, [[r, 0] for r in range(workers)])
    pulls = PullQueue(replier, workers, timeout=5.0)
    parts = ServingParts(replier, view, Applied(), checkpoints or NoCheckpoints(), pulls, NULL_TRACER,
                         ahead=lambda msg, rank, session: (_ for _ in ()).throw(ProtocolError("ahead")))
    if mode in ("asp", "ssp"):
        serving = AsyncServing(shard, parts, mode, workers, staleness, 0.0, timeout=5.0, clock=clock)
    else:
        serving = SyncServing(shard, parts, 0, [f"tcp://s{s}" for s in range(servers)], mode, workers, backup,
                              clip=False, clock=clock)
    return serving, shard, router, parts, clock, peers


def test_a_bsp_step_answers_every_worker_with_the_update_of_the_average():
    serving, shard, router, parts, _, _ = make()
    g0, g1 = numpy.arange(N, dtype=numpy.float32), numpy.full(N, 2.0, numpy.float32)
    serving.push(b"w0", push(0, 0, g0, loss=1.0), 0, 0)
    assert router.sent == [] and shard.version == 0            # waits for worker 1
    serving.push(b"w1", push(1, 0, g1, loss=3.0), 1, 0)
    assert shard.version == 1
    ref = numpy.ones(N, numpy.float32)
    make_optimizer(OptimConfig(optimizer="sgd", lr=0.5), N, numpy.float32).update(ref, (g0 + g1) / 2, 0.5, 1.0)
    answers = {ident: msg for ident, msg in router.sent}
    assert set(answers) == {b"w0", b"w1"}
    for msg in answers.values():
        assert msg.cmd == OK and msg.meta["version"] == 1 and msg.meta["loss"] == 2.0
        got = numpy.concatenate([a for _, a in sorted(zip(msg.ranges, msg.arrays))])
        numpy.testing.assert_array_equal(got, ref)
    assert parts.applied.find(0, 0, 1)["version"] == 1        # recorded: a resend is not applied again


@pytest.mark.parametrize("mode", ["bsp", "local-sgd"])     # chunk by chunk (assembly.py), and whole pushes
def test_a_resent_push_is_answered_where_it_came_from_and_stored_once(mode):
    serving, shard, router, _, _, _ = make(mode=mode)
    g = numpy.ones(N, numpy.float32)
    serving.push(b"old-link", push(0, 0, g, rid=7), 0, 0)
    serving.push(b"new-link", push(0, 0, g, rid=7), 0, 0)      # the same request again, on a new connection
    serving.push(b"w1", push(1, 0, g), 1, 0)
    assert shard.version == 1
    assert sorted(ident for ident, _ in router.sent) == [b"new-link", b"w1"]


def test_a_second_push_of_one_step_is_refused():
    serving, _, _, _, _, _ = make(mode="local-sgd")
    serving.push(b"w0", push(0, 0, numpy.ones(N)), 0, 0)
    with pytest.raises(ProtocolError, match="already pushed"):
        serving.push(b"w0", push(0, 0, numpy.ones(N), rid=2), 0, 0)


def test_a_late_push_with_backup_workers_is_answered_dropped():
    serving, shard, router, _, _, _ = make(workers=3, backup=1)
    g = numpy.ones(N, numpy.float32)
    serving.push(b"w0", push(0, 0, g), 0, 0)
    serving.push(b"w1", push(1, 0, g), 1, 0)                   # quorum 2: the step is applied
    assert shard.version == 1
    serving.push(b"w2", push(2, 0, g), 2, 0)
    ident, msg = router.sent[-1]
    assert ident == b"w2" and msg.meta.get("dropped") is True and msg.meta["version"] == 1


def test_with_two_servers_the_step_waits_for_the_peer_proposal():
    serving, shard, router, _, _, peers = make(servers=2)
    g = numpy.ones(N, numpy.float32)
    serving.push(b"w0", push(0, 0, g), 0, 0)
    serving.push(b"w1", push(1, 0, g), 1, 0)
    assert shard.version == 0 and [m.cmd for m in peers[1].sent] == [NORM]
    assert peers[1].sent[0].meta["workers"] == [[0, 0], [1, 0]]
    frames = codec.encode(NORM, "server:1", step=0, sumsq=0.0, workers=[[0, 0], [1, 0]])
    serving.on_norm(1, decoded(frames))
    assert shard.version == 1 and len(router.sent) == 2


def test_a_step_past_its_deadline_names_the_missing_worker():
    serving, _, _, _, clock, _ = make()
    serving.push(b"w0", push(0, 0, numpy.ones(N)), 0, 0)
    assert serving.tick(clock.t + 1.0, timeout=5.0, resend_s=1.0) is None
    why = serving.tick(clock.t + 6.0, timeout=5.0, resend_s=1.0)
    assert "worker(s) [1] have not pushed" in why
    assert serving.take_held() == [(b"w0", 1)]


def test_a_view_without_the_missing_worker_lets_the_step_go_on():
    serving, shard, router, parts, _, _ = make()
    serving.push(b"w0", push(0, 0, numpy.ones(N)), 0, 0)
    gone, new = parts.view.update(2, [[0, 0]])
    serving.view_changed(gone, new)
    assert shard.version == 1 and [i for i, _ in router.sent] == [b"w0"]


def test_ssp_holds_a_read_until_the_slowest_worker_catches_up():
    serving, shard, router, _, _, _ = make(mode="ssp", staleness=0)
    g = numpy.ones(N, numpy.float32)
    serving.push(b"w0", push(0, 0, g, base_version=0), 0, 0)
    assert shard.version == 1 and router.sent == []            # worker 0 is a clock ahead of worker 1
    serving.push(b"w1", push(1, 0, g, base_version=0), 1, 0)
    assert [i for i, _ in router.sent] == [b"w0", b"w1"]
    assert [m.meta["version"] for _, m in router.sent] == [2, 2]


def test_ssp_refuses_a_held_read_at_its_deadline_naming_the_slow_worker():
    serving, _, router, _, clock, _ = make(mode="ssp", staleness=0)
    serving.push(b"w0", push(0, 0, numpy.ones(N), base_version=0), 0, 0)
    serving.tick(clock.t + 6.0, timeout=5.0, resend_s=1.0)
    ident, msg = router.sent[-1]
    assert ident == b"w0" and msg.cmd == ERROR and "worker 1 at clock 0" in msg.meta["message"]


def test_pulls_wait_for_their_version_and_are_refused_at_the_deadline():
    router = Router()
    replier = Replier("server:0", router, Traffic(1, 2))
    shard = Shard(CHUNKS, "float32", OptimConfig(optimizer="sgd"))
    replier.serve(shard, {})
    pulls = PullQueue(replier, 2, timeout=5.0)
    pulls.wait_for_init(b"a", 1, now=0.0)
    pulls.wait_for_version(b"b", 2, version=3, now=0.0)
    pulls.initialized()
    assert [i for i, _ in router.sent] == [b"a"]
    pulls.reached(2)
    assert len(router.sent) == 1
    pulls.expire(now=6.0, version=2)
    ident, msg = router.sent[-1]
    assert ident == b"b" and msg.cmd == ERROR and "version 3 not reached" in msg.meta["message"]
    with pytest.raises(ProtocolError, match="too many"):
        for i in range(9):
            pulls.wait_for_version(b"c", i, version=9, now=0.0)


def test_a_flood_of_pulls_from_one_connection_keeps_no_worker_out():
    """A peer that floods a queue (the fuzzer, before worker 0's INIT) is refused past 4
    waiting pulls, and a worker's pull still gets in and is answered; a pull sent again
    is held once. (With one bound for the whole queue, the fuzzed job's worker 1 was
    refused "too many pulls are waiting for the initial parameters".)"""
    router = Router()
    replier = Replier("server:0", router, Traffic(1, 2))
    replier.serve(Shard(CHUNKS, "float32", OptimConfig(optimizer="sgd")), {})
    pulls = PullQueue(replier, 2, timeout=5.0)
    refused = 0
    for i in range(1000):
        try:
            pulls.wait_for_init(b"fuzzer", i, now=0.0)
        except ProtocolError as e:
            refused += 1
            assert "of this connection" in str(e)
    assert refused == 1000 - 4
    pulls.wait_for_init(b"w1", 7, now=0.0)
    pulls.wait_for_init(b"w1", 7, now=0.1)               # the same pull, sent again
    pulls.initialized()
    assert [i for i, _ in router.sent].count(b"w1") == 1 and len(router.sent) == 5
    with pytest.raises(ProtocolError, match="128 at most"):   # many connections: the whole queue's bound
        for i in range(200):
            pulls.wait_for_version(b"peer%d" % i, 1, version=9, now=0.0)


def test_an_older_view_changes_nothing():
    view = WorkerView(3)
    assert view.update(2, [[0, 1], [1, 1]]) == (set(), {0, 1})
    assert view.update(1, [[0, 1]]) is None and view.workers == {0: 1, 1: 1}
    with pytest.raises(ProtocolError):
        view.update(3, [[5, 0]])                                # a rank outside the job
    assert view.number == 2


def test_checkpoints_make_the_answers_of_their_version_wait(tmp_path):
    cp = Checkpointer(DurabilityConfig(checkpoint_every=3), str(tmp_path), rank=0)
    assert [v for v in range(1, 8) if cp.answers_wait(v)] == [3, 6]
    serving, shard, router, _, _, _ = make(checkpoints=NoCheckpoints(every=1))
    serving.push(b"w0", push(0, 0, numpy.ones(N)), 0, 0)
    serving.push(b"w1", push(1, 0, numpy.ones(N)), 1, 0)
    assert serving.checkpoints.saved == [1] and len(router.sent) == 2
