"""Every layer's backward against central finite differences in float64.

The loss used is L = sum(out * R) for a fixed random R, so dL/dout = R and the
analytic gradient is the layer's backward fed with dout = R.
"""
import numpy as np
import pytest

from tests.gradcheck import assert_close, numerical_grad
from worker import layers

B, T, C, NH, V = 2, 5, 8, 2, 11


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_embedding(rng):
    idx = rng.integers(0, V, size=(B, T))
    idx[0, :3] = 4                       # repeated tokens exercise the scatter-add
    wte, wpe = rng.normal(size=(V, C)), rng.normal(size=(T + 3, C))
    R = rng.normal(size=(B, T, C))
    out = np.zeros((B, T, C))

    def f():
        layers.embedding_forward(out, idx, wte, wpe)
        return float((out * R).sum())

    f()
    np.testing.assert_array_equal(out, wte[idx] + wpe[:T])
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    layers.embedding_backward(dwte, dwpe, R, idx)
    assert_close(dwte, numerical_grad(f, wte), what="dwte")
    assert_close(dwpe, numerical_grad(f, wpe), what="dwpe")


def test_layernorm(rng):
    x = rng.normal(size=(B, T, C)) * 3 + 1
    w, b = rng.normal(size=C), rng.normal(size=C)
    R = rng.normal(size=(B, T, C))
    out, mean, rstd = np.zeros((B, T, C)), np.zeros((B, T)), np.zeros((B, T))

    def f():
        layers.layernorm_forward(out, mean, rstd, x, w, b)
        return float((out * R).sum())

    f()
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + layers.LN_EPS) * w + b
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    dx0 = rng.normal(size=x.shape)           # dx accumulates (residual stream)
    dx, dw, db = dx0.copy(), np.zeros(C), np.zeros(C)
    layers.layernorm_backward(dx, dw, db, R, x, mean, rstd, w)
    assert_close(dx - dx0, numerical_grad(f, x), what="dx")
    assert_close(dw, numerical_grad(f, w), what="dw")
    assert_close(db, numerical_grad(f, b), what="db")


@pytest.mark.parametrize("with_bias", [True, False])
def test_matmul(rng, with_bias):
    OC = 7
    x, w = rng.normal(size=(B, T, C)), rng.normal(size=(C, OC))
    b = rng.normal(size=OC) if with_bias else None
    R = rng.normal(size=(B, T, OC))
    out = np.zeros((B, T, OC))

    def f():
        layers.matmul_forward(out, x, w, b)
        return float((out * R).sum())

    f()
    np.testing.assert_allclose(out, x @ w + (b if with_bias else 0), rtol=1e-12)
    dx = np.full_like(x, 99.0)              # dx is assigned, whatever was there
    dw = np.ones_like(w)                    # dw accumulates onto what was there
    db = np.ones(OC) if with_bias else None
    layers.matmul_backward(dx, dw, db, R, x, w)
    assert_close(dx, numerical_grad(f, x), what="dx")
    assert_close(dw - 1, numerical_grad(f, w), what="dw")
    if with_bias:
        assert_close(db - 1, numerical_grad(f, b), what="db")


def test_attention(rng):
    qkv = rng.normal(size=(B, T, 3 * C))
    R = rng.normal(size=(B, T, C))
    out, att = np.zeros((B, T, C)), np.zeros((B, NH, T, T))

    def f():
        layers.attention_forward(out, att, qkv, NH)
        return float((out * R).sum())

    f()
    # reference: explicit loops over batch, head and position
    hs = C // NH
    ref = np.zeros((B, T, C))
    for bb in range(B):
        for h in range(NH):
            q = qkv[bb, :, h * hs:(h + 1) * hs]
            k = qkv[bb, :, C + h * hs:C + (h + 1) * hs]
            v = qkv[bb, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
            for t in range(T):
                s = q[t] @ k[:t + 1].T / np.sqrt(hs)
                p = np.exp(s - s.max())
                p /= p.sum()
                ref[bb, t, h * hs:(h + 1) * hs] = p @ v[:t + 1]
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert np.all(np.triu(att[0, 0], k=1) == 0), "a position attends to the future"
    dqkv = np.full_like(qkv, 5.0)
    layers.attention_backward(dqkv, R, qkv, att, NH)
    assert_close(dqkv, numerical_grad(f, qkv), what="dqkv")


def test_gelu(rng):
    x = rng.normal(size=(B, T, C)) * 2
    R = rng.normal(size=x.shape)
    out = np.zeros_like(x)

    def f():
        layers.gelu_forward(out, x)
        return float((out * R).sum())

    f()
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    dx = np.zeros_like(x)
    layers.gelu_backward(dx, R, x)
    assert_close(dx, numerical_grad(f, x), what="dx")


def test_residual(rng):
    a, b = rng.normal(size=(B, T, C)), rng.normal(size=(B, T, C))
    R = rng.normal(size=(B, T, C))
    out = np.zeros_like(a)

    def f():
        layers.residual_forward(out, a, b)
        return float((out * R).sum())

    f()
    np.testing.assert_array_equal(out, a + b)
    da0, db0 = rng.normal(size=a.shape), rng.normal(size=b.shape)
    da, db = da0.copy(), db0.copy()
    layers.residual_backward(da, db, R)
    assert_close(da - da0, numerical_grad(f, a), what="da")
    assert_close(db - db0, numerical_grad(f, b), what="db")


def test_softmax_crossentropy(rng):
    logits = rng.normal(size=(B, T, V)) * 3
    targets = rng.integers(0, V, size=(B, T))
    targets[1, 2] = -1                       # ignored position
    w = rng.normal(size=(B, T))              # L = sum(losses * w)
    losses, probs = np.zeros((B, T)), np.zeros((B, T, V))

    def f():
        layers.softmax_crossentropy_forward(losses, probs, logits, targets)
        return float((losses * w).sum())

    f()
    lse = np.log(np.exp(logits).sum(-1))
    for bb in range(B):
        for t in range(T):
            want = 0.0 if targets[bb, t] < 0 else lse[bb, t] - logits[bb, t, targets[bb, t]]
            assert abs(losses[bb, t] - want) < 1e-12
    dlogits = np.zeros_like(logits)
    layers.softmax_crossentropy_backward(dlogits, w, probs, targets)
    assert_close(dlogits, numerical_grad(f, logits), what="dlogits")
    assert np.all(dlogits[1, 2] == 0)


def test_crossentropy_is_stable_for_huge_logits():
    logits = np.array([[[1000.0, 0.0, -1000.0]]], dtype=np.float32)
    losses, probs = np.zeros((1, 1), np.float32), np.zeros((1, 1, 3), np.float32)
    layers.softmax_crossentropy_forward(losses, probs, logits, np.array([[2]]))
    assert np.isfinite(losses).all() and abs(losses[0, 0] - 2000.0) < 1e-3
