"""Each kernel family at the shapes of GPT-2 124M, in float32 and bf16: the checks.

GPT-2 124M: head size 64, context T = 1024, vocabulary V = 50257, width C = 768.
One head and one batch row where the cost is quadratic (attention), a few rows where
a row is the unit (softmax-CE over V, LayerNorm over C), so that the emulator runs
each in seconds. float32 goes through tests/kernel_checks.py with these shapes; bf16
through ``HalfRun`` (tests/half_checks.py: the reference in float64 on the rounded
inputs). Shared by tests/test_kernels_gpt2_shapes.py (emulator) and the GPU tests.
"""
from __future__ import annotations

import numpy as np

from tests import kernel_checks as kc
from tests.half_checks import HalfRun
from worker import kernels, layers
from worker.kernels import halfs, reference

HS, T, V, C = 64, 1024, 50257, 768


def attention(dev, dtype, rng):
    """The memory-efficient attention (lse saved), head size 64, T = 1024."""
    if dtype == np.float32:
        return kc.check_attention_lse(dev, dtype, rng, hs=HS, T=T, B=1, NH=1)
    at = HalfRun(dev, dtype, ("lse",), qkv=rng.normal(size=(1, T, 3 * HS)), out=np.zeros((1, T, HS)),
                 lse=np.zeros((1, 1, T)), dout=rng.normal(size=(1, T, HS)), dqkv=np.zeros((1, T, 3 * HS)))
    reference.attention_lse_forward(at.h["out"], at.h["lse"], at.h["qkv"], 1)
    reference.attention_lse_backward(at.h["dqkv"], at.h["dout"], at.h["qkv"], at.h["lse"], 1)
    kernels.attention_forward(at.d["out"], at.d["lse"], at.d["qkv"], 1)
    kernels.attention_backward(at.d["dqkv"], at.d["dout"], at.d["qkv"], at.d["lse"], 1, at.d["out"])
    at.compare(["out", "lse", "dqkv"], "attention (lse) at GPT-2 shape", ("lse",))
    kc._launched(dev, "attention_forward_flash", "attention_backward_dq_flash", "attention_backward_dkdv_flash")


def softmax_ce(dev, dtype, rng):
    """Softmax + cross-entropy over V = 50257 (two positions, one ignored target)."""
    if dtype == np.float32:
        return kc.check_softmax_ce(dev, dtype, rng, V=V, BT=(1, 3))
    targets = np.array([[V - 1, -1, 7]])
    s = HalfRun(dev, dtype, ("losses", "dlosses"), targets=targets, logits=rng.normal(size=(1, 3, V)) * 4,
                losses=np.zeros((1, 3)), probs=np.zeros((1, 3, V)), dlosses=rng.normal(size=(1, 3)),
                dlogits=np.zeros((1, 3, V)))
    for f, a in ((layers.softmax_crossentropy_forward, s.h), (kernels.softmax_crossentropy_forward, s.d)):
        f(a["losses"], a["probs"], a["logits"], a["targets"])
    for f, a in ((layers.softmax_crossentropy_backward, s.h), (kernels.softmax_crossentropy_backward, s.d)):
        f(a["dlogits"], a["dlosses"], a["probs"], a["targets"])
    s.compare(["losses", "probs", "dlogits"], "softmax-CE at V = 50257", ("losses",))
    kc._launched(dev, "softmax_crossentropy_forward", "softmax_crossentropy_backward")


def layernorm_gelu(dev, dtype, rng):
    """LayerNorm over C = 768 and GELU over the MLP's 4C = 3072, forward and backward."""
    if dtype == np.float32:
        kc.check_layernorm(dev, dtype, rng, C=C, B=1, T=4)
        return kc.check_gelu(dev, dtype, rng, shape=(1, 4, 4 * C))
    n = rng.normal
    wide = ("mean", "rstd", "dw", "db")
    r = HalfRun(dev, dtype, wide, x=n(size=(1, 4, C)) * 3 + 1, w=n(size=C), b=n(size=C),
                ln=np.zeros((1, 4, C)), mean=np.zeros((1, 4)), rstd=np.zeros((1, 4)),
                dout=n(size=(1, 4, C)), dx=n(size=(1, 4, C)), dw=n(size=C), db=n(size=C),
                g=n(size=(1, 4, 4 * C)) * 3, y=np.zeros((1, 4, 4 * C)), gout=n(size=(1, 4, 4 * C)),
                gx=np.zeros((1, 4, 4 * C)))
    for a, m in ((r.h, layers), (r.d, kernels)):
        m.layernorm_forward(a["ln"], a["mean"], a["rstd"], a["x"], a["w"], a["b"])
        m.layernorm_backward(a["dx"], a["dw"], a["db"], a["dout"], a["x"], a["mean"], a["rstd"], a["w"])
        m.gelu_forward(a["y"], a["g"])
        m.gelu_backward(a["gx"], a["gout"], a["g"])
    r.compare(["ln", "mean", "rstd", "dx", "dw", "db", "y", "gx"], "layernorm, gelu at C = 768", wide)
    kc._launched(dev, "layernorm_forward", "layernorm_backward_dx", "gelu_forward", "gelu_backward")


def embedding(dev, dtype, rng):
    """The token and position embedding's backward into a (50257, 768) table (and the
    forward), with a run of one id and the table's last row."""
    if dtype == np.float32:
        return kc.check_embedding(dev, dtype, rng, B=3, T=8, C=C, V=V)
    ids = rng.integers(0, V, size=(3, 8))
    ids[0, :4], ids[1, -1] = 5, V - 1
    wide = ("dwte", "dwpe")
    r = HalfRun(dev, dtype, wide, idx=ids, wte=rng.normal(size=(V, C)) * 0.02, wpe=rng.normal(size=(8, C)),
                out=np.zeros((3, 8, C)), dout=rng.normal(size=(3, 8, C)), dwte=np.zeros((V, C)),
                dwpe=rng.normal(size=(8, C)))
    for a, m in ((r.h, layers), (r.d, kernels)):
        m.embedding_forward(a["out"], a["idx"], a["wte"], a["wpe"])
        m.embedding_backward(a["dwte"], a["dwpe"], a["dout"], a["idx"])
    r.compare(["out", "dwte", "dwpe"], "embedding at V = 50257", wide)
    ct = halfs.CTYPES[np.dtype(dtype)]
    assert f"embedding_backward_wte<{ct}, long long>" in dev.calls, sorted(dev.calls)


CHECKS = {"attention": attention, "softmax_ce": softmax_ce, "layernorm_gelu": layernorm_gelu,
          "embedding": embedding}
