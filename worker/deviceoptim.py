"""The optimizers of ``common/optim.py`` over flat vectors in GPU memory.

``ps-train --device cuda`` and the GPU benchmark step the optimizer where the
parameters are, on the GPU: AdamW is the fused ``adamw_update`` kernel (one pass, the
reference's operations in its order; ``tests/kernel_checks.py`` checks it against
``common.optim.AdamW``), SGD and momentum are two CuPy expressions. Same interface as
``common.optim.Optimizer`` (``step``, ``state_dict``, ``load_state_dict``, ``t``), with
the state on the device and ``state_dict`` in host arrays, so checkpoints are the same
files whichever device wrote them. In a parameter-server job the optimizer is on the
servers and none of this runs on the worker.

Not here: the learning-rate schedule and clipping (``common.optim``: plain host
functions of the step and the gradient norm).
"""
from __future__ import annotations

import numpy

from common.optim import OptimConfig
from worker import kernels


class DeviceOptimizer:
    """``cfg.optimizer`` over ``size`` elements of ``dtype`` in the memory of ``xp``."""

    def __init__(self, xp, cfg: OptimConfig, size: int, dtype=numpy.float32, decay_ranges=()):
        self.xp, self.cfg, self.size = xp, cfg, int(size)
        self.dtype = numpy.dtype(dtype)
        self.name = cfg.optimizer
        self.decay_ranges = [(int(b), int(e)) for b, e in decay_ranges]
        for b, e in self.decay_ranges:
            if not 0 <= b <= e <= self.size:
                raise ValueError(f"decay range [{b}, {e}) outside [0, {self.size})")
        self.t = 0
        names = {"sgd": (), "momentum": ("buf",), "nesterov": ("buf",), "adamw": ("m", "v")}[self.name]
        self.state = {n: xp.zeros(self.size, dtype=self.dtype) for n in names}

    def step(self, params, grads, lr: float, grad_scale: float = 1.0):
        """One in-place update of ``params`` with ``grad_scale * grads`` (device vectors)."""
        if params.shape != (self.size,) or grads.shape != (self.size,):
            raise ValueError(f"expected params and grads of shape ({self.size},), got "
                             f"{params.shape} and {grads.shape}")
        self.t += 1
        c, s = self.cfg, self.state
        if self.name == "adamw":
            kernels.adamw_update(params, grads, s["m"], s["v"], lr=lr, step=self.t, beta1=c.beta1,
                                 beta2=c.beta2, eps=c.eps, weight_decay=c.weight_decay,
                                 grad_scale=grad_scale, decay_ranges=self.decay_ranges)
            return
        keep = 1.0 - lr * c.weight_decay if c.weight_decay and lr else None
        if keep is not None:                      # as common.optim: decay before the step
            for b, e in self.decay_ranges:
                params[b:e] *= keep
        if self.name == "sgd":                    # the reference's rounding, operation for operation
            params -= grads * (lr * grad_scale)
            return
        s["buf"] *= c.momentum
        g = grads * grad_scale
        s["buf"] += g
        if self.name == "nesterov":               # as common.optim.Nesterov: g + mu buf
            g += s["buf"] * c.momentum
            params -= g * lr
            return
        params -= s["buf"] * lr

    def state_dict(self) -> dict:
        return {"t": self.t, **{n: v.get() for n, v in self.state.items()}}

    def load_state_dict(self, state: dict):
        self.t = int(state["t"])
        for n, v in self.state.items():
            v[...] = self.xp.asarray(state[n], dtype=self.dtype)
