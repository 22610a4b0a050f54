"""Optimizers over flat vectors, shared by the single-process trainer and the servers.

One implementation serves both roles: the trainer runs it on the whole parameter
vector, each server on its own shard (a server passes the weight-decay ranges that
fall inside its shard, in shard coordinates). Everything is in place, on preallocated
state and scratch, so a step allocates nothing.

- ``SGD``: p -= lr * g
- ``Momentum``: buf = mu * buf + g;  p -= lr * buf   (PyTorch's form, dampening 0)
- ``AdamW``: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019), with
  bias correction, in PyTorch's order: p *= 1 - lr * wd, then the Adam step.
Weight decay is decoupled for every optimizer and applies only to ``decay_ranges``
(GPT-2's matrices; biases and LayerNorm gains are not decayed).

The learning-rate schedule (linear warmup, then cosine decay) and clipping by global
norm are plain functions: the global norm is the norm of the *averaged* gradient over
every shard, which only the caller can assemble (the servers exchange their shards'
sums of squares; see ``paramserver/server.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

OPTIMIZERS = ("sgd", "momentum", "adamw")


@dataclass
class OptimConfig:
    """How parameters are updated from averaged gradients."""
    CHOICES = {"optimizer": OPTIMIZERS}
    optimizer: str = "adamw"      # one of sgd | momentum | adamw
    lr: float = 1e-3              # peak learning rate
    momentum: float = 0.9         # momentum coefficient (optimizer=momentum)
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
    """sum(x**2) in float64, the piece of a global norm that one shard contributes."""
    x64 = x.astype(numpy.float64, copy=False)
    return float(numpy.dot(x64, x64)) if x.ndim == 1 else float((x64 * x64).sum())


class Optimizer:
    """Base: state over a flat vector of ``size`` elements of ``dtype``."""
    name = "?"

    def __init__(self, cfg: OptimConfig, size: int, dtype=numpy.float32, decay_ranges=()):
        self.cfg = cfg
        self.size = int(size)
        self.dtype = numpy.dtype(dtype)
        self.decay_ranges = [(int(b), int(e)) for b, e in decay_ranges]
        for b, e in self.decay_ranges:
            if not 0 <= b <= e <= self.size:
                raise ValueError(f"decay range [{b}, {e}) outside [0, {self.size})")
        self.t = 0                 # optimizer steps taken
        self._scratch = numpy.empty(self.size, dtype=self.dtype)

    def step(self, params, grads, lr: float, grad_scale: float = 1.0):
        """One in-place update of ``params`` with ``grad_scale * grads``."""
        self.begin()
        self.update(params, grads, lr, grad_scale)

    def begin(self):
        """Start step ``t + 1``; then ``update`` every range once (a server updates its
        chunks one by one, each as soon as it may: ``paramserver/shard.py``)."""
        self.t += 1

    def update(self, params, grads, lr: float, grad_scale: float = 1.0, lo: int = 0, hi: int | None = None):
        """The current step's in-place update of ``params[lo:hi]`` with ``grad_scale *
        grads[lo:hi]`` (full vectors; every element is updated on its own, so ranges
        updated one after the other give exactly the update of the whole)."""
        hi = self.size if hi is None else hi
        if params.shape != (self.size,) or grads.shape != (self.size,) or not 0 <= lo <= hi <= self.size:
            raise ValueError(f"expected params and grads of shape ({self.size},) and 0 <= lo <= hi <= "
                             f"{self.size}, got {params.shape}, {grads.shape}, [{lo}, {hi})")
        if self.cfg.weight_decay and lr:
            keep = 1.0 - lr * self.cfg.weight_decay
            for b, e in self.decay_ranges:
                if max(b, lo) < min(e, hi):
                    params[max(b, lo):min(e, hi)] *= keep
        self._update(params[lo:hi], grads[lo:hi], lr, grad_scale, slice(lo, hi))

    def _update(self, params, grads, lr, grad_scale, r: slice):
        """Update ``params`` (the slice ``r`` of the vector) with ``grads``; state and scratch
        are sliced by ``r``."""
        raise NotImplementedError

    # checkpointing: plain dicts of arrays and numbers
    def state_dict(self) -> dict:
        return {"t": self.t}

    def load_state_dict(self, state: dict):
        self.t = int(state["t"])


class SGD(Optimizer):
    name = "sgd"

    def _update(self, params, grads, lr, grad_scale, r):
        s = self._scratch[r]
        numpy.multiply(grads, lr * grad_scale, out=s)
        params -= s


class Momentum(Optimizer):
    name = "momentum"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.buf = numpy.zeros(self.size, dtype=self.dtype)

    def _update(self, params, grads, lr, grad_scale, r):
        buf, s = self.buf[r], self._scratch[r]
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


class AdamW(Optimizer):
    name = "adamw"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.m = numpy.zeros(self.size, dtype=self.dtype)
        self.v = numpy.zeros(self.size, dtype=self.dtype)
        self._scratch2 = numpy.empty(self.size, dtype=self.dtype)

    def _update(self, params, grads, lr, grad_scale, r):
        c = self.cfg
        m, v, s, s2 = self.m[r], self.v[r], self._scratch[r], self._scratch2[r]
        numpy.multiply(grads, grad_scale, out=s)          # s = g
        m *= c.beta1
        numpy.multiply(s, 1.0 - c.beta1, out=s2)
        m += s2                                           # m = b1 m + (1-b1) g
        v *= c.beta2
        s *= s
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


def make_optimizer(cfg: OptimConfig, size: int, dtype=numpy.float32, decay_ranges=()) -> Optimizer:
    """The optimizer that ``cfg.optimizer`` names, over a flat vector of ``size`` elements."""
    cls = {"sgd": SGD, "momentum": Momentum, "adamw": AdamW}[cfg.optimizer]
    return cls(cfg, size, dtype, decay_ranges)
