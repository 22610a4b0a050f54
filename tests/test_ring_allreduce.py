"""The hand-written ring all-reduce (scripts/lessons/ring_allreduce.py, lesson 10) gives the
parameter server's average, for W = 2, 3 and 4.

The PS adds the workers' gradients in rank order, g0 + g1 + ... , then scales by 1 / W.
The ring adds chunk c in the order g_c + g_(c+1) + ... (mod W): the same order for chunk
0, and for every chunk when W = 2 (a + b = b + a exactly in IEEE arithmetic), so there
the two are equal bit for bit. For W >= 3 the other chunks are added in a rotated order;
floating-point addition is not associative, so they differ by rounding: at most a few
float32 units of the sum's size. To show that the order is the only difference, the
ring also equals, bit for bit, the PS's arithmetic done in the ring's order.
"""
import numpy as np
import pytest

from common.layout import Layout
from scripts.lessons.ring_allreduce import RingLinks, chunk_ranges, ps_average, ring_allreduce
from tests.cluster import Servers, run_threads
from worker.client import PSClient
from common.wire.transport import free_port

SIZE = 1003                                        # not a multiple of W: chunks of unequal length


def gradients(world):
    rng = np.random.default_rng(world)
    return [rng.standard_normal(SIZE).astype(np.float32) * 10 ** rng.uniform(-3, 1) for _ in range(world)]


def ring(grads):
    peers = [f"tcp://127.0.0.1:{free_port()}" for _ in grads]

    def rank(r):
        links = RingLinks(r, peers, timeout=60)
        try:
            return ring_allreduce(grads[r].copy(), links)
        finally:
            links.close()
    return run_threads(rank, len(grads))


def real_ps_average(grads, logdir):
    """The average as the server process computes it: SGD with lr 1 from zero parameters
    moves them to minus the average of the workers' pushes."""
    layout = Layout([("w", (SIZE,))])
    with Servers(1, len(grads), logdir, ["--optimizer", "sgd", "--lr", "1"]) as servers:
        def worker(r):
            client = PSClient(servers.cluster(r))
            client.register(layout, "float32")
            params = np.zeros(SIZE, np.float32)
            if r == 0:
                client.init(params)
            client.pull(params)
            client.push_pull(grads[r], params, 0)
            client.done()
            client.close()
            return -params
        got = run_threads(worker, len(grads))
    assert all(np.array_equal(got[0], g) for g in got)
    return got[0]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_the_ring_gives_the_parameter_servers_average(world, tmp_path):
    grads = gradients(world)
    results = ring(grads)
    ps = real_ps_average(grads, str(tmp_path))
    assert np.array_equal(ps, ps_average(grads))             # the script's reference is the server's arithmetic
    for res in results[1:]:
        assert np.array_equal(res, results[0])              # every rank holds the same vector
    got, bounds = results[0], chunk_ranges(SIZE, world)
    b, e = bounds[0]
    assert np.array_equal(got[b:e], ps[b:e])                 # chunk 0: rank order, bit for bit
    if world == 2:
        assert np.array_equal(got, ps)
    scale = sum(np.abs(g) for g in grads) / world
    assert np.all(np.abs(got - ps) <= 4 * np.finfo(np.float32).eps * scale)   # the rest: rounding only
    for c, (b, e) in enumerate(bounds):                       # ... and exactly the PS's sum in the ring's order
        in_ring_order = [grads[(c + k) % world][b:e] for k in range(world)]
        assert np.array_equal(got[b:e], ps_average(in_ring_order))


def test_the_comparison_catches_a_ring_that_loses_a_partial_sum(tmp_path, monkeypatch):
    """A ring whose first partial sum arrives as zeros (a lost message) is caught: the check is not vacuous."""
    grads = gradients(3)
    real_send = RingLinks.send
    sent = []

    def lossy_send(self, chunk):                  # the first message of rank 0 carries zeros
        sent.append(self.rank)
        real_send(self, np.zeros_like(chunk) if sent.count(0) == 1 and self.rank == 0 else chunk)
    monkeypatch.setattr(RingLinks, "send", lossy_send)
    got = ring(grads)[0]
    assert not np.allclose(got, ps_average(grads), rtol=0, atol=1e-3)


def test_a_missing_neighbour_is_named_within_the_deadline():
    peers = [f"tcp://127.0.0.1:{free_port()}" for _ in range(3)]
    links = RingLinks(1, peers, timeout=0.5)
    try:
        with pytest.raises(TimeoutError, match="ring rank 1: nothing from rank 0 in 0.5 s"):
            ring_allreduce(np.ones(10, np.float32), links)
    finally:
        links.close()


def test_each_rank_sends_what_the_lessons_formula_says():
    """2 (W - 1) / W of the vector per rank, whatever W (lesson 10's table counts it the same way)."""
    from scripts.lessons.allreduce_vs_ps import formula_bytes_out
    for world in (2, 4):
        peers = [f"tcp://127.0.0.1:{free_port()}" for _ in range(world)]
        vectors = [np.ones(1000, np.float32) * (r + 1) for r in range(world)]

        def rank(r):
            links = RingLinks(r, peers)
            try:
                ring_allreduce(vectors[r], links)
                return links.bytes_sent
            finally:
                links.close()
        assert run_threads(rank, world) == [formula_bytes_out("ring", world, 4000)] * world
        assert all(np.array_equal(v, np.full(1000, (world + 1) / 2, np.float32)) for v in vectors)
