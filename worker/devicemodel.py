"""The GPT on a CUDA GPU: its flat buffers in GPU memory, every layer a kernel of ours.

``GPT(config, device="cuda", precision=...)`` (``worker/model.py``) keeps ``params`` and
``grads`` as flat CuPy vectors and hands its forward and backward to ``DevicePath``:
the same sequence of layers as ``GPT._forward_blocks_reference`` and
``_backward_blocks_reference`` (which remain the readable specification), each one
the ``worker.kernels`` launcher of the same name. Attention (``attention=``) saves
``lse`` (B,NH,T) by default: the memory-efficient kernels, never a T x T matrix, whose
backward gets the forward's output instead of running the forward again; ``"att"``
keeps the softmaxed T x T matrix per layer and does the products in cuBLAS (tensor
cores in 16 bits), as PyTorch eager does: more memory, and which of the two is faster
on a given GPU is for ``bench_worker.py --device cuda`` to say. The whole path is checked against the NumPy model in
``tests/test_gpu_model_emulated.py`` (on the CPU emulator) and
``tests/test_gpu_model_gpu.py`` (on a GPU).

Precision (``--precision``):
- ``fp32``: everything in the model's dtype (float32, or float64 for checks);
- ``bf16`` / ``fp16``: activations and the matmuls' operands in 16 bits, a 16-bit copy
  of the weights made from the float32 master ``params`` at every forward; what must
  stay wide stays float32 (LayerNorm statistics, attention's lse, the losses, and the
  gradients: cuBLAS and the kernels accumulate parameter gradients straight into the
  float32 ``grads``). So the servers see float32 parameters and gradients only.
- ``fp16`` adds dynamic loss scaling (``LossScaler``): the backward runs on
  ``scale * loss`` into a float32 buffer; if a gradient overflowed, the scale is
  halved and the backward run again (the forward's activations are still there), so
  the gradient handed on is always finite and unscaled and no step is ever skipped,
  which a BSP job could not do alone; the scale doubles after a run of clean steps.

Not here: the host side of push and pull (``worker/staging.py``), the optimizer
(``worker/deviceoptim.py``), several GPUs per process, threads (one stream computes).
"""
from __future__ import annotations

import numpy

from worker import kernels as K
from worker.kernels import halfs

ATTENTION = ("lse", "att")      # what attention saves for the backward (module docstring)


class _Activations:
    """Every activation of one forward pass on the device, and the gradients of those
    that need one, for one (B, T). ``cdtype``: the compute type; ``adtype``: its
    accumulation type (statistics, lse, losses)."""

    def __init__(self, xp, cdtype, adtype, B, T, config, attention="lse"):
        C, L, NH, V = config.n_embd, config.n_layer, config.n_head, config.vocab_size
        z = lambda *shape: xp.zeros(shape, dtype=cdtype)  # noqa: E731
        f = lambda *shape: xp.zeros(shape, dtype=adtype)  # noqa: E731
        self.B, self.T = B, T
        self.encoded = z(B, T, C)                       # wte[idx] + wpe
        self.blocks = [dict(
            ln1=z(B, T, C), ln1_mean=f(B, T), ln1_rstd=f(B, T),
            qkv=z(B, T, 3 * C), atty=z(B, T, C),
            saved=f(B, NH, T) if attention == "lse" else z(B, NH, T, T),   # lse, or att
            attproj=z(B, T, C), res2=z(B, T, C),
            ln2=z(B, T, C), ln2_mean=f(B, T), ln2_rstd=f(B, T),
            fch=z(B, T, 4 * C), fch_gelu=z(B, T, 4 * C), fcproj=z(B, T, C),
            res3=z(B, T, C)) for _ in range(L)]
        self.lnf, self.lnf_mean, self.lnf_rstd = z(B, T, C), f(B, T), f(B, T)
        self.logits = z(B, T, V)                        # reused as dlogits in backward
        self.probs = z(B, T, V)
        self.losses = f(B, T)
        self.dres = z(B, T, C)                          # the residual stream's gradient
        self.dC = z(B, T, C)
        self.dqkv = z(B, T, 3 * C)
        self.d4C_a = z(B, T, 4 * C)
        self.d4C_b = z(B, T, 4 * C)
        self.dlosses = f(B, T)


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018, "Mixed Precision
    Training"): start high, halve on overflow, double after ``growth_interval`` clean
    backward passes in a row."""

    def __init__(self, scale: float = 2.0 ** 16, growth_interval: int = 200, min_scale: float = 1.0):
        self.scale, self.growth_interval, self.min_scale = float(scale), growth_interval, min_scale
        self.clean = 0                    # clean backward passes since the last change
        self.overflows = 0                # overflows seen, over the whole run

    def clean_pass(self):
        self.clean += 1
        if self.clean >= self.growth_interval:
            self.scale *= 2.0
            self.clean = 0

    def overflow(self) -> bool:
        """Halve the scale after an overflow; False if it cannot go lower."""
        self.overflows += 1
        self.clean = 0
        if self.scale <= self.min_scale:
            return False
        self.scale = max(self.min_scale, self.scale / 2.0)
        return True


class DevicePath:
    """Forward and backward of ``model`` (a ``GPT`` whose ``xp`` is CuPy) on the GPU."""

    def __init__(self, model, precision: str = "fp32", attention: str = "lse"):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {attention!r}")
        if precision not in halfs.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(halfs.PRECISIONS)}, got {precision!r}")
        if precision != "fp32" and model.dtype != numpy.float32:
            raise ValueError(f"--precision {precision} keeps float32 master parameters; "
                             f"the model's dtype is {model.dtype}")
        self.model, self.xp, self.precision, self.attention = model, model.xp, precision, attention
        self.half = precision != "fp32"
        self.cdtype = halfs.COMPUTE_DTYPE[precision] if self.half else model.dtype
        self.adtype = numpy.dtype(numpy.float32) if self.half else model.dtype
        size = model.layout.size
        if self.half:                   # the 16-bit copy of the weights the layers read
            self.params_lp = self.xp.zeros(size, dtype=self.cdtype)
            self.p = model.layout.views(self.params_lp)
        else:
            self.params_lp, self.p = None, model.param_views
        self.scaler = LossScaler() if precision == "fp16" else None
        self.scaled = self.xp.zeros(size, dtype=numpy.float32) if self.scaler else None
        self.acts = None
        self.batch = None               # (idx, targets on the device, valid targets) of the last forward

    def _activations(self, B, T):
        if self.acts is None or (self.acts.B, self.acts.T) != (B, T):
            self.acts = None            # free the old ones before allocating
            self.acts = _Activations(self.xp, self.cdtype, self.adtype, B, T, self.model.config,
                                     self.attention)
        return self.acts

    # --- forward --------------------------------------------------------------------
    def forward(self, idx, targets=None):
        """As ``GPT.forward`` (checked there): the mean loss, or host float32 logits."""
        xp, cfg = self.xp, self.model.config
        B, T = idx.shape
        a = self._activations(B, T)
        self.batch = None
        idx_d = xp.asarray(idx)                                   # (B,T) ids to the device
        if self.half:
            K.convert(self.params_lp, self.model.params)          # float32 master -> 16 bits
        p = self.p
        K.embedding_forward(a.encoded, idx_d, p["wte.weight"], p["wpe.weight"])   # (B,T,C)
        x = a.encoded
        for i, blk in enumerate(a.blocks):
            h = f"h.{i}."
            K.layernorm_forward(blk["ln1"], blk["ln1_mean"], blk["ln1_rstd"], x,
                                p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            K.matmul_forward(blk["qkv"], blk["ln1"], p[h + "attn.c_attn.weight"],
                             p[h + "attn.c_attn.bias"])                           # (B,T,3C)
            K.attention_forward(blk["atty"], blk["saved"], blk["qkv"], cfg.n_head)  # (B,T,C)
            K.matmul_forward(blk["attproj"], blk["atty"], p[h + "attn.c_proj.weight"],
                             p[h + "attn.c_proj.bias"])
            K.residual_forward(blk["res2"], x, blk["attproj"])
            K.layernorm_forward(blk["ln2"], blk["ln2_mean"], blk["ln2_rstd"], blk["res2"],
                                p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            K.matmul_forward(blk["fch"], blk["ln2"], p[h + "mlp.c_fc.weight"],
                             p[h + "mlp.c_fc.bias"])                              # (B,T,4C)
            K.gelu_forward(blk["fch_gelu"], blk["fch"])
            K.matmul_forward(blk["fcproj"], blk["fch_gelu"], p[h + "mlp.c_proj.weight"],
                             p[h + "mlp.c_proj.bias"])                            # (B,T,C)
            K.residual_forward(blk["res3"], blk["res2"], blk["fcproj"])
            x = blk["res3"]
        K.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, x, p["ln_f.weight"], p["ln_f.bias"])
        K.matmul_forward(a.logits, a.lnf, p["wte.weight"].T)                      # (B,T,V), tied
        if targets is None:
            return halfs.to_float32(a.logits).get() if self.half else a.logits.get()
        targets_d = xp.asarray(targets)
        K.softmax_crossentropy_forward(a.losses, a.probs, a.logits, targets_d)
        n_valid = int((targets >= 0).sum())
        self.batch = (idx_d, targets_d, n_valid)
        return float(a.losses.sum()) / max(n_valid, 1)

    # --- backward -------------------------------------------------------------------
    def backward(self, dloss: float = 1.0):
        """``grads += d(dloss * loss)``; fp16: through the loss scaler (module docstring)."""
        if self.batch is None:
            raise RuntimeError("backward() needs a forward(idx, targets) first")
        if self.scaler is None:
            self._backward(dloss, self.model.grad_views)
            return
        xp, s = self.xp, self.scaler
        views = self.model.layout.views(self.scaled)
        while True:
            self.scaled[...] = 0
            self._backward(dloss * s.scale, views)
            if bool(xp.isfinite(self.scaled).all()):
                self.scaled *= numpy.float32(1.0 / s.scale)       # exact: a power of two
                self.model.grads += self.scaled
                s.clean_pass()
                return
            if not s.overflow():
                raise FloatingPointError("fp16: the gradient is not finite even at loss scale "
                                         f"{s.scale:g}; the model has diverged (try --precision bf16)")

    def _backward(self, dloss, g):
        """From the loss down to the embeddings, accumulating into the views ``g``."""
        cfg, p, a = self.model.config, self.p, self.acts
        idx_d, targets_d, n_valid = self.batch
        a.dlosses[...] = dloss / max(n_valid, 1)
        dlogits = a.logits                                       # the logits are not needed any more
        K.softmax_crossentropy_backward(dlogits, a.dlosses, a.probs, targets_d)
        K.matmul_backward(a.dC, g["wte.weight"].T, None, dlogits, a.lnf, p["wte.weight"].T)
        x_last = a.blocks[-1]["res3"] if a.blocks else a.encoded
        a.dres[...] = 0
        K.layernorm_backward(a.dres, g["ln_f.weight"], g["ln_f.bias"], a.dC, x_last,
                             a.lnf_mean, a.lnf_rstd, p["ln_f.weight"])
        # the residual stream's gradient a.dres is read by both branches in place, and the
        # LayerNorms add their share into it (see GPT._backward_blocks_reference)
        for i in reversed(range(cfg.n_layer)):
            h, blk = f"h.{i}.", a.blocks[i]
            x_in = a.blocks[i - 1]["res3"] if i > 0 else a.encoded
            K.matmul_backward(a.d4C_a, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"],
                              a.dres, blk["fch_gelu"], p[h + "mlp.c_proj.weight"])
            K.gelu_backward(a.d4C_b, a.d4C_a, blk["fch"])
            K.matmul_backward(a.dC, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"],
                              a.d4C_b, blk["ln2"], p[h + "mlp.c_fc.weight"])
            K.layernorm_backward(a.dres, g[h + "ln_2.weight"], g[h + "ln_2.bias"], a.dC,
                                 blk["res2"], blk["ln2_mean"], blk["ln2_rstd"], p[h + "ln_2.weight"])
            K.matmul_backward(a.dC, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"],
                              a.dres, blk["atty"], p[h + "attn.c_proj.weight"])
            K.attention_backward(a.dqkv, a.dC, blk["qkv"], blk["saved"], cfg.n_head, blk["atty"])
            K.matmul_backward(a.dC, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"],
                              a.dqkv, blk["ln1"], p[h + "attn.c_attn.weight"])
            K.layernorm_backward(a.dres, g[h + "ln_1.weight"], g[h + "ln_1.bias"], a.dC,
                                 x_in, blk["ln1_mean"], blk["ln1_rstd"], p[h + "ln_1.weight"])
        K.embedding_backward(g["wte.weight"], g["wpe.weight"], a.dres, idx_d)
