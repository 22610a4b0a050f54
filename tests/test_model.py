"""The whole GPT: gradients against finite differences, the public API, and learning."""
import numpy as np
import pytest

from common.optim import OptimConfig, make_optimizer
from tests.gradcheck import assert_close, numerical_grad
from worker.model import GPT, GPTConfig

TINY = GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=4)


def tiny_batch(B=2, T=5, seed=0, V=7):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))


def test_whole_model_gradient_float64():
    model = GPT(TINY, dtype=np.float64, seed=3)
    # perturb the LayerNorm gains and biases away from 1 and 0 so every path is exercised
    model.params += np.random.default_rng(0).normal(0, 0.3, size=model.params.shape)
    idx, targets = tiny_batch()
    targets[0, 1] = -1                      # an ignored position too
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    analytic = model.grads.copy()
    numeric = numerical_grad(lambda: model.forward(idx, targets), model.params)
    for e in model.layout:
        assert_close(analytic[e.offset:e.end], numeric[e.offset:e.end], rtol=1e-6, what=e.name)


def test_public_api_and_views():
    model = GPT(TINY, seed=0)
    assert model.params.dtype == np.float32 and model.params.ndim == 1
    assert model.grads.shape == model.params.shape
    named = model.named_tensors()
    assert named["wte.weight"].shape == (7, 4)
    assert named["h.1.mlp.c_fc.weight"].shape == (4, 16)       # (in, out) as GPT-2's Conv1D
    named["ln_f.bias"][...] = 42.0                              # a view, not a copy
    assert (model.params[model.layout["ln_f.bias"].offset:model.layout["ln_f.bias"].end] == 42).all()
    assert sum(v.size for v in named.values()) == model.params.size
    idx, targets = tiny_batch()
    logits = model.forward(idx)
    assert logits.shape == (2, 5, 7)
    loss = model.forward(idx, targets)
    assert isinstance(loss, float) and np.isfinite(loss)


def test_gpt2_initialisation():
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, n_embd=64)
    p = GPT(cfg, seed=0).named_tensors()
    assert abs(p["wte.weight"].std() - 0.02) < 1e-3
    assert abs(p["h.0.mlp.c_proj.weight"].std() - 0.02 / np.sqrt(16)) < 3e-4
    assert abs(p["h.3.attn.c_proj.weight"].std() - 0.02 / np.sqrt(16)) < 3e-4
    assert (p["h.2.ln_1.weight"] == 1).all() and (p["h.2.attn.c_attn.bias"] == 0).all()
    # float32 and float64 models from the same seed start alike
    a, b = GPT(cfg, np.float32, seed=5), GPT(cfg, np.float64, seed=5)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-6)
    assert not np.array_equal(GPT(cfg, seed=6).params, a.params)


def test_backward_accumulates_micro_batches():
    """Two half batches, each backward with dloss=1/2, give the full batch's gradient."""
    model = GPT(TINY, dtype=np.float64, seed=1)
    idx, targets = tiny_batch(B=4, T=5, seed=2)
    model.zero_grad()
    full = model.forward(idx, targets)
    model.backward()
    g_full = model.grads.copy()
    model.zero_grad()
    l0 = model.forward(idx[:2], targets[:2])
    model.backward(0.5)
    l1 = model.forward(idx[2:], targets[2:])
    model.backward(0.5)
    assert abs((l0 + l1) / 2 - full) < 1e-12
    np.testing.assert_allclose(model.grads, g_full, rtol=1e-10, atol=1e-14)


def test_activations_are_reused():
    model = GPT(TINY, seed=0)
    idx, targets = tiny_batch()
    model.forward(idx, targets)
    acts = model._acts
    buf = acts.blocks[0]["qkv"]
    for _ in range(3):
        model.zero_grad()
        model.forward(idx, targets)
        model.backward()
    assert model._acts is acts and model._acts.blocks[0]["qkv"] is buf


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((2, 7), dtype=np.int64), "exceeds block_size"),
    (np.full((2, 3), 7, dtype=np.int64), "token ids must lie"),
    (np.zeros((2, 3), dtype=np.float32), "integers"),
    (np.zeros(3, dtype=np.int64), "shape"),
])
def test_bad_inputs_are_refused(bad, msg):
    with pytest.raises(ValueError, match=msg):
        GPT(TINY).forward(bad)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="positive int"):
        GPTConfig(n_layer=0)


def test_tiny_model_overfits_one_batch():
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 32, size=(4, 16))
    targets = np.roll(idx, -1, axis=1)
    opt = make_optimizer(OptimConfig(optimizer="adamw", lr=1e-2), model.params.size)
    for step in range(300):
        model.zero_grad()
        loss = model.forward(idx, targets)
        model.backward()
        opt.step(model.params, model.grads, 1e-2)
        if loss < 0.05:
            break
    assert loss < 0.05, f"loss {loss:.3f} after {step + 1} steps"


@pytest.mark.parametrize("threads, B", [(2, 4), (3, 5), (4, 2)])
def test_threads_equal_one_thread(threads, B):
    """Slices of the batch in threads give the one-thread loss, logits and gradient (to
    rounding: the slices' gradients are summed in another order), also when there are
    more threads than rows and when backward accumulates micro-batches."""
    one = GPT(TINY, dtype=np.float64, seed=4)
    many = GPT(TINY, dtype=np.float64, seed=4, threads=threads)
    idx, targets = tiny_batch(B=B, T=5, seed=7)
    targets[-1, 2] = -1
    for m in (one, many):
        m.zero_grad()
        for _ in range(2):                    # two micro-batches accumulate
            m.forward(idx, targets)
            m.backward(0.5)
    assert len(many._parts) == min(threads, B)
    assert abs(one.forward(idx, targets) - many.forward(idx, targets)) < 1e-12
    np.testing.assert_allclose(many.grads, one.grads, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(many.forward(idx), one.forward(idx), rtol=1e-12)


def test_threads_reraise_errors_and_bad_values():
    with pytest.raises(ValueError, match="threads"):
        GPT(TINY, threads=0)
    model = GPT(TINY, dtype=np.float64, threads=2)
    idx, targets = tiny_batch(B=4)
    model.forward(idx, targets)
    probs = model._parts[1].acts.probs
    model._parts[1].acts.probs = None          # break the second slice only
    with pytest.raises((TypeError, AttributeError)):
        model.backward()
    # after the failure, a new step starts clean: no gradient left over in the slices
    model._parts[1].acts.probs = probs
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    ref = GPT(TINY, dtype=np.float64)
    ref.forward(idx, targets)
    ref.backward()
    np.testing.assert_allclose(model.grads, ref.grads, rtol=1e-10, atol=1e-14)
