"""A server updates its chunks one by one (``Optimizer.begin`` + ``update`` per range):
over any cover of the vector that must be ``step``, bit for bit, for every optimizer,
with decay ranges that cross the chunks' boundaries. (The servers' chunk-by-chunk
averaging is checked end to end by tests/test_bsp_equivalence.py and test_overlap.py.)"""
import numpy as np
import pytest

from common.optim import CHUNK, OptimConfig, make_optimizer
from common.placement import chunk_ranges

CFGS = [OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.1),
        OptimConfig(optimizer="momentum", lr=0.1, momentum=0.9, weight_decay=0.1),
        OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)]


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.optimizer)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranges_updated_one_by_one_equal_one_step(cfg, dtype):
    n = 2 * CHUNK + 1234
    decay = [(100, CHUNK + 50), (CHUNK + 900, n - 7)]
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(dtype)
    whole, parts = make_optimizer(cfg, n, dtype, decay), make_optimizer(cfg, n, dtype, decay)
    a, b = p0.copy(), p0.copy()
    cover = chunk_ranges(n, 3, 7000)
    order = cover[::-1]                                    # any order of a cover
    for t in range(3):
        g = rng.standard_normal(n).astype(dtype)
        whole.step(a, g, 0.01 * (t + 1), grad_scale=0.5)
        parts.begin()
        for lo, hi in order:
            parts.update(b, g, 0.01 * (t + 1), 0.5, lo, hi)
    assert a.tobytes() == b.tobytes()
    assert np.abs(a - p0).max() > 0


def test_update_refuses_a_bad_range():
    opt = make_optimizer(CFGS[0], 10)
    with pytest.raises(ValueError, match="lo <= hi"):
        opt.update(np.zeros(10), np.zeros(10), 0.1, 1.0, 5, 11)
