"""The whole GPT on its CUDA path against the NumPy reference model: the checks.

Shared by tests/test_gpu_model_emulated.py (the CPU emulator of tests/cuda_emu/ with a
stand-in CuPy) and tests/test_gpu_model_gpu.py (CuPy on a GPU). Each check builds the
reference ``GPT(reference=True)`` (worker/layers.py, NumPy) and ``GPT(device="cuda")``
(worker/devicemodel.py: every layer a kernel launcher of worker/kernels/, matmuls
through cuBLAS) with the same parameters, and compares the loss and the gradient of
every named tensor: the largest absolute difference over the largest magnitude of the
reference tensor, with the tolerance of ``TOL`` (measured errors are printed; run
pytest with -s to see them). ``no_fallback`` makes any fall back to a reference layer
an error, so a whole-model pass means every layer ran its kernel.

The parameters are the initial ones plus noise, so that biases, LayerNorm gains and
every other tensor hold non-trivial values (an initialised model has zero biases).
"""
from __future__ import annotations

import numpy as np

from common.optim import AdamW, OptimConfig, clip_scale
from worker.deviceoptim import DeviceOptimizer
from worker.kernels import attention_ops, ops
from worker.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=32)   # hs 16
B, T = 2, 11

# (loss, gradients) relative tolerance per precision (model dtype in brackets); the
# 16-bit ones are against the float64 reference, and are what 8 (bf16) or 11 (fp16)
# mantissa bits allow through 2 layers, not round-off
TOL = {
    ("fp32", "float32"): (1e-6, 2e-5),
    ("fp32", "float64"): (1e-13, 1e-11),
    ("bf16", "float32"): (2e-3, 6e-2),
    ("fp16", "float32"): (3e-4, 1e-2),
}


def no_fallback(monkeypatch):
    """Any call of a reference layer from the launchers fails the test."""
    def refuse(fn, *args):
        raise AssertionError(f"{fn.__module__}.{fn.__name__} ran instead of a kernel")
    monkeypatch.setattr(ops, "_reference", refuse)
    monkeypatch.setattr(attention_ops, "_reference", refuse)


def batch(seed=0, cfg=CFG, shape=(B, T)):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, size=shape)
    targets = rng.integers(0, cfg.vocab_size, size=shape)
    targets[0, 3] = -1                                   # an ignored position
    return idx, targets


def perturbed(model, seed=1, sd=0.05):
    """The model's initial parameters plus N(0, sd) noise, as float64 on the host."""
    rng = np.random.default_rng(seed)
    params = np.asarray(model.params.get() if hasattr(model.params, "get") else model.params,
                        dtype=np.float64)
    return params + rng.normal(0.0, sd, size=params.shape)


def pair(xp, dtype, precision, cfg=CFG, attention="lse"):
    """(reference model, device model) with the same perturbed parameters; the reference
    is float64 for the 16-bit precisions."""
    ref = GPT(cfg, dtype=np.float64 if precision != "fp32" else dtype, seed=0, reference=True)
    dev = GPT(cfg, dtype=dtype, seed=0, device="cuda", precision=precision, attention=attention)
    theta = perturbed(ref)
    ref.params[...] = theta
    dev.params[...] = xp.asarray(theta.astype(dtype))   # fp32: the reference's values exactly
    return ref, dev


def rel_err(got, want):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "non-finite values"
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def check_loss_and_gradients(xp, dtype, precision, attention="lse", report=print):
    """Forward + backward of both models; the loss and every gradient compared.
    Returns (loss error, {name: gradient error})."""
    ref, dev = pair(xp, dtype, precision, attention=attention)
    idx, targets = batch()
    loss_ref = ref.forward(idx, targets)
    ref.backward()
    dev.zero_grad()
    loss_dev = dev.forward(idx, targets)
    dev.backward()
    tol_loss, tol_grad = TOL[(precision, np.dtype(dtype).name)]
    loss_err = abs(loss_dev - loss_ref) / abs(loss_ref)
    host_grads = dev.grads.get()
    errs = {n: rel_err(g, ref.named_grads()[n]) for n, g in dev.layout.views(host_grads).items()}
    worst = max(errs, key=errs.get)
    report(f"whole model {precision} ({np.dtype(dtype).name}, attention saving {attention}): loss {loss_dev:.6f} vs {loss_ref:.6f}, "
           f"rel err {loss_err:.2e} (tol {tol_loss:g}); gradients: max rel err {errs[worst]:.2e} "
           f"({worst}; tol {tol_grad:g}) over {len(errs)} tensors")
    assert loss_err <= tol_loss, f"loss {loss_dev} vs {loss_ref}"
    bad = {n: e for n, e in errs.items() if e > tol_grad}
    assert not bad, f"gradients beyond {tol_grad}: {bad}"
    assert host_grads.dtype == dtype                    # 16-bit precisions: float32 gradients
    return loss_err, errs


def check_logits(xp, dtype, precision):
    """forward without targets: host logits (NumPy float32/float64), as the reference's."""
    ref, dev = pair(xp, dtype, precision)
    idx, _ = batch()
    got, want = dev.forward(idx), ref.forward(idx)
    assert isinstance(got, np.ndarray) and type(got) is np.ndarray, type(got)
    assert got.dtype == (dtype if precision == "fp32" else np.float32)
    assert rel_err(got, want) <= TOL[(precision, np.dtype(dtype).name)][1]


def check_training_steps(xp, dtype, steps=3, report=print):
    """A few steps of the device model with the AdamW kernel (DeviceOptimizer) against
    the reference model with common.optim.AdamW: parameters after every step.

    Adam divides by sqrt(v): a gradient element near zero whose float32 rounding
    differs between the two models (at 1e-7 relative) can move its parameter by up to
    a whole step lr the other way. So the parameters' difference is measured in units
    of lr (the largest |difference| / lr), with a float32 bound of 5% of a step per
    step; in float64 the two agree to round-off."""
    cfg = OptimConfig(optimizer="adamw", lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    ref, dev = pair(xp, dtype, "fp32")
    ranges = ref.layout.decay_ranges()
    opt_ref = AdamW(cfg, ref.num_params(), dtype, ranges)
    opt_dev = DeviceOptimizer(xp, cfg, dev.num_params(), dtype, ranges)
    per_step = 0.05 if np.dtype(dtype) == np.float32 else 1e-9
    errs = []
    for step in range(steps):
        idx, targets = batch(seed=10 + step)
        for m, opt in ((ref, opt_ref), (dev, opt_dev)):
            m.zero_grad()
            m.forward(idx, targets)
            m.backward()
            opt.step(m.params, m.grads, cfg.lr, clip_scale(10.0, 1.0))   # a clipping scale too
        errs.append(float(np.abs(dev.params.get().astype(np.float64) - ref.params).max()) / cfg.lr)
        assert errs[-1] <= per_step * (step + 1), f"step {step + 1}: params differ by {errs[-1]:.2e} lr"
    assert opt_dev.t == opt_ref.t == steps
    report(f"{steps} AdamW steps ({np.dtype(dtype).name}): params max |difference| / lr after each "
           "step " + ", ".join(f"{e:.2e}" for e in errs) + f" (bound {per_step:g} per step)")
    return errs


def check_loss_scaling(xp):
    """fp16 with a loss scale far beyond fp16's range: the backward overflows, the scale
    is halved and the backward re-run until it does not; the gradient handed on is the
    unscaled one, as with a sane scale."""
    ref, dev = pair(xp, np.float32, "fp16")
    idx, targets = batch()
    dev.forward(idx, targets)
    dev.backward()
    want = dev.grads.get()
    scaler = dev._gpu.scaler
    scaler.scale, scaler.overflows = 2.0 ** 40, 0
    dev.zero_grad()
    dev.forward(idx, targets)
    dev.backward()
    assert scaler.overflows > 0 and scaler.scale < 2.0 ** 40
    assert rel_err(dev.grads.get(), want) <= 1e-2
    return scaler.overflows


def check_accumulation(xp, dtype):
    """Two backward calls without zero_grad add up (micro-batches), as on the CPU."""
    ref, dev = pair(xp, dtype, "fp32")
    for m in (ref, dev):
        m.zero_grad()
        for s in (0, 1):
            idx, targets = batch(seed=s)
            m.forward(idx, targets)
            m.backward(0.5)
    assert rel_err(dev.grads.get(), ref.grads) <= TOL[("fp32", np.dtype(dtype).name)][1]
