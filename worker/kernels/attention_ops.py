"""Launchers of the attention kernels (``attention.cu``), with the layers' signatures.

Two contracts, told apart by the array the caller saves for the backward:

- ``att`` (B,NH,T,T), as ``worker/layers.py``: cuBLAS (strided batched GEMMs on
  contiguous copies of q, k, v, ``gemm.py``) for q.k^T, att.v and their gradients, our
  kernels for the causal softmax and its backward; every element type (in 16 bits the
  scores are rounded to 16 bits before the softmax, as under torch.autocast).
- ``lse`` (B,NH,T), the log-sum-exp of each row of scaled scores: the memory-efficient
  kernels that never hold a T x T array; float32, float64, and bf16 / fp16 with ``lse``
  in float32. Its NumPy specification is ``reference.py``.

``attention_backward`` takes the forward's output ``out`` as an optional last
argument: with ``lse`` the backward needs ``D_i = dout_i . out_i`` per row, which it
otherwise gets by running the forward again. The model passes it (it keeps ``out`` as
the input of the projection that follows); the layers' signature stays valid.

Anything the kernels do not take goes to the reference (``ops._reference``).
"""
from __future__ import annotations

import math

from worker import layers
from worker.kernels import gemm, loader, reference
from worker.kernels.ops import _I32, _blocks, _kind, _reference, _scalar, _threads

_ATT_WARPS = 8                 # rows per block of the memory-efficient attention (attention.cu)
_ATT_HS: dict = {}             # C type -> head-size bounds compiled
for _t, _hs in loader.ATTENTION_HS:
    _ATT_HS.setdefault(_t, []).append(_hs)


def _heads(qkv, n_head):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q5 = qkv.reshape(B, T, 3, n_head, hs)
    return [q5[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]   # (B,NH,T,hs) views


def _packed_heads(xp, x, B, T, n_head, hs):
    """A (B,NH,T,hs) view as a contiguous (B*NH, T, hs) batch of matrices (a copy)."""
    return xp.ascontiguousarray(x).reshape(B * n_head, T, hs)


def _flash_variant(ct, hs):
    fits = [m for m in sorted(_ATT_HS.get(ct, ())) if hs <= m]
    return f"{ct}, {fits[0]}" if fits else None


def _flash_geometry(T, B, n_head):
    return ((T + _ATT_WARPS - 1) // _ATT_WARPS, B * n_head), (32 * _ATT_WARPS,)


def attention_forward(out, att, qkv, n_head):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    scale = 1.0 / math.sqrt(hs)
    if att.ndim == 3:                                   # lse (B,NH,T): memory-efficient
        ct = _kind((out, qkv), (att,))
        variant = ct and _flash_variant(ct, hs)
        if (not variant or B * n_head > 65535 or att.shape != (B, n_head, T)
                or out.shape != (B, T, C3 // 3)):
            return _reference(reference.attention_lse_forward, out, att, qkv, n_head)
        grid, block = _flash_geometry(T, B, n_head)
        loader.function("attention", f"attention_forward_flash<{variant}>")(
            grid, block, (out, att, qkv, _I32(T), _I32(n_head), _I32(hs), _scalar(ct, scale)))
        return
    ct = _kind((out, att, qkv))
    if ct is None or att.shape != (B, n_head, T, T) or out.shape != (B, T, C3 // 3):
        return _reference(layers.attention_forward, out, att, qkv, n_head)
    import cupy
    q, k_, v = (_packed_heads(cupy, x, B, T, n_head, hs) for x in _heads(qkv, n_head))
    att3 = att.reshape(B * n_head, T, T)
    if not gemm.gemm(att3, q, k_.transpose(0, 2, 1)):                 # raw scores q.k^T
        return _reference(layers.attention_forward, out, att, qkv, n_head)
    loader.function("attention", f"causal_softmax_forward<{ct}>")(
        (B * n_head * T,), (_threads(T),), (att, _I32(T), _scalar(ct, scale)))
    y = cupy.empty((B * n_head, T, hs), dtype=qkv.dtype)
    gemm.gemm(y, att3, v)                                             # (B*NH,T,hs)
    out.reshape(B, T, n_head, hs)[...] = y.reshape(B, n_head, T, hs).transpose(0, 2, 1, 3)


def attention_backward(dqkv, dout, qkv, att, n_head, out=None):
    """dqkv (B,T,3C) assigned. ``out`` (B,T,C), optional: the forward's output (see the
    module's docstring); ignored by the ``att`` contract, which does not need it."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    scale = 1.0 / math.sqrt(hs)
    if att.ndim == 3:
        have_out = out is not None and out.shape == dout.shape
        ct = _kind((dqkv, dout, qkv) + ((out,) if have_out else ()), (att,))
        variant = ct and _flash_variant(ct, hs)
        if (not variant or B * n_head > 65535 or att.shape != (B, n_head, T)
                or dout.shape != (B, T, C3 // 3) or dqkv.shape != qkv.shape):
            return _reference(reference.attention_lse_backward, dqkv, dout, qkv, att, n_head)
        import cupy
        grid, block = _flash_geometry(T, B, n_head)
        if not have_out:                                # re-run the forward for out
            out, lse2 = cupy.empty_like(dout), cupy.empty_like(att)
            loader.function("attention", f"attention_forward_flash<{variant}>")(
                grid, block, (out, lse2, qkv, _I32(T), _I32(n_head), _I32(hs), _scalar(ct, scale)))
        D = cupy.empty_like(att)                        # (B,NH,T) in Acc<T>
        rows = B * T * n_head
        loader.function("attention", f"attention_backward_D<{ct}>")(
            (_blocks(rows, 8),), (256,), (D, dout, out, _I32(B), _I32(T), _I32(n_head), _I32(hs)))
        args = (dqkv, dout, qkv, att, D, _I32(T), _I32(n_head), _I32(hs), _scalar(ct, scale))
        loader.function("attention", f"attention_backward_dq_flash<{variant}>")(grid, block, args)
        loader.function("attention", f"attention_backward_dkdv_flash<{variant}>")(grid, block, args)
        return
    ct = _kind((dqkv, dout, qkv, att))
    if (ct is None or att.shape != (B, n_head, T, T)
            or dout.shape != (B, T, C3 // 3) or dqkv.shape != qkv.shape):
        return _reference(layers.attention_backward, dqkv, dout, qkv, att, n_head)
    import cupy
    BH = B * n_head
    q, k_, v = (_packed_heads(cupy, x, B, T, n_head, hs) for x in _heads(qkv, n_head))
    dy = _packed_heads(cupy, dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3), B, T, n_head, hs)
    att3 = att.reshape(BH, T, T)
    dq, dk, dv = (cupy.empty((BH, T, hs), dtype=qkv.dtype) for _ in range(3))
    datt = cupy.empty((BH, T, T), dtype=qkv.dtype)
    if not gemm.gemm(dv, att3.transpose(0, 2, 1), dy):               # dv = att^T dy
        return _reference(layers.attention_backward, dqkv, dout, qkv, att, n_head)
    gemm.gemm(datt, dy, v.transpose(0, 2, 1))                         # datt = dy v^T
    loader.function("attention", f"causal_softmax_backward<{ct}>")(
        (BH * T,), (_threads(T),), (datt, att, _I32(T), _scalar(ct, scale)))
    gemm.gemm(dq, datt, k_)
    gemm.gemm(dk, datt.transpose(0, 2, 1), q)
    d5 = dqkv.reshape(B, T, 3, n_head, hs)
    for i, d in enumerate((dq, dk, dv)):
        d5[:, :, i] = d.reshape(B, n_head, T, hs).transpose(0, 2, 1, 3)
