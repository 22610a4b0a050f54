"""Launcher of the fused AdamW kernel (``adamw.cu``) over a flat parameter vector.

``adamw_update`` is one pass of ``common.optim.AdamW.step`` over the whole vector, in
the reference's order of operations (decay on the decay ranges first, then the Adam
step with bias correction); the step-dependent scalars are computed here in double
and passed in the element type, as NumPy rounds the reference's Python floats.
float32 and float64 only: the optimizer always runs on the master parameters, never
on a 16-bit copy. There is no slow path to fall back to, so anything else raises.
"""
from __future__ import annotations

import math

import numpy

from worker.kernels import loader
from worker.kernels.ops import _I32, _I64, _blocks, _floats, _scalar


def merge_ranges(ranges):
    """Sorted, non-empty [begin, end) pairs, touching ones joined, flattened:
    [b0, e0, b1, e1, ...]. Overlapping ranges are an error: the reference
    (``common.optim``) would decay their overlap twice, which no caller means."""
    merged = []
    for b, e in sorted((int(b), int(e)) for b, e in ranges):
        if e <= b:
            continue
        if merged and b < merged[-1][1]:
            raise ValueError(f"decay ranges overlap: [{merged[-1][0]}, {merged[-1][1]}) "
                             f"and [{b}, {e})")
        if merged and b == merged[-1][1]:
            merged[-1][1] = e
        else:
            merged.append([b, e])
    return [x for pair in merged for x in pair]


_range_cache: dict = {}


def adamw_update(params, grads, m, v, *, lr, step, beta1, beta2, eps, weight_decay=0.0,
                 grad_scale=1.0, decay_ranges=()):
    """One AdamW step in place, exactly ``common.optim.AdamW.step`` after its ``t`` has
    become ``step`` (1 for the first step). All four vectors: 1-D CuPy, C-contiguous,
    one dtype (float32 or float64), the same length; there is no slow path to fall back
    to, so anything else raises."""
    ct = _floats(params, grads, m, v)
    if ct not in ("float", "double") or params.ndim != 1 or not params.shape == grads.shape == m.shape == v.shape:
        raise TypeError("adamw_update needs 1-D C-contiguous CuPy float32/float64 vectors of "
                        "one dtype and length; got "
                        + ", ".join(f"{type(a).__module__}.{type(a).__name__} "
                                    f"{getattr(a, 'dtype', '?')} {getattr(a, 'shape', '?')}"
                                    for a in (params, grads, m, v)))
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    import cupy
    decay = bool(weight_decay and lr)
    flat = merge_ranges(decay_ranges) if decay else []
    if flat and (flat[0] < 0 or flat[-1] > params.size):
        raise ValueError(f"decay ranges outside [0, {params.size})")
    key = (params.device.id, tuple(flat))
    if key not in _range_cache:
        _range_cache[key] = cupy.asarray(numpy.asarray(flat, dtype=numpy.int64))
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    s = lambda x: _scalar(ct, x)  # noqa: E731
    args = (params, grads, m, v, _range_cache[key], _I32(len(flat) // 2), _I64(params.size),
            s(grad_scale), s(beta1), s(1.0 - beta1), s(beta2), s(1.0 - beta2),
            s(1.0 / math.sqrt(bc2)), s(eps), s(lr / bc1), s(1.0 - lr * weight_decay))
    loader.function("adamw", f"adamw_update<{ct}>")((_blocks(params.size),), (256,), args)
