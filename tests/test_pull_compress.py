"""Compressed pulls (--compress-pull, common/wire/pull_compress.py).

- the encoder and a decoder that follows every answer hold the same θ̂ bit for bit, in
  every scheme; a decoder that missed answers gets the changes since its copy, in
  order (bit for bit again), or θ̂ in full when that is smaller or it holds nothing;
  what a refresh did not send goes out later (θ̂ reaches a θ that stops moving);
- malformed ``held`` and changes for a chunk the worker does not hold are refused;
- BSP jobs (SGD, float64, 2 servers) with bf16, int8 and top-k pulls: every worker ends
  holding the θ̂ of a single-process reference written from the formula (gradients taken
  at θ̂, the update applied to θ, θ̂ += D(C(θ - θ̂)) once per version), and pulls fewer bytes;
- local-sgd, diloco and asp jobs with compressed pulls end with the workers' parameters
  their copy of θ̂ (local-sgd, diloco: the same for both, near the uncompressed run's),
  pulling less than 0.6 of the float64 parameters per answer (asp too: the changes a
  worker missed are sent, not θ̂).
"""
import numpy as np
import pytest

from common.cluster import JobConfig
from common.optim import OptimConfig, lr_at, make_optimizer
from common.placement import place_chunks
from common.wire.codec import Message
from common.wire.compress import decode_chunk
from common.wire.protocol import ProtocolError
from common.wire.pull_compress import SEED, PullDecoder, PullEncoder, pull_scheme
from tests.test_consistency import CFG, batch, gpt_job, rel_err, rows_of
from worker.model import GPT
from worker.train import compute_gradients

CHUNKS = [(0, 700), (700, 1000), (1000, 1601)]


def answer_to(decoder, encoder, who, ids, theta, version):
    encoder.note(who, {"held": decoder.held(ids)})
    arrays, ranges, encs, dtypes = encoder.answer(who, ids, [theta[b:e] for b, e in (CHUNKS[c] for c in ids)],
                                                  version)
    msg = Message(cmd="ok", sender="server:0", meta={"version": version}, arrays=arrays, ranges=ranges,
                  encs=encs, dtypes=dtypes)
    params = np.full(theta.size, np.nan)
    decoder.take(msg, params)
    return params, sum(a.nbytes for a in arrays)


@pytest.mark.parametrize("name", ["bf16", "int8", "topk"])
def test_workers_hold_the_servers_copy_and_what_is_not_sent_goes_later(name):
    rng = np.random.default_rng(0)
    scheme = pull_scheme(name, 0.05)
    n = CHUNKS[-1][1]
    enc = PullEncoder(scheme, CHUNKS, np.float32)
    a, b, c = (PullDecoder(scheme, CHUNKS, n, np.float32) for _ in range(3))
    ids = [0, 1, 2]
    theta = rng.normal(size=n).astype(np.float32)
    full = None
    for v in range(12):
        if v < 8:
            theta += 0.01 * rng.normal(size=n).astype(np.float32)
        p, nbytes = answer_to(a, enc, b"a", ids, theta, v)
        assert np.array_equal(p, enc.hat) and np.array_equal(a.hat, enc.hat)
        full = full or nbytes                         # the first answer: θ̂ = θ, in full
        if v:
            assert nbytes < full / 1.9                # a change, compressed
        if v % 3 == 0:                                # b reads every third version: the 3 changes, in order,
            q, qbytes = answer_to(b, enc, b"b", ids, theta, v)      # when smaller than θ̂ (not bf16's 3 x 2 bytes)
            assert np.array_equal(q, enc.hat) and np.array_equal(b.hat, enc.hat)
            assert (qbytes == full) == (v == 0 or name == "bf16")
        if v in (0, 11):                              # c misses 11 refreshes: more than are kept, in full
            q, qbytes = answer_to(c, enc, b"c", ids, theta, v)
            assert np.array_equal(q, enc.hat) and qbytes == full
    err = np.abs(theta - enc.hat).max()
    for v in range(12, 200):
        answer_to(a, enc, b"a", ids, theta, v)
    assert np.abs(theta - enc.hat).max() <= max(err * 0.5, 1e-6)


def test_bad_held_and_changes_for_nothing_are_refused():
    scheme = pull_scheme("int8", 0.01)
    enc = PullEncoder(scheme, CHUNKS, np.float32)
    for bad in (-2, 1.5, "3", True):
        with pytest.raises(ProtocolError, match="held"):
            enc.note(b"x", {"held": bad})
    theta = np.ones(CHUNKS[-1][1], np.float32)
    dec = PullDecoder(scheme, CHUNKS, theta.size, np.float32)
    answer_to(dec, enc, b"x", [0], theta, 0)
    arrays, ranges, encs, dtypes = enc.answer(b"x", [1], [theta[700:1000]], 0)   # x holds nothing of chunk 1
    assert encs == [None]
    enc.note(b"y", {"held": 0})
    arrays, ranges, encs, dtypes = enc.answer(b"y", [0], [theta[0:700] * 2], 1)
    assert set(encs) == {"q", "scale"}
    msg = Message(cmd="ok", sender="server:0", meta={"version": 1}, arrays=arrays, ranges=[(700, 1000)] * 2,
                  encs=encs, dtypes=dtypes)
    with pytest.raises(ProtocolError, match="holds none"):
        dec.take(msg, np.zeros(theta.size, np.float32))


def reference_bsp(job: JobConfig, optim: OptimConfig, K: int, W: int, S: int):
    """BSP with SGD where the workers hold θ̂: gradients at θ̂, the update on θ, then
    θ̂ += D(C(θ - θ̂)) per chunk with the rounding seeded by (chunk, version)."""
    model = GPT(CFG, dtype=np.float64, seed=0)
    theta = model.params.copy()
    hat = theta.copy()                                   # the first answer: θ̂ = θ, in full
    scheme = pull_scheme(job.compress_pull, job.compress_pull_ratio)
    chunks = [(b, e) for b, e, _ in place_chunks(model.layout, S, job.chunk_mb)]
    opt = make_optimizer(optim, theta.size, np.float64)
    for k in range(K):
        model.params[:] = hat
        parts = [batch(k, rows_of(r)) for r in range(W)]
        compute_gradients(model, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
        opt.step(theta, model.grads, lr_at(optim, k))
        for b, e in chunks:
            diff = theta[b:e] - hat[b:e]
            sent = scheme.encode(diff, scheme.buffers(e - b), np.random.default_rng([SEED, b, k + 1]))
            decode_chunk(scheme, [a for _, a in sent], [n for n, _ in sent], diff)
            hat[b:e] += diff
    return hat, theta


@pytest.mark.parametrize("pull", [dict(compress_pull="bf16"), dict(compress_pull="int8"),
                                  dict(compress_pull="topk", compress_pull_ratio=0.2)])
def test_bsp_with_compressed_pulls_matches_the_formula(pull, tmp_path):
    W, K, S = 2, 6, 2
    sgd = OptimConfig(optimizer="sgd", lr=0.5)
    job = JobConfig(mode="bsp", chunk_mb=0.002, **pull)           # several chunks per server
    params, summaries = gpt_job(job, sgd, S, W, K, tmp_path)
    hat, theta = reference_bsp(job, sgd, K, W, S)
    assert np.array_equal(params[0], params[1])                 # every worker holds the same θ̂
    assert rel_err(params[0], hat) <= 1e-9
    assert rel_err(hat, theta) > 1e-6                           # (θ̂ is not θ: the check can fail)


@pytest.mark.parametrize("mode", [dict(mode="local-sgd", local_steps=2), dict(mode="diloco", local_steps=2),
                                  dict(mode="asp")])
def test_every_mode_ends_with_the_servers_copy(mode, tmp_path):
    W, K = 2, 6
    job = JobConfig(compress_pull="int8", **mode)
    optim = OptimConfig(optimizer="adamw", lr=0.01)
    clients = {}
    params, _ = gpt_job(job, optim, 2, W, K, tmp_path / "int8", after_push=lambda r, c: clients.setdefault(r, c))
    if job.mode != "asp":                                       # (asp: each ends at its own version)
        assert np.array_equal(params[0], params[1])
        plain, _ = gpt_job(JobConfig(**mode), optim, 2, W, K, tmp_path / "plain")
        assert 0 < rel_err(params[0], plain[0]) < 0.05
    for r, c in clients.items():                                # after the first pull: changes, mostly
        answers = c.pushes + 2                                  # the first pull, the pushes, the last pull
        assert np.array_equal(params[r], c.answers.pull.hat)
        assert c.bytes_pulled < 0.6 * answers * params[r].nbytes
