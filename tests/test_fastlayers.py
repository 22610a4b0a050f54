"""The fast layers (worker/fastlayers.py) against the reference layers (worker/layers.py),
and their backwards against float64 finite differences; the whole model's fast path
against its reference path."""
import numpy as np
import pytest

from tests.gradcheck import assert_close, numerical_grad
from worker import fastlayers as F
from worker import layers as L
from worker.model import GPT, GPTConfig

B, T, C, NH, V = 2, 5, 8, 2, 11


@pytest.fixture
def rng():
    return np.random.default_rng(99)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 elements and attention blocks of 2 rows, so that every loop over
    chunks and blocks runs several times (with a ragged last one) on these small shapes."""
    monkeypatch.setattr(F, "CHUNK_ELEMS", 16)
    monkeypatch.setattr(F, "ATT_BLOCK", 2)


def test_layernorm(rng):
    x = rng.normal(size=(B, T, C)) * 3 + 1
    w, b = rng.normal(size=C), rng.normal(size=C)
    R = rng.normal(size=(B, T, C))
    S = F.Scratch()
    out, xhat, mean, rstd = np.zeros((B, T, C)), np.zeros((B, T, C)), np.zeros((B, T)), np.zeros((B, T))

    def f():
        F.layernorm_forward(out, xhat, mean, rstd, x, w, b, S)
        return float((out * R).sum())

    f()
    ref_out, ref_mean, ref_rstd = np.zeros_like(out), np.zeros_like(mean), np.zeros_like(rstd)
    L.layernorm_forward(ref_out, ref_mean, ref_rstd, x, w, b)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-12)
    np.testing.assert_allclose(xhat, (x - ref_mean[..., None]) * ref_rstd[..., None], rtol=1e-12, atol=1e-12)
    dx0 = rng.normal(size=x.shape)                     # dx accumulates (residual stream)
    dx, dw, db = dx0.copy(), np.ones(C), np.ones(C)
    F.layernorm_backward(dx, dw, db, R.copy(), xhat, rstd, w, S)
    rdx, rdw, rdb = dx0.copy(), np.ones(C), np.ones(C)
    L.layernorm_backward(rdx, rdw, rdb, R, x, mean, rstd, w)
    for got, want, what in ((dx, rdx, "dx"), (dw, rdw, "dw"), (db, rdb, "db")):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12, err_msg=what)
    assert_close(dx - dx0, numerical_grad(f, x), what="dx")
    assert_close(dw - 1, numerical_grad(f, w), what="dw")
    assert_close(db - 1, numerical_grad(f, b), what="db")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_forward_is_bit_identical(rng, dtype):
    x = (rng.normal(size=(B, T, 4 * C)) * 3).astype(dtype)
    out, ref, t = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    F.gelu_forward(out, t, x)
    L.gelu_forward(ref, x)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_allclose(t, np.tanh(L.GELU_SCALE * (x + 0.044715 * x ** 3)), rtol=1e-5)


def test_gelu_backward(rng):
    x = rng.normal(size=(B, T, 4 * C)) * 2
    R = rng.normal(size=x.shape)
    out, t = np.zeros_like(x), np.zeros_like(x)

    def f():
        F.gelu_forward(out, t, x)
        return float((out * R).sum())

    f()
    dx, ref = np.full_like(x, 7.0), np.zeros_like(x)   # dx is assigned
    F.gelu_backward(dx, R, x, t, F.Scratch())
    L.gelu_backward(ref, R, x)
    np.testing.assert_allclose(dx, ref, rtol=1e-12, atol=1e-14)
    inplace = R.copy()                                  # dx may be dout
    F.gelu_backward(inplace, inplace, x, t, F.Scratch())
    np.testing.assert_array_equal(inplace, dx)
    assert_close(dx, numerical_grad(f, x), what="dx")


@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul_backward(rng, with_bias):
    OC = 7
    x, w = rng.normal(size=(B, T, C)), rng.normal(size=(C, OC))
    dout = rng.normal(size=(B, T, OC))
    got = [np.full_like(x, 9.0), np.ones_like(w), np.ones(OC) if with_bias else None]
    want = [np.zeros_like(x), np.ones_like(w), np.ones(OC) if with_bias else None]
    F.matmul_backward(*got, dout, x, w, F.Scratch())
    L.matmul_backward(*want, dout, x, w)
    for a, b in zip(got, want):
        if b is not None:
            np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("n_tokens", [5, 7])
def test_attention(rng, n_tokens):
    qkv = rng.normal(size=(B, n_tokens, 3 * C))
    R = rng.normal(size=(B, n_tokens, C))
    S = F.Scratch()
    out, att = np.zeros((B, n_tokens, C)), np.zeros((B, NH, n_tokens, n_tokens))

    def f():
        F.attention_forward(out, att, qkv, NH, S)
        return float((out * R).sum())

    f()
    ref, ref_att = np.zeros_like(out), np.zeros_like(att)
    L.attention_forward(ref, ref_att, qkv, NH)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(att, ref_att, rtol=1e-12, atol=1e-14)
    assert np.all(np.triu(att, k=1) == 0), "a position attends to the future"
    dqkv, ref_dqkv = np.full_like(qkv, 5.0), np.zeros_like(qkv)
    F.attention_backward(dqkv, R, qkv, att, NH, S)
    L.attention_backward(ref_dqkv, R, qkv, ref_att, NH)
    np.testing.assert_allclose(dqkv, ref_dqkv, rtol=1e-11, atol=1e-13)
    again = np.zeros_like(qkv)                           # att is left intact: backward repeats
    F.attention_backward(again, R, qkv, att, NH, S)
    np.testing.assert_array_equal(again, dqkv)
    assert_close(dqkv, numerical_grad(f, qkv), what="dqkv")


def test_embedding_backward(rng):
    idx = rng.integers(0, V, size=(B, T))
    idx[0, :3] = 4                                      # repeated tokens
    dout = rng.normal(size=(B, T, C))
    dwte, dwpe = np.ones((V, C)), np.ones((T + 3, C))
    rdwte, rdwpe = dwte.copy(), dwpe.copy()
    F.embedding_backward(dwte, dwpe, dout, idx)
    L.embedding_backward(rdwte, rdwpe, dout, idx)
    np.testing.assert_allclose(dwte, rdwte, rtol=1e-13)
    np.testing.assert_allclose(dwpe, rdwpe, rtol=1e-13)


CFG = GPTConfig(vocab_size=13, block_size=9, n_layer=2, n_head=2, n_embd=8)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 2e-5)])
def test_fast_model_equals_reference_model(dtype, rtol):
    fast, ref = GPT(CFG, dtype, seed=2), GPT(CFG, dtype, seed=2, reference=True)
    fast.params += np.random.default_rng(3).normal(0, 0.1, size=fast.params.shape).astype(dtype)
    ref.params[...] = fast.params
    rng = np.random.default_rng(4)
    for _ in range(2):                                   # twice: reused buffers stay correct
        idx, targets = rng.integers(0, 13, size=(3, 9)), rng.integers(0, 13, size=(3, 9))
        targets[1, 4] = -1
        for m in (fast, ref):
            m.zero_grad()
        lf, lr = fast.forward(idx, targets), ref.forward(idx, targets)
        assert abs(lf - lr) <= rtol * abs(lr)
        fast.backward()
        ref.backward()
        for e in fast.layout:
            a, b = fast.grads[e.offset:e.end], ref.grads[e.offset:e.end]
            assert np.abs(a - b).max() <= rtol * np.abs(b).max(), e.name
    np.testing.assert_allclose(fast.forward(idx), ref.forward(idx), rtol=rtol, atol=rtol)


def test_reference_model_gradient_float64():
    """The reference path is still checked against finite differences (test_model.py
    checks the default, fast path the same way)."""
    model = GPT(CFG, np.float64, seed=5, reference=True)
    model.params += np.random.default_rng(0).normal(0, 0.3, size=model.params.shape)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 13, size=(2, 4)), rng.integers(0, 13, size=(2, 4))
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    numeric = numerical_grad(lambda: model.forward(idx, targets), model.params)
    assert_close(model.grads, numeric, rtol=1e-6)


def test_steps_after_the_first_allocate_no_scratch():
    """Layers of different widths share scratch names; each keeps its own buffer, so a
    later step reuses every buffer of the first (no allocation, no page faults)."""
    model = GPT(CFG, np.float32, seed=0, threads=2)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 13, size=(4, 9)), rng.integers(0, 13, size=(4, 9))

    def step():
        model.zero_grad()
        model.forward(idx, targets)
        model.backward()
        return [{k: id(v) for k, v in part.acts.scratch._bufs.items()} for part in model._parts]

    first = step()
    assert step() == first and all(len(bufs) > 5 for bufs in first)


def test_switching_paths_on_one_model():
    """``reference`` may be flipped on a live model: the activations follow the path."""
    model = GPT(CFG, np.float64, seed=1)
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 13, size=(2, 9)), rng.integers(0, 13, size=(2, 9))
    fast = model.forward(idx, targets)
    model.reference = True
    assert abs(model.forward(idx, targets) - fast) < 1e-12
    model.backward()
    model.reference = False
    assert abs(model.forward(idx, targets) - fast) < 1e-12
    model.backward()
