"""paramserver/shard.py alone: the chunks a server owns, the gradients of a step, the update.

What a user relies on: a range the server does not own is refused naming what it owns;
the average of a step is the mean of the workers' gradients summed in rank order,
whatever order they arrived in (runs repeat bit for bit); the chunk-by-chunk update of
plain BSP gives exactly the whole-shard optimizer step; a bad push (a chunk twice, NaN,
the wrong dtype, a compressed chunk in a plain job) is refused; a reply's snapshot is
never written by a later update; clipping without the global norm is an error.
"""
import numpy as np
import pytest

from common.optim import OptimConfig, make_optimizer
from common.wire.protocol import ProtocolError
from tests.standins import push_message
from paramserver.shard import Shard

CHUNKS = [(0, 4), (8, 12)]          # this server's chunks; [4, 8) belongs to another server


def shard(optimizer="sgd", grad_clip=0.0, **kw):
    s = Shard(CHUNKS, "float32", OptimConfig(optimizer=optimizer, lr=0.1, grad_clip=grad_clip, warmup_steps=0,
                                             lr_decay_steps=0, **kw))
    s.set_params([np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)], CHUNKS)
    return s


def grads(rng, workers):
    return [rng.normal(size=12).astype(np.float32) for _ in range(workers)]


def test_a_range_is_located_in_the_local_vector_or_refused_naming_what_is_owned():
    s = shard()
    assert s.locate(8, 12) == slice(4, 8) and s.locate(9, 11) == slice(5, 7)
    assert s.chunk_index(8, 12) == 1
    with pytest.raises(ProtocolError, match=r"\[4, 8\) is not owned by this server \(it owns \[0, 4\), \[8, 12\)\)"):
        s.locate(4, 8)
    with pytest.raises(ProtocolError, match="not one of this server's chunks"):
        s.chunk_index(9, 11)                      # inside a chunk, but not a whole one


def test_the_average_is_summed_in_rank_order_whatever_the_arrival_order(rng):
    g = grads(rng, 3)
    averages = []
    for order in ([0, 1, 2], [2, 0, 1]):
        s = shard()
        for r in order:
            s.store_gradient(r, push_message(r, 0, g[r], chunks=CHUNKS))
        averages.append(s.average(order).copy())
    want = (((g[0] + g[1]) + g[2]) * np.float32(1 / 3))[[0, 1, 2, 3, 8, 9, 10, 11]]
    assert averages[0].tobytes() == averages[1].tobytes() == want.tobytes()


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
def test_the_chunk_by_chunk_update_is_the_whole_shard_step_bit_for_bit(rng, optimizer):
    g = grads(rng, 2)
    whole, chunked = shard(optimizer, grad_clip=1.0), shard(optimizer, grad_clip=1.0)
    for step in range(3):
        for r in (1, 0):
            whole.store_gradient(r, push_message(r, step, g[r] * (step + 1), chunks=CHUNKS))
            chunked.store_gradient(r, push_message(r, step, g[r] * (step + 1), chunks=CHUNKS), hold=True)
        whole.average([0, 1])
        for i in (1, 0):
            chunked.average_chunk(i, [0, 1])
        assert chunked.local_sumsq() == pytest.approx(whole.local_sumsq(), rel=1e-6)
        sumsq = whole.local_sumsq()
        whole.apply(sumsq)
        chunked.begin_update(sumsq)
        for i in (0, 1):
            chunked.update_chunk(i)
        chunked.end_update()
        assert chunked.params.tobytes() == whole.params.tobytes() and chunked.version == whole.version == step + 1
    assert not chunked.held                       # the held views are let go after each step


def test_one_step_is_the_optimizer_run_by_hand(rng):
    g = grads(rng, 2)
    s = shard("adamw")
    for r in (0, 1):
        s.store_gradient(r, push_message(r, 0, g[r], chunks=CHUNKS))
    s.average([0, 1])
    s.apply()
    ref = np.concatenate([np.arange(4), np.arange(4, 8)]).astype(np.float32)
    opt = make_optimizer(s.optim_cfg, 8, np.float32)
    opt.begin()
    opt.update(ref, ((g[0] + g[1]) * np.float32(0.5))[[0, 1, 2, 3, 8, 9, 10, 11]], 0.1, 1.0)
    assert s.params.tobytes() == ref.tobytes()


@pytest.mark.parametrize("chunks, values, dtype, why", [
    ([(0, 4), (0, 4)], None, np.float32, "appears twice in one push"),
    ([(0, 4), (8, 12)], np.nan, np.float32, "holds NaN or Inf"),
    ([(0, 4), (8, 12)], None, np.float64, "expected float32 flat arrays, got float64"),
    ([(4, 8)], None, np.float32, "not one of this server's chunks"),
])
def test_a_bad_push_is_refused(chunks, values, dtype, why):
    from common.wire import codec
    from tests.standins import decoded
    s = shard()
    arrays = [np.full(e - b, 1.0 if values is None else values, dtype) for b, e in chunks]
    msg = decoded(codec.encode("push", "worker:0", step=0, rid=1, arrays=arrays, ranges=chunks))
    with pytest.raises(ProtocolError, match=why):
        s.store_gradient(0, msg)


def compressed_push(scheme):
    from common.wire import codec
    from common.wire.compress import PushEncoder
    from tests.standins import decoded
    enc, g = PushEncoder(scheme, 12, np.float32), np.ones(12, np.float32)
    arrays, ranges, encs = [], [], []
    for b, e in CHUNKS:
        for part, a in enc.encode(b, e, g):
            arrays.append(a), ranges.append((b, e)), encs.append(part)
    wire = dict(scheme.parts)
    return decoded(codec.encode("push", "worker:0", step=0, rid=1, arrays=arrays, ranges=ranges, encs=encs,
                                dtypes=[wire[p] for p in encs]))


def test_a_compressed_chunk_is_decoded_with_the_jobs_scheme_and_refused_in_a_plain_job():
    from common.wire.compress import make_scheme
    scheme = make_scheme("fp16")
    with pytest.raises(ProtocolError, match="--compress none"):
        shard().store_gradient(0, compressed_push(scheme))
    s = Shard(CHUNKS, "float32", OptimConfig(optimizer="sgd"), scheme=scheme)
    assert s.store_gradient(0, compressed_push(scheme)) == [0, 1]
    assert s.slot(0).tolist() == [1.0] * 8


def test_a_snapshot_is_never_written_by_a_later_update(rng):
    s = shard()
    arrays, ranges = s.param_snapshot()
    before = [a.copy() for a in arrays]
    assert np.shares_memory(s.param_snapshot()[0][0], arrays[0])               # one copy per version
    s.store_gradient(0, push_message(0, 0, grads(rng, 1)[0], chunks=CHUNKS))
    s.average([0])
    s.apply()
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before))          # the old version, intact
    assert not np.array_equal(s.param_snapshot()[0][0], before[0])            # a new copy at the new version


def test_clipping_needs_the_global_norm():
    s = shard(grad_clip=1.0)
    with pytest.raises(ValueError, match="global squared norm"):
        s.begin_update(None)


def test_local_sgd_subtracts_the_averaged_change():
    s = shard()
    s.avg[:] = 1.0
    s.apply_delta()
    assert s.params.tolist() == [-1, 0, 1, 2, 3, 4, 5, 6] and s.version == 1
