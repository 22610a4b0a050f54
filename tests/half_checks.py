"""The 16-bit (bf16, fp16) kernels against the NumPy layers: the checks.

Shared by tests/test_kernels_emulated.py and tests/test_kernels_gpu.py, beside the
float32/float64 checks of tests/kernel_checks.py. Inputs are drawn in float64, rounded
to the 16-bit type, and the reference layer (``worker.layers``) runs in float64 on
exactly those rounded values; so the kernel's only error is its float arithmetic and
the final rounding of each 16-bit output. Hence the tolerances, relative to the
largest reference magnitude:
- 16-bit outputs: ``HALF_TOL`` (about two units in the last place: bf16 has 8
  significant bits, fp16 11);
- what the kernels keep in float32 (LayerNorm's mean and rstd, lse, losses, and the
  parameter gradients, accumulated into float32): ``WIDE_TOL``, float32 round-off.
Also: the conversions, bit for bit (bf16 and fp16 round to nearest even: ties,
subnormals, overflow to inf, NaN), against ``halfs.from_float32`` (NumPy's float16
cast for fp16).
"""
from __future__ import annotations

import numpy as np

from tests.kernel_checks import close
from worker import kernels, layers
from worker.kernels import halfs, reference

HALF_TOL = {halfs.BF16: 1.6e-2, halfs.FP16: 2e-3}
WIDE_TOL = 2e-5


class HalfRun:
    """``h[name]``: float64 host values; ``d[name]``: device arrays, 16-bit unless the
    name is in ``wide`` (float32). Inputs are rounded to what the device holds."""

    def __init__(self, dev, dtype, wide=(), **arrays):
        self.dev, self.dtype, self.h, self.d = dev, dtype, {}, {}
        for k, v in arrays.items():
            v = np.asarray(v)
            if v.dtype.kind in "iu":                        # ids stay as they are
                self.h[k], self.d[k] = v.copy(), dev.to_dev(v)
            elif k in wide:
                self.h[k] = v.astype(np.float32).astype(np.float64)
                self.d[k] = dev.to_dev(v.astype(np.float32))
            else:
                bits = halfs.from_float32(v, dtype)
                self.h[k] = halfs.to_float32(bits).astype(np.float64)
                self.d[k] = dev.to_dev(bits)

    def compare(self, names, what, wide=()):
        for n in names:
            got = self.dev.to_host(self.d[n])
            got = got if n in wide else halfs.to_float32(got)
            close(got, self.h[n], WIDE_TOL if n in wide else HALF_TOL[self.dtype], f"{what} ({n})")


def check_convert(dev, rng):
    """float32 -> bf16 / fp16 -> float32, bit for bit against halfs.py / NumPy."""
    special = np.array([0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11,
                        65504.0, 65519.0, 65520.0, 1e6, -1e6, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 2 ** -14,
                        2 ** -14 - 2 ** -25, 2.5 * 2 ** -24, 3.5 * 2 ** -24, -1022.5 * 2 ** -24, 1e-40, 3.4e38,
                        np.inf, -np.inf, np.nan], dtype=np.float32)              # ties, subnormals, ...
    x = np.concatenate([special, (rng.normal(size=4000) * 10.0 ** rng.uniform(-9, 6, 4000))
                        .astype(np.float32)])
    xd = dev.to_dev(x)
    for dtype in halfs.HALF_DTYPES:
        half = dev.xp.zeros(x.shape, dtype=dtype)
        kernels.convert(half, xd)
        got_h = dev.to_host(half)
        with np.errstate(over="ignore"):             # 1e6 and 3.4e38 overflow fp16 to inf
            want_h = halfs.from_float32(x, dtype)
        nan = np.isnan(halfs.to_float32(want_h))
        assert np.array_equal(np.isnan(halfs.to_float32(got_h)), nan), f"{dtype}: NaN where not expected"
        got, want = got_h.view(np.uint16), want_h.view(np.uint16)
        bad = np.flatnonzero((got != want) & ~nan)
        assert not bad.size, (f"{dtype} conversion differs at {x[bad][:5]}: got "
                              f"{[hex(v) for v in got[bad][:5]]}, want {[hex(v) for v in want[bad][:5]]}")
        back = dev.xp.zeros(x.shape, dtype=np.float32)
        kernels.convert(back, half)
        back, ref = dev.to_host(back), halfs.to_float32(want_h)
        assert np.array_equal(back[~nan], ref[~nan]) and np.isnan(back[nan]).all()


def check_half_layers(dev, dtype, rng):
    """Every layer the model uses, in ``dtype`` (BF16 or FP16), forward and backward."""
    B, T, C, NH, V = 2, 37, 32, 2, 50
    n = rng.normal
    ids = rng.integers(0, V, size=(B, T))
    wide = ("mean", "rstd", "dw", "db", "dwte", "dwpe", "lse", "losses", "dlosses")
    r = HalfRun(dev, dtype, wide, idx=ids, wte=n(size=(V, C)), wpe=n(size=(T, C)), emb=np.zeros((B, T, C)),
                dwte=n(size=(V, C)), dwpe=n(size=(T, C)), dout=n(size=(B, T, C)),
                x=n(size=(B, T, C)) * 3 + 1, w=n(size=C), b=n(size=C), ln=np.zeros((B, T, C)),
                mean=np.zeros((B, T)), rstd=np.zeros((B, T)), dx=n(size=(B, T, C)), dw=n(size=C), db=n(size=C))
    h, d = r.h, r.d
    for f, a in ((layers.embedding_forward, h), (kernels.embedding_forward, d)):
        f(a["emb"], a["idx"], a["wte"], a["wpe"])
    for f, a in ((layers.embedding_backward, h), (kernels.embedding_backward, d)):
        f(a["dwte"], a["dwpe"], a["dout"], a["idx"])
    r.compare(["emb", "dwte", "dwpe"], "embedding", wide)
    for f, a in ((layers.layernorm_forward, h), (kernels.layernorm_forward, d)):
        f(a["ln"], a["mean"], a["rstd"], a["x"], a["w"], a["b"])
    for f, a in ((layers.layernorm_backward, h), (kernels.layernorm_backward, d)):
        f(a["dx"], a["dw"], a["db"], a["dout"], a["x"], a["mean"], a["rstd"], a["w"])
    r.compare(["ln", "mean", "rstd", "dx", "dw", "db"], "layernorm", wide)

    OC = 3 * C
    m = HalfRun(dev, dtype, ("dw", "db"), x=n(size=(B, T, C)), w=n(size=(C, OC)) * 0.2, b=n(size=OC),
                out=np.zeros((B, T, OC)), dout=n(size=(B, T, OC)), dx=np.zeros((B, T, C)),
                dw=n(size=(C, OC)), db=n(size=OC))
    for f, a in ((layers.matmul_forward, m.h), (kernels.matmul_forward, m.d)):
        f(a["out"], a["x"], a["w"], a["b"])
    for f, a in ((layers.matmul_backward, m.h), (kernels.matmul_backward, m.d)):
        f(a["dx"], a["dw"], a["db"], a["dout"], a["x"], a["w"])
    m.compare(["out", "dx", "dw", "db"], "matmul + bias", ("dw", "db"))

    at = HalfRun(dev, dtype, ("lse",), qkv=n(size=(B, T, 3 * C)), out=np.zeros((B, T, C)),
                 lse=np.zeros((B, NH, T)), dout=n(size=(B, T, C)), dqkv=np.zeros((B, T, 3 * C)))
    reference.attention_lse_forward(at.h["out"], at.h["lse"], at.h["qkv"], NH)
    reference.attention_lse_backward(at.h["dqkv"], at.h["dout"], at.h["qkv"], at.h["lse"], NH)
    kernels.attention_forward(at.d["out"], at.d["lse"], at.d["qkv"], NH)
    kernels.attention_backward(at.d["dqkv"], at.d["dout"], at.d["qkv"], at.d["lse"], NH, at.d["out"])
    at.compare(["out", "lse", "dqkv"], "attention (lse)", ("lse",))

    g = HalfRun(dev, dtype, (), x=n(size=(B, T, 4 * C)) * 3, y=np.zeros((B, T, 4 * C)),
                dout=n(size=(B, T, 4 * C)), dx=np.zeros((B, T, 4 * C)), a=n(size=(B, T, C)),
                b=n(size=(B, T, C)), s=np.zeros((B, T, C)))
    for f, a in ((layers.gelu_forward, g.h), (kernels.gelu_forward, g.d)):
        f(a["y"], a["x"])
    for f, a in ((layers.gelu_backward, g.h), (kernels.gelu_backward, g.d)):
        f(a["dx"], a["dout"], a["x"])
    for f, a in ((layers.residual_forward, g.h), (kernels.residual_forward, g.d)):
        f(a["s"], a["a"], a["b"])
    g.compare(["y", "dx", "s"], "gelu, residual")

    targets = rng.integers(0, V, size=(B, T))
    targets[0, 1] = -1
    s = HalfRun(dev, dtype, ("losses", "dlosses"), targets=targets, logits=n(size=(B, T, V)) * 4,
                losses=np.zeros((B, T)), probs=np.zeros((B, T, V)), dlosses=n(size=(B, T)),
                dlogits=np.zeros((B, T, V)))
    for f, a in ((layers.softmax_crossentropy_forward, s.h), (kernels.softmax_crossentropy_forward, s.d)):
        f(a["losses"], a["probs"], a["logits"], a["targets"])
    for f, a in ((layers.softmax_crossentropy_backward, s.h),
                 (kernels.softmax_crossentropy_backward, s.d)):
        f(a["dlogits"], a["dlosses"], a["probs"], a["targets"])
    # the kernel's dlogits come from its own 16-bit probs; the reference's from exact ones
    s.compare(["losses", "probs", "dlogits"], "softmax-CE", ("losses",))
    ct = halfs.CTYPES[np.dtype(dtype)]
    launched = {k.split("<")[0] for k in dev.calls if f"<{ct}" in k}
    for name in ("embedding_forward", "embedding_backward_wte", "layernorm_forward",
                 "layernorm_backward_dx", "bias_forward", "column_partial_sums",
                 "attention_forward_flash", "attention_backward_D", "gelu_forward", "gelu_backward",
                 "residual_forward", "softmax_crossentropy_forward", "softmax_crossentropy_backward"):
        assert name in launched, f"{name}<{ct}> never launched"


# the 16-bit scores are rounded before the softmax (as under torch.autocast): an error
# of |s| 2^-9 (bf16) in the exponent, hence the wider bounds, with moderate scores
ATT_TOL = {halfs.BF16: 4e-2, halfs.FP16: 5e-3}


def check_half_attention_att(dev, dtype, rng, T=37):
    """Attention that saves att (B,NH,T,T) in 16 bits: cuBLAS batched products around
    the causal softmax kernels, against the layer in float64 on the rounded inputs."""
    B, NH, hs = 2, 2, 16
    C = NH * hs
    at = HalfRun(dev, dtype, (), qkv=rng.normal(size=(B, T, 3 * C)) * 0.5, out=np.zeros((B, T, C)),
                 att=np.zeros((B, NH, T, T)), dout=rng.normal(size=(B, T, C)), dqkv=np.zeros((B, T, 3 * C)))
    for f, a in ((layers.attention_forward, at.h), (kernels.attention_forward, at.d)):
        f(a["out"], a["att"], a["qkv"], NH)
    for f, a in ((layers.attention_backward, at.h), (kernels.attention_backward, at.d)):
        f(a["dqkv"], a["dout"], a["qkv"], a["att"], NH)
    for n in ("out", "att", "dqkv"):
        close(halfs.to_float32(dev.to_host(at.d[n])), at.h[n], ATT_TOL[dtype], f"attention (att, 16 bits): {n}")
    ct = halfs.CTYPES[np.dtype(dtype)]
    assert {f"causal_softmax_forward<{ct}>", f"causal_softmax_backward<{ct}>"} <= set(dev.calls)
