"""The equivalence the lessons rest on: with BSP, W workers of batch b give the same
parameters after K steps as one process of batch W*b on the same examples (float64),
whatever the optimizer, and whatever the number of servers.

Workers run as threads of this test, each with its own PSClient and GPT; the servers
are real processes. Worker r's batch at step k is rows [r*b, (r+1)*b) of the big batch.
"""
import numpy as np
import pytest

from common.optim import OptimConfig, clip_scale, lr_at, make_optimizer
from tests.cluster import Servers, run_threads
from worker.client import PSClient
from worker.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8)
W, B, T, K = 2, 3, 8, 4


def big_batch(k):
    rng = np.random.default_rng(100 + k)
    idx = rng.integers(0, CFG.vocab_size, size=(W * B, T))
    return idx, np.roll(idx, -1, axis=1)


def single_process(optim: OptimConfig):
    model = GPT(CFG, dtype=np.float64, seed=0)
    opt = make_optimizer(optim, model.params.size, np.float64, model.layout.decay_ranges())
    for k in range(K):
        idx, tgt = big_batch(k)
        model.zero_grad()
        model.forward(idx, tgt)
        model.backward()
        scale = clip_scale(float(np.linalg.norm(model.grads)), optim.grad_clip) if optim.grad_clip else 1.0
        opt.step(model.params, model.grads, lr_at(optim, k), grad_scale=scale)
    return model.params


def distributed(optim: OptimConfig, S, tmp_path):
    flags = ["--optimizer", optim.optimizer, "--lr", optim.lr, "--momentum", optim.momentum,
             "--weight-decay", optim.weight_decay, "--warmup-steps", optim.warmup_steps,
             "--lr-decay-steps", optim.lr_decay_steps, "--grad-clip", optim.grad_clip]
    with Servers(S, W, str(tmp_path), flags) as servers:
        def worker(rank):
            model = GPT(CFG, dtype=np.float64, seed=0)
            client = PSClient(servers.cluster(rank))
            client.register(model.layout, "float64")
            if rank == 0:
                client.init(model.params)
            model.params[:] = np.nan                 # everything must come from the servers
            client.pull(model.params)
            for k in range(K):
                idx, tgt = big_batch(k)
                rows = slice(rank * B, (rank + 1) * B)
                model.zero_grad()
                loss = model.forward(idx[rows], tgt[rows])
                model.backward()
                client.push_pull(model.grads, model.params, k, loss=loss)
            client.done()
            client.close()
            return model.params.copy()
        results = run_threads(worker, W)
        assert servers.wait() == [0] * S
    np.testing.assert_array_equal(results[0], results[1])    # every worker holds the same parameters
    return results[0]


OPTIMS = {
    "sgd": OptimConfig(optimizer="sgd", lr=0.5),
    "momentum": OptimConfig(optimizer="momentum", lr=0.3, momentum=0.9),
    "adamw": OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, warmup_steps=2, lr_decay_steps=4),
    # SGD, not Adam, for clipping: Adam is nearly blind to a constant gradient scale, so a
    # wrong (per-shard) norm would go unnoticed; SGD's step is proportional to it
    "sgd+clip": OptimConfig(optimizer="sgd", lr=0.5, grad_clip=0.05),
}


def test_clipping_is_active_in_the_clip_case():
    model = GPT(CFG, dtype=np.float64, seed=0)
    idx, tgt = big_batch(0)
    model.forward(idx, tgt)
    model.backward()
    assert np.linalg.norm(model.grads) > 2 * OPTIMS["sgd+clip"].grad_clip
    assert np.abs(single_process(OPTIMS["sgd+clip"]) - single_process(OPTIMS["sgd"])).max() > 1e-3


@pytest.mark.parametrize("name", sorted(OPTIMS))
@pytest.mark.parametrize("S", [1, 3])
def test_w_workers_equal_one_big_batch(name, S, tmp_path):
    optim = OPTIMS[name]
    want = single_process(optim)
    got = distributed(optim, S, tmp_path)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-9, f"{name}, S={S}: relative error {rel:.2e}"
    assert np.abs(want - GPT(CFG, dtype=np.float64, seed=0).params).max() > 1e-3   # it did train
