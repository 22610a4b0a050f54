"""Communication overlapped with compute, and compression, through real servers.

- the model's hooks: the backward names each range once its gradient is final (ln_f,
  the blocks from the last, the embeddings), covering the vector once; the forward
  names each range before it first reads it;
- BSP with overlap (pushes during the backward, the next forward waiting layer by
  layer, servers averaging and updating chunk by chunk) gives exactly what one process
  gives with the whole batch, with and without clipping, on one and three servers;
- with compression the servers apply exactly the mean of what the workers sent, as
  decoded from the wire, and what was not sent stays in each worker's residual.

Workers run as threads of this test; servers are real processes.
"""
import numpy as np
import pytest

from common.cluster import JobConfig
from common.optim import OptimConfig
from tests.cluster import Servers, run_threads
from tests.test_bsp_equivalence import B, CFG, K, W, big_batch, single_process
from worker.client import PSClient
from worker.mode_loops import make_loop
from worker.model import GPT


def test_backward_names_each_range_once_its_gradient_is_final():
    model = GPT(CFG, dtype=np.float64, seed=0)
    idx, tgt = big_batch(0)
    seen = []
    model.forward(idx, tgt)
    model.backward(after=lambda b, e: seen.append((b, e, model.grads[b:e].copy())))
    lay = model.layout
    assert [(b, e) for b, e, _ in seen] == [lay.span("ln_f."), lay.span("h.1."), lay.span("h.0."),
                                           (0, lay["wpe.weight"].end)]
    assert sorted((b, e) for b, e, _ in seen)[0][0] == 0
    assert sum(e - b for b, e, _ in seen) == lay.size                 # the vector, once
    for b, e, g in seen:
        np.testing.assert_array_equal(g, model.grads[b:e])            # final when named


def test_forward_names_each_range_before_it_reads_it():
    model = GPT(CFG, dtype=np.float64, seed=0)
    idx, tgt = big_batch(0)
    want = model.forward(idx, tgt)
    saved = model.params.copy()
    model.params[:] = np.nan
    order = []

    def before(b, e):
        order.append((b, e))
        model.params[b:e] = saved[b:e]           # the parameters "arrive" only now
    assert model.forward(idx, tgt, before=before) == want
    assert order[0][0] == 0 and order == sorted(order)


def train_overlapped(optim: OptimConfig, S, tmp_path, job=None, steps=K):
    """W workers of batch B with the overlapped BSP loop; returns (params per worker, clients' counters)."""
    job = job or JobConfig(chunk_mb=0.002)           # chunks of 512 elements: several per server
    flags = ["--optimizer", optim.optimizer, "--lr", optim.lr, "--momentum", optim.momentum,
             "--grad-clip", optim.grad_clip, "--chunk-mb", job.chunk_mb, "--compress", job.compress,
             "--compress-ratio", job.compress_ratio, "--error-feedback", job.error_feedback]
    with Servers(S, W, str(tmp_path), flags) as servers:
        def worker(rank):
            model = GPT(CFG, dtype=np.float64, seed=0)
            client = PSClient(servers.cluster(rank), job)
            info = client.register(model.layout, "float64")
            if rank == 0:
                client.init(model.params)
            model.params[:] = np.nan
            client.pull(model.params)
            loop = make_loop(job, client, model, steps, W, info.get("optim"), overlap=True)
            assert loop.overlap
            history, k = [], 0
            while not loop.finished():
                idx, tgt = big_batch(k)
                rows = slice(rank * B, (rank + 1) * B)
                loss = model.forward(idx[rows], tgt[rows], **loop.forward_hooks())
                model.zero_grad()
                before = client.encoder.residual.copy() if client.encoder else None
                model.backward(**loop.backward_hooks(loss, B * idx.shape[1]))
                p = loop.step(loss, B * idx.shape[1])
                assert not p.synced and p.step == k + 1
                if client.encoder:                     # what this worker sent at step k, decoded
                    history.append(before + model.grads - client.encoder.residual)
                k += 1
            loop.finish()
            client.done()
            client.close()
            return model.params.copy(), client.push_messages, history
        results = run_threads(worker, W)
        assert servers.wait() == [0] * S
    for params, _, _ in results[1:]:
        np.testing.assert_array_equal(params, results[0][0])
    return results


@pytest.mark.parametrize("name,optim", [("sgd", OptimConfig(optimizer="sgd", lr=0.5)),
                                        ("sgd+clip", OptimConfig(optimizer="sgd", lr=0.5, grad_clip=0.05)),
                                        ("momentum", OptimConfig(optimizer="momentum", lr=0.3, momentum=0.9))])
@pytest.mark.parametrize("S", [1, 3])
def test_overlapped_bsp_equals_one_big_batch(name, optim, S, tmp_path):
    results = train_overlapped(optim, S, tmp_path)
    want = single_process(optim)
    rel = np.abs(results[0][0] - want).max() / np.abs(want).max()
    assert rel <= 1e-9, f"{name}, S={S}: relative error {rel:.2e}"
    # the pushes did leave layer by layer: more messages than one per server and step
    assert results[0][1] > K * S


def test_a_step_that_is_not_overlapped_is_one_message_per_server(tmp_path):
    """push_pull (no overlap) carries all of a server's chunks in one message, and the run
    is still exactly one big batch."""
    S, optim, job = 2, OptimConfig(optimizer="sgd", lr=0.5), JobConfig(chunk_mb=0.001)
    with Servers(S, W, str(tmp_path), ["--optimizer", "sgd", "--lr", optim.lr, "--chunk-mb", job.chunk_mb]) as servers:
        def worker(rank):
            model = GPT(CFG, dtype=np.float64, seed=0)
            client = PSClient(servers.cluster(rank), job)
            client.register(model.layout, "float64")
            if rank == 0:
                client.init(model.params)
            client.pull(model.params)
            for k in range(K):
                idx, tgt = big_batch(k)
                rows = slice(rank * B, (rank + 1) * B)
                model.zero_grad()
                model.forward(idx[rows], tgt[rows])
                model.backward()
                client.push_pull(model.grads, model.params, k)
            client.done()
            client.close()
            return model.params.copy(), client.push_messages, len(client.chunk_map)
        results = run_threads(worker, W)
        assert servers.wait() == [0] * S
    params, messages, chunks = results[0]
    assert chunks >= 4 * S and messages == K * S             # several chunks a server, one message
    want = single_process(optim)
    assert np.abs(params - want).max() / np.abs(want).max() <= 1e-9


@pytest.mark.parametrize("scheme", ["topk", "int8"])
def test_servers_apply_the_mean_of_what_was_sent(scheme, tmp_path):
    """SGD: params_K = params_0 - lr * sum_k mean_w sent_{w,k}, with sent what the wire
    carried (the gradient plus the old residual minus the new one)."""
    lr, S = 0.5, 2
    job = JobConfig(compress=scheme, compress_ratio=0.05 if scheme == "topk" else 0.01, chunk_mb=0.001)
    results = train_overlapped(OptimConfig(optimizer="sgd", lr=lr), S, tmp_path, job)
    want = GPT(CFG, dtype=np.float64, seed=0).params.copy()
    for k in range(K):
        want -= lr * np.mean([results[w][2][k] for w in range(W)], axis=0)
    np.testing.assert_allclose(results[0][0], want, rtol=0, atol=1e-12)
    if scheme == "topk":          # most of each gradient stayed behind, in the residual
        sent = results[0][2][0]
        assert 0 < np.count_nonzero(sent) <= 0.1 * sent.size


def test_hooks_with_threads_name_the_whole_vector_once():
    model = GPT(CFG, dtype=np.float64, seed=0, threads=2)
    idx, tgt = big_batch(0)
    before, after = [], []
    loss = model.forward(idx, tgt, before=lambda b, e: before.append((b, e)))
    model.backward(after=lambda b, e: after.append((b, e)))
    assert before == after == [(0, model.layout.size)]
    single = GPT(CFG, dtype=np.float64, seed=0)
    assert abs(single.forward(idx, tgt) - loss) < 1e-12
