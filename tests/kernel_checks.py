"""Every CUDA kernel against its NumPy layer, forward and backward: the checks.

Shared by tests/test_kernels_gpu.py (real CuPy on a GPU) and
tests/test_kernels_emulated.py (the CPU emulator of tests/cuda_emu/). Each check builds
inputs in NumPy, runs the reference (``worker.layers``, ``common.optim``) on host
copies and ``worker.kernels`` on device copies, and compares with a tolerance stated
per kernel: the largest absolute difference over the largest reference magnitude.
Outputs that a layer ASSIGNS are pre-filled with garbage and outputs it ACCUMULATES
with random values, so both halves of the contract are checked. Each check also
asserts that the kernel path ran (``dev.calls`` counts the kernels launched), so a
silent fall back to the reference cannot pass for a kernel.
"""
from __future__ import annotations

import numpy as np

from common.optim import AdamW, OptimConfig
from worker import kernels, layers
from worker.kernels import reference

# relative tolerance per kernel and dtype; float64 ones are round-off only
TOL = {
    "embedding": {np.float32: 1e-6, np.float64: 1e-13},
    "layernorm": {np.float32: 2e-5, np.float64: 1e-12},
    "bias": {np.float32: 1e-5, np.float64: 1e-12},
    "attention": {np.float32: 1e-4, np.float64: 1e-11},
    "gelu": {np.float32: 1e-5, np.float64: 1e-13},
    "residual": {np.float32: 0.0, np.float64: 0.0},
    "softmax_ce": {np.float32: 1e-5, np.float64: 1e-12},
    "adamw": {np.float32: 1e-5, np.float64: 1e-12},
}


def close(got, want, rtol, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all() == np.isfinite(want).all(), f"{what}: non-finite values"
    err = np.abs(got - want).max() if got.size else 0.0
    scale = max(np.abs(want).max() if want.size else 0.0, 1e-30)
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} x {scale:.3e}"


class Run:
    """Host and device copies of the same arrays: ``h[name]`` NumPy, ``d[name]`` device."""

    def __init__(self, dev, **arrays):
        self.dev = dev
        self.h = {k: np.array(v) for k, v in arrays.items()}
        self.d = {k: dev.to_dev(v) for k, v in arrays.items()}

    def compare(self, names, rtol, what):
        for n in names:
            close(self.dev.to_host(self.d[n]), self.h[n], rtol, f"{what}: {n}")


def _launched(dev, *prefixes):
    for p in prefixes:
        assert any(name.startswith(p) for name in dev.calls), f"kernel {p} never launched"


def check_embedding(dev, dtype, rng, index_dtype=np.int64, B=3, T=7, C=40, V=13):
    idx = rng.integers(0, V, size=(B, T)).astype(index_dtype)
    idx[0, :4] = 5                                   # a run of one id
    idx[2, :] = 5
    idx[1, -1] = V - 1                               # the last row of the table
    r = Run(dev, idx=idx, wte=rng.normal(size=(V, C)).astype(dtype),
            wpe=rng.normal(size=(T + 2, C)).astype(dtype),
            out=np.full((B, T, C), 7.0, dtype), dout=rng.normal(size=(B, T, C)).astype(dtype),
            dwte=rng.normal(size=(V, C)).astype(dtype),
            dwpe=rng.normal(size=(T + 2, C)).astype(dtype))
    layers.embedding_forward(r.h["out"], r.h["idx"], r.h["wte"], r.h["wpe"])
    kernels.embedding_forward(r.d["out"], r.d["idx"], r.d["wte"], r.d["wpe"])
    layers.embedding_backward(r.h["dwte"], r.h["dwpe"], r.h["dout"], r.h["idx"])
    kernels.embedding_backward(r.d["dwte"], r.d["dwpe"], r.d["dout"], r.d["idx"])
    r.compare(["out", "dwte", "dwpe"], TOL["embedding"][dtype], "embedding")
    _launched(dev, "embedding_forward", "embedding_backward_wte", "embedding_backward_wpe")


def check_layernorm(dev, dtype, rng, C=40, B=2, T=5):
    x = (rng.normal(size=(B, T, C)) * 3 + 1).astype(dtype)
    r = Run(dev, x=x, w=rng.normal(size=C).astype(dtype), b=rng.normal(size=C).astype(dtype),
            out=np.full((B, T, C), 7.0, dtype), mean=np.full((B, T), 7.0, dtype),
            rstd=np.full((B, T), 7.0, dtype), dout=rng.normal(size=(B, T, C)).astype(dtype),
            dx=rng.normal(size=(B, T, C)).astype(dtype), dw=rng.normal(size=C).astype(dtype),
            db=rng.normal(size=C).astype(dtype))
    for f, a in ((layers.layernorm_forward, r.h), (kernels.layernorm_forward, r.d)):
        f(a["out"], a["mean"], a["rstd"], a["x"], a["w"], a["b"])
    for f, a in ((layers.layernorm_backward, r.h), (kernels.layernorm_backward, r.d)):
        f(a["dx"], a["dw"], a["db"], a["dout"], a["x"], a["mean"], a["rstd"], a["w"])
    r.compare(["out", "mean", "rstd", "dx", "dw", "db"], TOL["layernorm"][dtype], "layernorm")
    _launched(dev, "layernorm_forward", "layernorm_backward_dx", "layernorm_backward_dwdb",
              "column_accumulate")


def check_matmul_bias(dev, dtype, rng):
    B, T, C, OC = 2, 9, 24, 70
    r = Run(dev, x=rng.normal(size=(B, T, C)).astype(dtype),
            w=rng.normal(size=(C, OC)).astype(dtype), b=rng.normal(size=OC).astype(dtype),
            out=np.full((B, T, OC), 7.0, dtype), dout=rng.normal(size=(B, T, OC)).astype(dtype),
            dx=np.full((B, T, C), 7.0, dtype), dw=rng.normal(size=(C, OC)).astype(dtype),
            db=rng.normal(size=OC).astype(dtype))
    for f, a in ((layers.matmul_forward, r.h), (kernels.matmul_forward, r.d)):
        f(a["out"], a["x"], a["w"], a["b"])
    for f, a in ((layers.matmul_backward, r.h), (kernels.matmul_backward, r.d)):
        f(a["dx"], a["dw"], a["db"], a["dout"], a["x"], a["w"])
    r.compare(["out", "dx", "dw", "db"], TOL["bias"][dtype], "matmul + bias")
    _launched(dev, "bias_forward", "column_partial_sums")


def _attention_inputs(dev, dtype, rng, B, T, NH, hs, saved):
    C = NH * hs
    return Run(dev, qkv=rng.normal(size=(B, T, 3 * C)).astype(dtype),
               out=np.full((B, T, C), 7.0, dtype), saved=np.full(saved, 7.0, dtype),
               dout=rng.normal(size=(B, T, C)).astype(dtype),
               dqkv=np.full((B, T, 3 * C), 7.0, dtype))


def check_attention_att(dev, dtype, rng, hs=16, T=37, B=2, NH=2):
    """Design 1: att (B,NH,T,T) saved, as the reference."""
    r = _attention_inputs(dev, dtype, rng, B, T, NH, hs, (B, NH, T, T))
    for f, a in ((layers.attention_forward, r.h), (kernels.attention_forward, r.d)):
        f(a["out"], a["saved"], a["qkv"], NH)
    for f, a in ((layers.attention_backward, r.h), (kernels.attention_backward, r.d)):
        f(a["dqkv"], a["dout"], a["qkv"], a["saved"], NH)
    r.compare(["out", "saved", "dqkv"], TOL["attention"][dtype], f"attention (att, hs={hs})")
    _launched(dev, "causal_softmax_forward", "causal_softmax_backward")


def check_attention_lse(dev, dtype, rng, hs=16, T=37, expect_kernel=True, B=2, NH=2):
    """Design 2: lse (B,NH,T) saved; out and dqkv must equal the reference layer's."""
    r = _attention_inputs(dev, dtype, rng, B, T, NH, hs, (B, NH, T))
    att = np.zeros((B, NH, T, T), dtype)
    layers.attention_forward(r.h["out"], att, r.h["qkv"], NH)
    reference.attention_lse_forward(np.zeros_like(r.h["out"]), r.h["saved"], r.h["qkv"], NH)
    layers.attention_backward(r.h["dqkv"], r.h["dout"], r.h["qkv"], att, NH)
    kernels.attention_forward(r.d["out"], r.d["saved"], r.d["qkv"], NH)
    kernels.attention_backward(r.d["dqkv"], r.d["dout"], r.d["qkv"], r.d["saved"], NH)
    r.compare(["out", "saved", "dqkv"], TOL["attention"][dtype], f"attention (lse, hs={hs})")
    if expect_kernel:
        _launched(dev, "attention_forward_flash", "attention_backward_dq_flash",
                  "attention_backward_dkdv_flash")
    else:
        assert not any("flash" in n for n in dev.calls), dev.calls


def check_gelu(dev, dtype, rng, shape=(3, 5, 33)):
    r = Run(dev, x=(rng.normal(size=shape) * 3).astype(dtype), out=np.full(shape, 7.0, dtype),
            dout=rng.normal(size=shape).astype(dtype), dx=np.full(shape, 7.0, dtype))
    for f, a in ((layers.gelu_forward, r.h), (kernels.gelu_forward, r.d)):
        f(a["out"], a["x"])
    for f, a in ((layers.gelu_backward, r.h), (kernels.gelu_backward, r.d)):
        f(a["dx"], a["dout"], a["x"])
    r.compare(["out", "dx"], TOL["gelu"][dtype], "gelu")
    _launched(dev, "gelu_forward", "gelu_backward")


def check_residual(dev, dtype, rng):
    shape = (2, 7, 19)
    r = Run(dev, a=rng.normal(size=shape).astype(dtype), b=rng.normal(size=shape).astype(dtype),
            out=np.full(shape, 7.0, dtype), dout=rng.normal(size=shape).astype(dtype),
            da=rng.normal(size=shape).astype(dtype), db=rng.normal(size=shape).astype(dtype),
            same=rng.normal(size=shape).astype(dtype))
    for f, a in ((layers.residual_forward, r.h), (kernels.residual_forward, r.d)):
        f(a["out"], a["a"], a["b"])
    for f, a in ((layers.residual_backward, r.h), (kernels.residual_backward, r.d)):
        f(a["da"], a["db"], a["dout"])
        f(a["same"], a["same"], a["dout"])         # one buffer for both: gets dout twice
    r.compare(["out", "da", "db", "same"], TOL["residual"][dtype], "residual")
    _launched(dev, "residual_forward", "residual_backward")


def check_softmax_ce(dev, dtype, rng, V=101, BT=(2, 9), index_dtype=np.int64):
    B, T = BT
    targets = rng.integers(0, V, size=(B, T)).astype(index_dtype)
    targets[0, 1] = -1                               # ignored positions
    targets[-1, -1] = -100
    r = Run(dev, logits=(rng.normal(size=(B, T, V)) * 4).astype(dtype), targets=targets,
            losses=np.full((B, T), 7.0, dtype), probs=np.full((B, T, V), 7.0, dtype),
            dlosses=rng.normal(size=(B, T)).astype(dtype),
            dlogits=np.full((B, T, V), 7.0, dtype))
    for f, a in ((layers.softmax_crossentropy_forward, r.h),
                 (kernels.softmax_crossentropy_forward, r.d)):
        f(a["losses"], a["probs"], a["logits"], a["targets"])
    for f, a in ((layers.softmax_crossentropy_backward, r.h),
                 (kernels.softmax_crossentropy_backward, r.d)):
        f(a["dlogits"], a["dlosses"], a["probs"], a["targets"])
    r.compare(["losses", "probs", "dlogits"], TOL["softmax_ce"][dtype], f"softmax-CE V={V}")
    got = dev.to_host(r.d["losses"])
    assert got[0, 1] == 0 and got[-1, -1] == 0, "ignored targets must give a zero loss"
    assert not dev.to_host(r.d["dlogits"])[0, 1].any(), "ignored targets: zero gradient"
    _launched(dev, "softmax_crossentropy_forward", "softmax_crossentropy_backward")


def check_adamw(dev, dtype, rng):
    n = 1000
    ranges = [(10, 300), (700, 800), (500, 700), (900, 900)]   # unsorted, touching, empty
    cfg = OptimConfig(optimizer="adamw", lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                      weight_decay=0.1)
    opt = AdamW(cfg, n, dtype, ranges)
    p_h = rng.normal(size=n).astype(dtype)
    p_d, m_d, v_d = dev.to_dev(p_h), dev.to_dev(np.zeros(n, dtype)), dev.to_dev(np.zeros(n, dtype))
    for step in range(1, 4):
        g = rng.normal(size=n).astype(dtype)
        lr = cfg.lr * step / 3
        opt.step(p_h, g, lr, grad_scale=0.5)
        kernels.adamw_update(p_d, dev.to_dev(g), m_d, v_d, lr=lr, step=step, beta1=cfg.beta1,
                             beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             grad_scale=0.5, decay_ranges=ranges)
        tol = TOL["adamw"][dtype]
        close(dev.to_host(p_d), p_h, tol, f"adamw step {step}: params")
        close(dev.to_host(m_d), opt.m, tol, f"adamw step {step}: m")
        close(dev.to_host(v_d), opt.v, tol, f"adamw step {step}: v")
    _launched(dev, "adamw_update")


def check_deterministic(dev, dtype, rng):
    """The backward kernels give the same bits when run twice (no atomics)."""
    B, T, C, V, NH = 2, 33, 40, 7, 2
    idx = dev.to_dev(rng.integers(0, V, size=(B, T)))
    dout = dev.to_dev(rng.normal(size=(B, T, C)).astype(dtype))
    x = dev.to_dev(rng.normal(size=(B, T, C)).astype(dtype))
    w = dev.to_dev(rng.normal(size=C).astype(dtype))
    qkv = dev.to_dev(rng.normal(size=(B, T, 3 * C)).astype(dtype))
    results = []
    for _ in range(2):
        xp = dev.xp
        dwte, dwpe = xp.zeros((V, C), dtype), xp.zeros((T, C), dtype)
        kernels.embedding_backward(dwte, dwpe, dout, idx)
        mean, rstd, ln = xp.zeros((B, T), dtype), xp.zeros((B, T), dtype), xp.zeros_like(x)
        kernels.layernorm_forward(ln, mean, rstd, x, w, w)
        dx, dw, db = xp.zeros_like(x), xp.zeros_like(w), xp.zeros_like(w)
        kernels.layernorm_backward(dx, dw, db, dout, x, mean, rstd, w)
        lse, out, dqkv = xp.zeros((B, NH, T), dtype), xp.zeros_like(x), xp.zeros_like(qkv)
        kernels.attention_forward(out, lse, qkv, NH)
        kernels.attention_backward(dqkv, dout, qkv, lse, NH)
        results.append([dev.to_host(a) for a in (dwte, dwpe, dx, dw, db, dqkv)])
    for a, b in zip(*results):
        assert np.array_equal(a, b)


def check_fallbacks(dev, rng):
    """Arrays the kernels do not take (mixed element types, non-contiguous views) go to
    the reference layer, through the device's array module, and give its results."""
    x64 = rng.normal(size=(2, 3, 8))
    out = dev.to_dev(np.zeros(x64.shape, np.float32))
    kernels.gelu_forward(out, dev.to_dev(x64))                 # float64 in, float32 out
    want = np.zeros(x64.shape, np.float32)
    layers.gelu_forward(want, x64)
    close(dev.to_host(out), want, 1e-6, "gelu mixed-dtype fallback")

    big = rng.normal(size=(2, 3, 16)).astype(np.float32)
    view = dev.to_dev(big)[:, :, ::2]                      # not contiguous
    out = dev.to_dev(np.zeros((2, 3, 8), np.float32))
    kernels.gelu_forward(out, view)
    want = np.zeros((2, 3, 8), np.float32)
    layers.gelu_forward(want, big[:, :, ::2])
    close(dev.to_host(out), want, 1e-6, "gelu strided fallback")

    C = 8
    xs = dev.to_dev(big)[:, :, ::2]
    w, b = dev.to_dev(np.ones(C, np.float32)), dev.to_dev(np.zeros(C, np.float32))
    out, mean, rstd = (dev.to_dev(np.zeros(s, np.float32)) for s in ((2, 3, C), (2, 3), (2, 3)))
    kernels.layernorm_forward(out, mean, rstd, xs, w, b)
    want = np.zeros((2, 3, C), np.float32)
    layers.layernorm_forward(want, np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32),
                             big[:, :, ::2], np.ones(C, np.float32), np.zeros(C, np.float32))
    close(dev.to_host(out), want, 1e-5, "layernorm strided fallback")
    assert not dev.calls, f"fallback inputs launched kernels: {sorted(dev.calls)}"


# --- the one list of checks, run on every backend ----------------------------------------

class Case:
    """One kernel check with its arguments; ``gpu_only`` for shapes too slow to emulate."""

    def __init__(self, name: str, check, gpu_only: bool = False, **kwargs):
        self.name, self.check, self.gpu_only, self.kwargs = name, check, gpu_only, kwargs

    def run(self, dev, rng):
        self.check(dev, rng=rng, **self.kwargs)

    def __repr__(self):
        return self.name


def _cases():
    from tests import half_checks as hc
    from worker.kernels import halfs
    f32, f64 = np.float32, np.float64
    out = []
    for dtype in (f32, f64):
        d = np.dtype(dtype).name
        out += [Case(f"embedding-{d}-{np.dtype(i).name}", check_embedding, dtype=dtype, index_dtype=i)
                for i in (np.int32, np.int64)]
        out += [Case(f"layernorm-{d}-C{C}", check_layernorm, C >= 768, dtype=dtype, C=C) for C in (40, 300, 768)]
        out += [Case(f"matmul_bias-{d}", check_matmul_bias, dtype=dtype)]
        out += [Case(f"attention_att-{d}-T{T}", check_attention_att, T >= 300, dtype=dtype, hs=16, T=T)
                for T in (1, 37, 64, 300)]
        # head size 80 runs the 128-wide float kernel; in double it is beyond the kernels
        out += [Case(f"attention_lse-{d}-hs{hs}-T{T}", check_attention_lse, T >= 70 and hs >= 64, dtype=dtype,
                     hs=hs, T=T, expect_kernel=not (hs > 64 and dtype == f64))
                for hs, T in ((16, 1), (16, 37), (16, 64), (64, 300), (80, 37), (128, 70))]
        out += [Case(f"gelu-{d}", check_gelu, dtype=dtype), Case(f"residual-{d}", check_residual, dtype=dtype)]
        out += [Case(f"softmax_ce-{d}-V{V}-{np.dtype(i).name}", check_softmax_ce, V > 10000, dtype=dtype, V=V, BT=BT,
                     index_dtype=i)
                for V, BT, i in ((101, (2, 9), np.int64), (101, (2, 9), np.int32), (8200, (1, 3), np.int64),
                                 (50257, (2, 33), np.int64))]
        out += [Case(f"adamw-{d}", check_adamw, dtype=dtype)]
    out += [Case("deterministic-float32", check_deterministic, dtype=f32), Case("fallbacks", check_fallbacks),
            Case("half_conversions_bit_for_bit", hc.check_convert)]
    for dtype, name in zip(halfs.HALF_DTYPES, ("bf16", "fp16")):
        out += [Case(f"half_layers-{name}", hc.check_half_layers, dtype=dtype),
                Case(f"half_attention_att-{name}", hc.check_half_attention_att, dtype=dtype)]
    return out


CASES = _cases()


def cases(emulated: bool) -> list[Case]:
    """The checks a backend runs: every one on a GPU; on the emulator, those it runs in time."""
    return [c for c in CASES if not (emulated and c.gpu_only)]
