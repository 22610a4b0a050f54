"""GPT-2 over one flat parameter buffer: forward in order, backward in exact reverse order.

The model owns two flat vectors, ``params`` and ``grads``, laid out by
``common.layout.gpt_layout``; every named tensor is a view into them. That is all the
parameter servers ever see. The architecture is GPT-2's (Radford et al. 2019, as in
nanoGPT and llm.c): token + position embedding, ``n_layer`` pre-LayerNorm blocks of
causal self-attention and a GELU MLP, a final LayerNorm, and an output projection tied
to the token embedding.

Activations are allocated once per (B, T) and reused by every later call with the same
shape, so a training loop allocates no new activation memory step after step.

Two paths compute the same thing: ``reference=True`` runs every layer of
``worker/layers.py`` (the specification, NumPy or CuPy); the default runs the blocks
through ``worker/fastmodel.py`` (fused NumPy layers, same results up to rounding).
With ``threads=N`` the batch is cut into N slices along B, each run start to finish by
its own thread with its own activations and gradient buffer (data parallelism inside
the process; NumPy and BLAS release the GIL); the slices' gradients are summed at the
end of ``backward``. Each thread then wants a single-threaded BLAS
(``OPENBLAS_NUM_THREADS=1``): N threads of 1 BLAS thread use N cores with no
fine-grained synchronisation, which is also what keeps them fast on a shared machine.

Two optional hooks let a distributed worker overlap communication with compute
(``worker/mode_loops.py``): ``forward(..., before=f)`` calls ``f(begin, end)`` before
the first use of ``params[begin:end]`` (the embeddings, each block, ln_f: the order of
the flat vector), and ``backward(after=g)`` calls ``g(begin, end)`` once
``grads[begin:end]`` is final (ln_f, the blocks from the last, then the embeddings:
wte is tied to the output, so its gradient is final only at the very end). With
``threads`` > 1 each hook is called once, for the whole vector (before the slices'
forward; after their gradients are summed).

With ``device="cuda"`` the flat vectors live in GPU memory (CuPy) and forward and
backward run the CUDA kernels of ``worker/kernels/`` through ``worker/devicemodel.py``,
optionally in mixed precision (``precision="bf16"`` or ``"fp16"``: 16-bit activations,
float32 ``params`` and ``grads``); ``forward`` still returns a float or host logits.

Not here: the optimizer (``common/optim.py``), data (``worker/data.py``), the loop
(``worker/train.py``), GPU kernels (``worker/kernels/``).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy

from common.layout import even_ranges, gpt_layout
from worker import fastmodel
from worker.fastlayers import Scratch
from worker.layers import (
    attention_backward, attention_forward, embedding_backward, embedding_forward,
    gelu_backward, gelu_forward, layernorm_backward, layernorm_forward, matmul_backward,
    matmul_forward, residual_forward, softmax_crossentropy_backward,
    softmax_crossentropy_forward,
)


@dataclass
class GPTConfig:
    """The shape of a GPT-2 model (the fields of HF's ``GPT2Config`` that matter here)."""
    vocab_size: int = 256   # token ids (256: bytes; at least the tokenizer's vocabulary)
    block_size: int = 128   # longest context, in tokens (n_positions)
    n_layer: int = 4        # transformer blocks
    n_head: int = 4         # attention heads per block
    n_embd: int = 128       # channels of the residual stream; n_embd % n_head == 0

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def layout(self):
        return gpt_layout(self.vocab_size, self.block_size, self.n_layer, self.n_embd)


class _Activations:
    """Every activation of one forward pass, and their gradients, for one (B, T)."""

    def __init__(self, xp, dtype, B, T, config, fast=False):
        C, L, NH, V = config.n_embd, config.n_layer, config.n_head, config.vocab_size
        z = lambda *shape: xp.zeros(shape, dtype=dtype)  # noqa: E731
        self.B, self.T = B, T
        self.encoded = z(B, T, C)                       # wte[idx] + wpe
        self.blocks = []
        for _ in range(L):
            self.blocks.append(dict(
                ln1=z(B, T, C), ln1_mean=z(B, T), ln1_rstd=z(B, T),
                qkv=z(B, T, 3 * C), att=z(B, NH, T, T), atty=z(B, T, C),
                attproj=z(B, T, C), res2=z(B, T, C),
                ln2=z(B, T, C), ln2_mean=z(B, T), ln2_rstd=z(B, T),
                fch=z(B, T, 4 * C), fch_gelu=z(B, T, 4 * C), fcproj=z(B, T, C),
                res3=z(B, T, C),
            ))
            if fast:                                    # kept by worker/fastlayers.py
                self.blocks[-1].update(ln1_xhat=z(B, T, C), ln2_xhat=z(B, T, C),
                                       fch_tanh=z(B, T, 4 * C))
        self.lnf, self.lnf_mean, self.lnf_rstd = z(B, T, C), z(B, T), z(B, T)
        self.lnf_xhat = z(B, T, C) if fast else None
        self.logits = z(B, T, V)                        # reused as dlogits in backward
        self.probs = z(B, T, V)
        self.losses = z(B, T)
        # gradients of activations (one buffer of each shape, reused layer after layer)
        self.dres = z(B, T, C)                          # the residual stream's gradient
        self.dC = z(B, T, C)                            # d ln1 / d ln2 / d atty / d lnf
        self.dqkv = z(B, T, 3 * C)
        self.d4C_a = z(B, T, 4 * C)                     # d fch_gelu
        self.d4C_b = z(B, T, 4 * C)                     # d fch
        self.dlosses = z(B, T)
        self.scratch = Scratch() if fast else None      # work buffers of the fast path


class _Part:
    """One slice ``[lo, hi)`` of the batch along B, run by one thread: its activations
    and, for every slice but the first, its own gradient buffer (the first accumulates
    straight into the model's ``grads``)."""

    def __init__(self, model, index, lo, hi, T, fast):
        self.lo, self.hi, self.T, self.fast = lo, hi, T, fast
        self.acts = _Activations(model.xp, model.dtype, hi - lo, T, model.config, fast=fast)
        self.dirty = False            # True while a backward may have left gradients here
        if index == 0:
            self.grads, self.grad_views = None, model.grad_views
        else:
            self.grads = model.xp.zeros(model.layout.size, dtype=model.dtype)
            self.grad_views = model.layout.views(self.grads)


def _no_hook(begin, end):
    pass


def init_gpt2_weights(layout, views: dict, n_layer: int, seed: int, xp=numpy):
    """GPT-2 initialisation of the tensors ``views`` (name -> view, as laid out by
    ``layout``): weights N(0, 0.02), the two residual projections of each block
    N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm gains 1. Drawn in float64 from
    ``seed`` and then cast, so float32 and float64 models start alike (the BERT encoder
    starts the same way)."""
    rng = numpy.random.default_rng(seed)
    proj_std = 0.02 / math.sqrt(2 * n_layer)
    for e in layout:
        view = views[e.name]
        if e.name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            view[...] = 1.0
        elif e.name.endswith(".bias"):
            view[...] = 0.0
        else:
            std = proj_std if e.name.endswith("c_proj.weight") else 0.02
            view[...] = xp.asarray(rng.normal(0.0, std, size=e.shape))


class GPT:
    """GPT-2 whose parameters live in the flat vector ``self.params`` (gradients in
    ``self.grads``), views named as in GPT-2."""
    LAYER_HOOKS = True            # forward(before=) and backward(after=): see the module's docstring

    def __init__(self, config: GPTConfig, dtype=numpy.float32, seed: int = 0,
                 reference: bool = False, threads: int = 1, device: str = "cpu",
                 precision: str = "fp32", attention: str = "lse"):
        """``reference=True`` runs every layer through ``worker/layers.py`` (the readable
        specification) instead of the fast path. ``threads`` > 1 runs slices of the batch
        in that many threads (see the module's docstring). ``device`` ``"cuda"`` (or
        ``"cuda:N"``) puts the model on a GPU (``worker/backend.py`` chooses it, once per
        process), computing in ``precision`` (``fp32``, ``bf16``, ``fp16``), its attention
        saving ``lse`` or ``att`` (``worker/devicemodel.py``)."""
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        self.config = config
        self.dtype = numpy.dtype(dtype)
        if self.dtype not in (numpy.float32, numpy.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.device, self.precision = device, precision
        self.xp = numpy
        if device != "cpu":
            if reference or threads != 1:
                raise ValueError(f"device {device!r} runs the CUDA kernels in one stream: "
                                 "reference=True and threads > 1 are for the CPU")
            from worker import backend
            self.xp = backend.select(device)
        elif precision != "fp32":
            raise ValueError(f"precision {precision!r} needs a GPU (device='cuda'); on the CPU "
                             "the model computes in its dtype (fp32)")
        self.reference = bool(reference)
        self.layout = config.layout()
        self.params = self.xp.zeros(self.layout.size, dtype=self.dtype)
        self.grads = self.xp.zeros(self.layout.size, dtype=self.dtype)
        self.param_views = self.layout.views(self.params)
        self.grad_views = self.layout.views(self.grads)
        L = self.layout           # the ranges the hooks name
        self.spans = dict(embed=(L.span("wte.")[0], L.span("wpe.")[1]), ln_f=L.span("ln_f."),
                          blocks=[L.span(f"h.{i}.") for i in range(config.n_layer)])
        self.threads = threads
        self._parts = []              # one _Part per slice of the batch, for the last (B, T)
        self._pool = None             # threads - 1 helper threads, started on first use
        self._batch = None            # (idx, targets, number of valid targets) of the last forward
        self._gpu = None              # the device path (worker/devicemodel.py) when not on the CPU
        if self.xp is not numpy:
            from worker.devicemodel import DevicePath
            self._gpu = DevicePath(self, precision, attention)
        self.init_weights(seed)

    # --- parameters -----------------------------------------------------------------
    def init_weights(self, seed: int = 0):
        init_gpt2_weights(self.layout, self.param_views, self.config.n_layer, seed, self.xp)

    def named_tensors(self) -> dict:
        """name -> view into ``params`` with the tensor's GPT-2 shape."""
        return dict(self.param_views)

    def named_grads(self) -> dict:
        """name -> view into ``grads``."""
        return dict(self.grad_views)

    def num_params(self) -> int:
        return self.layout.size

    def zero_grad(self):
        if self.threads == 1:
            self.grads[...] = 0
        else:                                    # each thread zeroes its own range
            def zero(rng):
                self.grads[rng[0]:rng[1]] = 0
            self._run(zero, even_ranges(self.layout.size, self.threads, 16))

    # --- slices of the batch ----------------------------------------------------------
    def _slices(self, B, T):
        """The _Parts for a batch (B, T): min(threads, B) contiguous slices along B,
        allocated on the first call with this shape and reused after."""
        if not self._parts or (self._parts[-1].hi, self._parts[0].T, self._parts[0].fast) != (
                B, T, self._fast):
            n = min(self.threads, B)
            cuts = [B * i // n for i in range(n + 1)]
            self._parts = [_Part(self, i, cuts[i], cuts[i + 1], T, self._fast) for i in range(n)]
        return self._parts

    @property
    def _acts(self):
        """The activations of the first slice (all of them when threads == 1)."""
        return self._parts[0].acts if self._parts else None

    def _run(self, fn, items):
        """fn(item) for every item, the first in this thread and the others in the pool;
        the results in order (an exception in any of them is raised here)."""
        if len(items) == 1:
            return [fn(items[0])]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="gpt-slice")
        futures = [self._pool.submit(fn, item) for item in items[1:]]
        first = fn(items[0])
        return [first] + [f.result() for f in futures]

    # --- forward --------------------------------------------------------------------

    @property
    def _fast(self):
        return not self.reference and self.xp is numpy

    def _check_tokens(self, idx, what):
        if idx.ndim != 2:
            raise ValueError(f"{what} must have shape (B, T), got {idx.shape}")
        if idx.dtype.kind not in "iu":
            raise ValueError(f"{what} must hold integers, got {idx.dtype}")

    def forward(self, idx, targets=None, before=_no_hook):
        """Run the model on token ids ``idx`` (B, T).
        With ``targets`` (B, T): return the mean cross-entropy over positions whose
        target is >= 0 (a float), and keep what ``backward`` needs.
        Without: return the logits (B, T, V), a fresh array.
        ``before(begin, end)`` is called before params[begin:end] is first used."""
        cfg = self.config
        self._check_tokens(idx, "idx")
        B, T = idx.shape
        if T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        if targets is not None:
            self._check_tokens(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {targets.shape} != idx shape {idx.shape}")
            if targets.size and int(targets.max()) >= cfg.vocab_size:
                raise ValueError(f"targets must be < vocab_size {cfg.vocab_size} (negative = ignored)")
        if self._gpu is not None:                # (the hooks see the whole vector at once)
            before(0, self.layout.size)
            return self._gpu.forward(idx, targets)
        p = self.param_views
        parts = self._slices(B, T)
        hook = before if len(parts) == 1 else _no_hook
        if len(parts) > 1:                       # several threads: every parameter before they start
            before(0, self.layout.size)

        def run(part):                           # one slice of the batch, in its thread
            a, rows = part.acts, slice(part.lo, part.hi)
            hook(*self.spans["embed"])
            embedding_forward(a.encoded, idx[rows], p["wte.weight"], p["wpe.weight"])  # (b,T,C)
            if self._fast:
                fastmodel.forward_blocks(self, a, hook)                         # (b,T,V) logits
            else:
                self._forward_blocks_reference(a, hook)
            if targets is None:
                return None
            softmax_crossentropy_forward(a.losses, a.probs, a.logits, targets[rows])
            return float(a.losses.sum())

        self._batch = None
        loss_sums = self._run(run, parts)
        if targets is None:
            return numpy.concatenate([part.acts.logits for part in parts])     # a fresh array
        n_valid = int((targets >= 0).sum())
        self._batch = (idx, targets, n_valid)
        return sum(loss_sums) / max(n_valid, 1)

    def _forward_blocks_reference(self, a, before=_no_hook):
        """The blocks, ln_f and the tied logits projection with worker/layers.py."""
        cfg, p = self.config, self.param_views
        x = a.encoded
        for i, blk in enumerate(a.blocks):
            h = f"h.{i}."
            before(*self.spans["blocks"][i])
            layernorm_forward(blk["ln1"], blk["ln1_mean"], blk["ln1_rstd"], x,
                              p[h + "ln_1.weight"], p[h + "ln_1.bias"])
            matmul_forward(blk["qkv"], blk["ln1"], p[h + "attn.c_attn.weight"],
                           p[h + "attn.c_attn.bias"])                           # (B,T,3C)
            attention_forward(blk["atty"], blk["att"], blk["qkv"], cfg.n_head)  # (B,T,C)
            matmul_forward(blk["attproj"], blk["atty"], p[h + "attn.c_proj.weight"],
                           p[h + "attn.c_proj.bias"])
            residual_forward(blk["res2"], x, blk["attproj"])
            layernorm_forward(blk["ln2"], blk["ln2_mean"], blk["ln2_rstd"], blk["res2"],
                              p[h + "ln_2.weight"], p[h + "ln_2.bias"])
            matmul_forward(blk["fch"], blk["ln2"], p[h + "mlp.c_fc.weight"],
                           p[h + "mlp.c_fc.bias"])                              # (B,T,4C)
            gelu_forward(blk["fch_gelu"], blk["fch"])
            matmul_forward(blk["fcproj"], blk["fch_gelu"], p[h + "mlp.c_proj.weight"],
                           p[h + "mlp.c_proj.bias"])                            # (B,T,C)
            residual_forward(blk["res3"], blk["res2"], blk["fcproj"])
            x = blk["res3"]
        before(*self.spans["ln_f"])
        layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, x, p["ln_f.weight"], p["ln_f.bias"])
        matmul_forward(a.logits, a.lnf, p["wte.weight"].T)                      # (B,T,V), tied

    # --- backward -------------------------------------------------------------------
    def backward(self, dloss: float = 1.0, after=_no_hook):
        """Accumulate into ``grads`` (``+=``) the gradient of ``dloss`` times the loss of
        the last ``forward(idx, targets)``. Call ``zero_grad()`` between steps; several
        backward calls between two ``zero_grad()`` accumulate micro-batches.
        ``after(begin, end)`` is called once grads[begin:end] is final."""
        if self._gpu is not None:
            self._gpu.backward(dloss)
            after(0, self.layout.size)
            return None
        if self._batch is None:
            raise RuntimeError("backward() needs a forward(idx, targets) first")
        idx, targets, n_valid = self._batch
        parts = self._slices(*idx.shape)
        hook = after if len(parts) == 1 else _no_hook

        def run(part):                           # one slice of the batch, in its thread
            a, rows = part.acts, slice(part.lo, part.hi)
            g = part.grad_views                  # self.grad_views for slice 0, a private buffer else
            if part.grads is not None and part.dirty:    # left over from a failed backward
                part.grads[...] = 0
            part.dirty = True
            a.dlosses[...] = dloss / max(n_valid, 1)
            dlogits = a.logits                   # the logits are not needed any more
            softmax_crossentropy_backward(dlogits, a.dlosses, a.probs, targets[rows])
            if self._fast:
                fastmodel.backward_blocks(self, a, idx[rows], g, hook)
            else:
                self._backward_blocks_reference(a, idx[rows], g, hook)

        self._run(run, parts)
        if len(parts) > 1:
            # the slices' gradients summed in order, each thread over its own range, and
            # the private buffers zeroed on the way (ready for the next backward)
            def reduce(rng):
                lo, hi = rng
                for part in parts[1:]:
                    self.grads[lo:hi] += part.grads[lo:hi]
                    part.grads[lo:hi] = 0
            self._run(reduce, even_ranges(self.layout.size, len(parts), 16))
        for part in parts:
            part.dirty = False
        if len(parts) > 1:                       # several threads: final once summed
            after(0, self.layout.size)

    def _backward_blocks_reference(self, a, idx, g, after=_no_hook):
        """From dlogits (in ``a.logits``) down to the embeddings, with worker/layers.py;
        accumulates into the gradient views ``g``."""
        cfg, p = self.config, self.param_views
        dlogits = a.logits
        matmul_backward(a.dC, g["wte.weight"].T, None, dlogits, a.lnf, p["wte.weight"].T)
        x_last = a.blocks[-1]["res3"] if a.blocks else a.encoded
        a.dres[...] = 0
        layernorm_backward(a.dres, g["ln_f.weight"], g["ln_f.bias"], a.dC, x_last,
                           a.lnf_mean, a.lnf_rstd, p["ln_f.weight"])
        after(*self.spans["ln_f"])
        # The residual stream: res3 = res2 + fcproj and res2 = x + attproj. residual_backward
        # would copy dres into both branches; here both branches read a.dres in place and
        # the LayerNorms add their share into it, which is the same sum without copies.
        for i in reversed(range(cfg.n_layer)):
            h, blk = f"h.{i}.", a.blocks[i]
            x_in = a.blocks[i - 1]["res3"] if i > 0 else a.encoded
            # MLP branch: fcproj's gradient is dres
            matmul_backward(a.d4C_a, g[h + "mlp.c_proj.weight"], g[h + "mlp.c_proj.bias"],
                            a.dres, blk["fch_gelu"], p[h + "mlp.c_proj.weight"])
            gelu_backward(a.d4C_b, a.d4C_a, blk["fch"])
            matmul_backward(a.dC, g[h + "mlp.c_fc.weight"], g[h + "mlp.c_fc.bias"],
                            a.d4C_b, blk["ln2"], p[h + "mlp.c_fc.weight"])
            layernorm_backward(a.dres, g[h + "ln_2.weight"], g[h + "ln_2.bias"], a.dC,
                               blk["res2"], blk["ln2_mean"], blk["ln2_rstd"], p[h + "ln_2.weight"])
            # attention branch: attproj's gradient is dres
            matmul_backward(a.dC, g[h + "attn.c_proj.weight"], g[h + "attn.c_proj.bias"],
                            a.dres, blk["atty"], p[h + "attn.c_proj.weight"])
            attention_backward(a.dqkv, a.dC, blk["qkv"], blk["att"], cfg.n_head)
            dln1 = a.dC
            matmul_backward(dln1, g[h + "attn.c_attn.weight"], g[h + "attn.c_attn.bias"],
                            a.dqkv, blk["ln1"], p[h + "attn.c_attn.weight"])
            layernorm_backward(a.dres, g[h + "ln_1.weight"], g[h + "ln_1.bias"], dln1,
                               x_in, blk["ln1_mean"], blk["ln1_rstd"], p[h + "ln_1.weight"])
            after(*self.spans["blocks"][i])
        embedding_backward(g["wte.weight"], g["wpe.weight"], a.dres, idx)
        after(*self.spans["embed"])
