"""Optimizers over flat vectors, shared by the single-process trainer and the servers.

One implementation serves both roles: the trainer runs it on the whole parameter
vector, each server on its own shard (a server passes the weight-decay ranges that
fall inside its shard, in shard coordinates). Everything is in place, on preallocated
state and scratch, so a step allocates nothing.

- ``SGD``: p -= lr * g
- ``Momentum``: buf = mu * buf + g;  p -= lr * buf   (PyTorch's form, dampening 0)
- ``Nesterov``: buf = mu * buf + g;  p -= lr * (g + mu * buf)   (PyTorch's ``nesterov=True``;
  DiLoCo's outer optimizer, ``paramserver/steps.py``)
- ``AdamW``: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019), with
  bias correction, in PyTorch's order: p *= 1 - lr * wd, then the Adam step.
Weight decay is decoupled for every optimizer and applies only to ``decay_ranges``
(GPT-2's matrices; biases and LayerNorm gains are not decayed).

A step walks the vector in chunks of ``CHUNK`` elements and does all of its passes
(decay, moments, update) on one chunk before the next, so the dozen elementwise passes
of AdamW run in L2 cache rather than streaming the whole vector from memory each time
(about 1.7x faster on config B's 10.7M parameters); the arithmetic per element is the
same sequence of operations as a whole-vector pass, so the result is bit-identical.
With ``threads`` > 1 the chunks are shared out among that many threads (NumPy releases
the GIL inside each operation); every element still sees the same operations, so the
result does not depend on the number of threads.

The learning-rate schedule (linear warmup, then cosine decay) and clipping by global
norm are plain functions: the global norm is the norm of the *averaged* gradient over
every shard, which only the caller can assemble (the servers exchange their shards'
sums of squares; see ``paramserver/server.py``).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw")
CHUNK = 1 << 16        # elements per chunk of a step (256 KiB of float32 per array)


@dataclass
class OptimConfig:
    """How parameters are updated from averaged gradients."""
    CHOICES = {"optimizer": OPTIMIZERS}
    optimizer: str = "adamw"      # one of sgd | momentum | nesterov | adamw
    lr: float = 1e-3              # peak learning rate
    momentum: float = 0.9         # momentum coefficient (optimizer=momentum or nesterov)
    beta1: float = 0.9            # AdamW first-moment decay
    beta2: float = 0.95           # AdamW second-moment decay (GPT-2/nanoGPT use 0.95)
    eps: float = 1e-8             # AdamW denominator epsilon
    weight_decay: float = 0.0     # decoupled weight decay on matrices (0 = off)
    warmup_steps: int = 0         # linear warmup from lr/warmup_steps to lr
    lr_decay_steps: int = 0       # cosine decay from lr to min_lr ends at this step (0 = constant lr)
    min_lr: float = 0.0           # learning rate at the end of the cosine decay
    grad_clip: float = 0.0        # clip the global gradient norm to this (0 = off)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")
        for name in ("lr", "momentum", "beta1", "beta2", "eps", "weight_decay", "min_lr", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "lr_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie in [0, 1), got {self.beta1}, {self.beta2}")


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup over
    ``warmup_steps``, then cosine decay to ``min_lr`` at ``lr_decay_steps``, then
    ``min_lr``; constant ``lr`` after warmup when ``lr_decay_steps`` is 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay_steps <= 0:
        return cfg.lr
    if step >= cfg.lr_decay_steps:
        return cfg.min_lr
    span = max(1, cfg.lr_decay_steps - cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def clip_scale(global_norm: float, max_norm: float) -> float:
    """The factor that brings a gradient of norm ``global_norm`` down to ``max_norm``
    (1.0 when it is already within, or when clipping is off: ``max_norm`` <= 0).
    A non-finite norm gives 0.0: the step is skipped rather than poisoning the weights."""
    if not math.isfinite(global_norm):
        return 0.0
    if max_norm <= 0 or global_norm <= max_norm:
        return 1.0
    return max_norm / (global_norm + 1e-6)


def sum_of_squares(x) -> float:
    """sum(x**2) in float64, the piece of a global norm that one shard contributes (a
    1-D float32 vector is converted CHUNK elements at a time: no float64 copy of it all)."""
    if x.ndim == 1 and x.dtype != numpy.float64 and x.size > CHUNK:
        total = 0.0
        for lo in range(0, x.size, CHUNK):
            x64 = x[lo:lo + CHUNK].astype(numpy.float64)
            total += float(numpy.dot(x64, x64))
        return total
    x64 = x.astype(numpy.float64, copy=False)
    # ``@`` rather than numpy.dot: the same BLAS dot on NumPy, and CuPy's own on a GPU vector
    return float(x64 @ x64) if x.ndim == 1 else float((x64 * x64).sum())


class Optimizer:
    """Base: state over a flat vector of ``size`` elements of ``dtype``."""
    name = "?"

    def __init__(self, cfg: OptimConfig, size: int, dtype=numpy.float32, decay_ranges=(),
                 threads: int = 1):
        self.cfg = cfg
        self.size = int(size)
        self.dtype = numpy.dtype(dtype)
        self.decay_ranges = [(int(b), int(e)) for b, e in decay_ranges]
        for b, e in self.decay_ranges:
            if not 0 <= b <= e <= self.size:
                raise ValueError(f"decay range [{b}, {e}) outside [0, {self.size})")
        self.t = 0                 # optimizer steps taken
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        # per chunk [lo, hi): the parts of the decay ranges inside it, computed once
        chunks = []
        for lo in range(0, self.size, CHUNK):
            hi = min(self.size, lo + CHUNK)
            inside = [(max(b, lo), min(e, hi)) for b, e in self.decay_ranges if b < hi and e > lo]
            chunks.append((lo, hi, inside))
        # each thread takes a contiguous run of chunks, with its own two scratch buffers
        n = max(1, min(threads, len(chunks)))
        self._runs = [chunks[len(chunks) * i // n:len(chunks) * (i + 1) // n] for i in range(n)]
        self._scratch = [(numpy.empty(min(self.size, CHUNK), dtype=self.dtype),
                          numpy.empty(min(self.size, CHUNK), dtype=self.dtype)) for _ in range(n)]
        self._pool = ThreadPoolExecutor(n - 1, thread_name_prefix="optim") if n > 1 else None

    def step(self, params, grads, lr: float, grad_scale: float = 1.0):
        """One in-place update of ``params`` with ``grad_scale * grads``."""
        if params.shape != (self.size,) or grads.shape != (self.size,):
            raise ValueError(f"expected params and grads of shape ({self.size},), got "
                             f"{params.shape} and {grads.shape}")
        self.t += 1
        keep = 1.0 - lr * self.cfg.weight_decay if self.cfg.weight_decay and lr else None

        def run(i):
            s, s2 = self._scratch[i]
            for lo, hi, inside in self._runs[i]:
                if keep is not None:
                    for b, e in inside:
                        params[b:e] *= keep
                self._update(lo, hi, params[lo:hi], grads[lo:hi], lr, grad_scale,
                             s[:hi - lo], s2[:hi - lo])

        futures = [self._pool.submit(run, i) for i in range(1, len(self._runs))] if self._pool else []
        run(0)
        for f in futures:
            f.result()

    def begin(self):
        """Start step ``t + 1`` for ``update``: a server updates its chunks one by one, each
        as soon as it may (``paramserver/shard.py``), calling ``begin`` once, then ``update``
        once for every range of a cover of the vector."""
        self.t += 1

    def update(self, params, grads, lr: float, grad_scale: float = 1.0, lo: int = 0, hi: int | None = None,
               grads_at: int = 0):
        """The current step's update of ``params[lo:hi]`` (the full vector) with
        ``grad_scale`` times the gradient of that range, which is ``grads[lo - grads_at:
        hi - grads_at]``: the full gradient vector (``grads_at`` 0) or an array of the
        range's own (``grads_at`` = lo: a server hands over a received chunk as it is).
        Every element sees the operations it sees in ``step``, so ranges updated one
        after the other give ``step`` bit for bit (one thread)."""
        hi = self.size if hi is None else hi
        if params.shape != (self.size,) or not 0 <= lo <= hi <= self.size or grads.ndim != 1 \
                or not 0 <= lo - grads_at <= hi - grads_at <= grads.shape[0]:
            raise ValueError(f"expected params of shape ({self.size},), 0 <= lo <= hi <= {self.size} and grads "
                             f"covering [lo, hi), got {params.shape}, [{lo}, {hi}), grads {grads.shape} at {grads_at}")
        keep = 1.0 - lr * self.cfg.weight_decay if self.cfg.weight_decay and lr else None
        s, s2 = self._scratch[0]
        for run in self._runs:
            for clo, chi, inside in run:
                a, b = max(clo, lo), min(chi, hi)
                if a >= b:
                    continue
                if keep is not None:
                    for db, de in inside:
                        if max(db, a) < min(de, b):
                            params[max(db, a):min(de, b)] *= keep
                self._update(a, b, params[a:b], grads[a - grads_at:b - grads_at], lr, grad_scale, s[:b - a],
                             s2[:b - a])

    def _update(self, lo, hi, params, grads, lr, grad_scale, s, s2):
        """Update the chunk ``[lo, hi)`` of the vector: ``params``, ``grads`` are its views,
        ``s`` and ``s2`` scratch of its length."""
        raise NotImplementedError

    # checkpointing: plain dicts of arrays and numbers
    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict):
        self.t = int(state["t"])


class SGD(Optimizer):
    name = "sgd"

    def _update(self, lo, hi, params, grads, lr, grad_scale, s, s2):
        numpy.multiply(grads, lr * grad_scale, out=s)
        params -= s


class Momentum(Optimizer):
    name = "momentum"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buf = numpy.zeros(self.size, dtype=self.dtype)

    def _update(self, lo, hi, params, grads, lr, grad_scale, s, s2):
        buf = self.buf[lo:hi]
        buf *= self.cfg.momentum
        numpy.multiply(grads, grad_scale, out=s)
        buf += s
        numpy.multiply(buf, lr, out=s)
        params -= s

    def state_dict(self):
        return {"t": self.t, "buf": self.buf}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.buf[...] = state["buf"]


class Nesterov(Momentum):
    """Momentum with Nesterov's look-ahead: the step is g + mu * buf with the new buffer."""
    name = "nesterov"

    def _update(self, lo, hi, params, grads, lr, grad_scale, s, s2):
        buf = self.buf[lo:hi]
        buf *= self.cfg.momentum
        numpy.multiply(grads, grad_scale, out=s)
        buf += s
        numpy.multiply(buf, self.cfg.momentum, out=s2)
        s += s2                                           # s = g + mu buf
        s *= lr
        params -= s


class AdamW(Optimizer):
    name = "adamw"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.m = numpy.zeros(self.size, dtype=self.dtype)
        self.v = numpy.zeros(self.size, dtype=self.dtype)

    def _update(self, lo, hi, params, grads, lr, grad_scale, s, s2):
        c = self.cfg
        m, v = self.m[lo:hi], self.v[lo:hi]
        if grad_scale != 1.0:                             # g * 1.0 == g: skipping is exact
            grads = numpy.multiply(grads, grad_scale, out=s)
        m *= c.beta1
        numpy.multiply(grads, 1.0 - c.beta1, out=s2)
        m += s2                                           # m = b1 m + (1-b1) g
        v *= c.beta2
        numpy.multiply(grads, grads, out=s)
        s *= 1.0 - c.beta2
        v += s                                            # v = b2 v + (1-b2) g^2
        bc1 = 1.0 - c.beta1 ** self.t
        bc2 = 1.0 - c.beta2 ** self.t
        numpy.sqrt(v, out=s)
        s *= 1.0 / math.sqrt(bc2)
        s += c.eps                                        # s = sqrt(v_hat) + eps
        numpy.divide(m, s, out=s)
        s *= lr / bc1                                     # s = lr m_hat / (sqrt(v_hat) + eps)
        params -= s

    def state_dict(self):
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.m[...] = state["m"]
        self.v[...] = state["v"]


def make_optimizer(cfg: OptimConfig, size: int, dtype=numpy.float32, decay_ranges=(),
                   threads: int = 1) -> Optimizer:
    """The optimizer that ``cfg.optimizer`` names, over a flat vector of ``size`` elements,
    stepping with ``threads`` threads."""
    cls = {"sgd": SGD, "momentum": Momentum, "nesterov": Nesterov, "adamw": AdamW}[cfg.optimizer]
    return cls(cfg, size, dtype, decay_ranges, threads=threads)
