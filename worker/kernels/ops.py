"""Launchers of the CUDA kernels, with the signatures of ``worker/layers.py``.

Every function here has the name, arguments and contract of the layer it replaces
(outputs first, then inputs, then weights; parameter gradients ``+=``; activation
gradients assigned, except the residual stream's, which add), so the model can take
``worker.kernels`` instead of ``worker.layers`` as its ops module. Each checks what it
was given: CuPy arrays, C-contiguous, one float type the kernels are compiled for
(float32 or float64), integer ids of int32/int64, shapes the kernel handles. Anything
else, NumPy arrays included, goes to the reference layer in ``worker.layers``, which
runs on CuPy too, through its array module: slower, never wrong.

Matmuls are cuBLAS through ``cupy.matmul`` (as in the reference); the kernels do the
rest. Attention has two contracts, told apart by the array saved for the backward:
``att`` (B,NH,T,T) as the reference, or ``lse`` (B,NH,T) for the memory-efficient
kernels (see ``attention.cu`` and ``reference.py``). ``adamw_update`` is one fused pass
of ``common.optim.AdamW``'s step over a flat vector.

Scalars are passed to kernels as NumPy scalars of the exact C type of the kernel's
parameter (CuPy would pass a Python float as a double and an int as a 64-bit int).
Nothing here imports CuPy at import time: cupy is taken from the arrays.
"""
from __future__ import annotations

import math

import numpy

from worker import layers
from worker.kernels import loader, reference

array_module = layers.array_module
_CTYPE = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double"}
_ITYPE = {numpy.dtype(numpy.int32): "int", numpy.dtype(numpy.int64): "long long"}
_ATT_HS = {"float": (64, 128), "double": (64,)}
_ATT_WARPS = 8                 # rows per block of the memory-efficient attention (attention.cu)
_I32, _I64 = numpy.int32, numpy.int64


def _is_cupy(x):
    return x is not None and type(x).__module__.split(".")[0] == "cupy"


def _floats(*arrays):
    """The C type name when all ``arrays`` are non-empty, C-contiguous CuPy arrays of one
    compiled float dtype; else None (the caller falls back to the reference)."""
    if not all(_is_cupy(a) for a in arrays):
        return None
    dtype = arrays[0].dtype
    if dtype not in _CTYPE or any(a.dtype != dtype or not a.flags.c_contiguous or a.size == 0
                                  for a in arrays):
        return None
    return _CTYPE[dtype]


def _ids(x):
    """The C type name of integer ids ``x`` (int32/int64, contiguous CuPy), else None."""
    if not _is_cupy(x) or not x.flags.c_contiguous or x.dtype not in _ITYPE:
        return None
    return _ITYPE[x.dtype]


def _scalar(ctype, value):
    return numpy.float32(value) if ctype == "float" else numpy.float64(value)


def _threads(width, cap=256):
    """Threads of a block that strides over ``width`` elements: a multiple of 32."""
    return min(cap, 32 * ((width + 31) // 32))


def _blocks(n, threads=256, cap=65536):
    """Blocks of a grid-stride loop over ``n`` elements."""
    return max(1, min(cap, (n + threads - 1) // threads))


# --------------------------------------------------------------------------------------
# token + position embedding

def embedding_forward(out, idx, wte, wpe):
    ct, it = _floats(out, wte, wpe), _ids(idx)
    if (ct is None or it is None or idx.ndim != 2 or wpe.shape[0] < idx.shape[1]
            or out.shape != idx.shape + wte.shape[1:] or wpe.shape[1:] != wte.shape[1:]):
        return layers.embedding_forward(out, idx, wte, wpe)
    (B, T), C = idx.shape, out.shape[-1]
    k = loader.function("embedding", f"embedding_forward<{ct}, {it}>")
    k((B * T,), (_threads(C),), (out, idx, wte, wpe, _I64(B * T), _I32(T), _I32(C)))


def embedding_backward(dwte, dwpe, dout, idx):
    ct, it = _floats(dwte, dwpe, dout), _ids(idx)
    if (ct is None or it is None or idx.ndim != 2 or dwpe.shape[0] < idx.shape[1]
            or dout.shape != idx.shape + dwte.shape[1:] or dwpe.shape[1:] != dwte.shape[1:]):
        return layers.embedding_backward(dwte, dwpe, dout, idx)
    import cupy
    B, T, C = dout.shape
    N = B * T
    flat = idx.reshape(-1)
    order = cupy.argsort(flat).astype(cupy.int64, copy=False)   # a deterministic sort
    sorted_ids = cupy.ascontiguousarray(flat[order])
    k = loader.function("embedding", f"embedding_backward_wte<{ct}, {it}>")
    k((N,), (_threads(C),), (dwte, dout, order, sorted_ids, _I64(N), _I32(C)))
    k = loader.function("embedding", f"embedding_backward_wpe<{ct}>")
    k((_blocks(T * C),), (256,), (dwpe, dout, _I32(B), _I32(T), _I32(C)))


# --------------------------------------------------------------------------------------
# LayerNorm

def _ln_shapes_ok(x, stats, vecs, same):
    C = x.shape[-1]
    return (all(s.shape == x.shape[:-1] for s in stats) and all(v.shape == (C,) for v in vecs)
            and all(a.shape == x.shape for a in same))


def layernorm_forward(out, mean, rstd, x, w, b):
    ct = _floats(out, mean, rstd, x, w, b)
    if ct is None or not _ln_shapes_ok(x, (mean, rstd), (w, b), (out,)):
        return layers.layernorm_forward(out, mean, rstd, x, w, b)
    C = x.shape[-1]
    N = x.size // C
    k = loader.function("layernorm", f"layernorm_forward<{ct}>")
    k(((N + 7) // 8,), (256,), (out, mean, rstd, x, w, b, _I64(N), _I32(C),
                               _scalar(ct, layers.LN_EPS)))


def _column_chunks(N):
    """(K, rows per chunk) for the column sums: enough blocks, bounded scratch."""
    K = max(1, min(256, (N + 63) // 64))
    return K, (N + K - 1) // K


def layernorm_backward(dx, dw, db, dout, x, mean, rstd, w):
    ct = _floats(dx, dw, db, dout, x, mean, rstd, w)
    if ct is None or not _ln_shapes_ok(x, (mean, rstd), (dw, db, w), (dx, dout)):
        return layers.layernorm_backward(dx, dw, db, dout, x, mean, rstd, w)
    import cupy
    C = x.shape[-1]
    N = x.size // C
    k = loader.function("layernorm", f"layernorm_backward_dx<{ct}>")
    k(((N + 7) // 8,), (256,), (dx, dout, x, mean, rstd, w, _I64(N), _I32(C)))
    K, rows = _column_chunks(N)
    # partial sums are in Acc<T>, which is T itself for the two compiled types
    part_w = cupy.empty((K, C), dtype=x.dtype)
    part_b = cupy.empty((K, C), dtype=x.dtype)
    k = loader.function("layernorm", f"layernorm_backward_dwdb_partial<{ct}>")
    k(((C + 31) // 32, K), (32, 8), (part_w, part_b, dout, x, mean, rstd, _I64(N), _I32(C),
                                     _I64(rows)))
    k = loader.function("layernorm", f"column_accumulate<{ct}>")
    k(((C + 255) // 256,), (256,), (dw, part_w, _I32(K), _I32(C)))
    k(((C + 255) // 256,), (256,), (db, part_b, _I32(K), _I32(C)))


# --------------------------------------------------------------------------------------
# linear layer: cuBLAS for the product, kernels for the bias

def matmul_forward(out, x, w, b=None):
    ct = None if b is None or b.shape != out.shape[-1:] else _floats(out, b)
    layers.matmul_forward(out, x, w, None if ct else b)
    if ct:
        OC = b.shape[0]
        N = out.size // OC
        loader.function("residual", f"bias_forward<{ct}>")((N,), (_threads(OC),),
                                                           (out, b, _I64(N), _I32(OC)))


def matmul_backward(dx, dw, db, dout, x, w):
    ct = None if db is None or db.shape != dout.shape[-1:] else _floats(db, dout)
    layers.matmul_backward(dx, dw, None if ct else db, dout, x, w)
    if ct:
        import cupy
        OC = db.shape[0]
        N = dout.size // OC
        K, rows = _column_chunks(N)
        part = cupy.empty((K, OC), dtype=db.dtype)
        loader.function("residual", f"column_partial_sums<{ct}>")(
            ((OC + 31) // 32, K), (32, 8), (part, dout, _I64(N), _I32(OC), _I64(rows)))
        loader.function("residual", f"column_accumulate<{ct}>")(
            ((OC + 255) // 256,), (256,), (db, part, _I32(K), _I32(OC)))


# --------------------------------------------------------------------------------------
# causal self-attention

def _heads(qkv, n_head):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q5 = qkv.reshape(B, T, 3, n_head, hs)
    return [q5[:, :, i].transpose(0, 2, 1, 3) for i in range(3)]   # (B,NH,T,hs) views


def _flash_variant(ct, hs):
    fits = [m for m in _ATT_HS[ct] if hs <= m]
    return f"{ct}, {fits[0]}" if fits else None


def attention_forward(out, att, qkv, n_head):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    scale = 1.0 / math.sqrt(hs)
    ct = _floats(out, att, qkv)
    if att.ndim == 3:                                   # lse (B,NH,T): memory-efficient
        variant = ct and _flash_variant(ct, hs)
        if (not variant or B * n_head > 65535 or att.shape != (B, n_head, T)
                or out.shape != (B, T, C3 // 3)):
            return reference.attention_lse_forward(out, att, qkv, n_head)
        k = loader.function("attention", f"attention_forward_flash<{variant}>")
        k(((T + _ATT_WARPS - 1) // _ATT_WARPS, B * n_head), (32 * _ATT_WARPS,),
          (out, att, qkv, _I32(T), _I32(n_head), _I32(hs), _scalar(ct, scale)))
        return
    if ct is None or att.shape != (B, n_head, T, T) or out.shape != (B, T, C3 // 3):
        return layers.attention_forward(out, att, qkv, n_head)
    import cupy
    q, k_, v = _heads(qkv, n_head)
    cupy.matmul(q, k_.transpose(0, 1, 3, 2), out=att)  # (B,NH,T,T) raw scores
    loader.function("attention", f"causal_softmax_forward<{ct}>")(
        (B * n_head * T,), (_threads(T),), (att, _I32(T), _scalar(ct, scale)))
    y = cupy.matmul(att, v)                             # (B,NH,T,hs)
    out.reshape(B, T, n_head, hs)[...] = y.transpose(0, 2, 1, 3)


def attention_backward(dqkv, dout, qkv, att, n_head):
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    scale = 1.0 / math.sqrt(hs)
    ct = _floats(dqkv, dout, qkv, att)
    if att.ndim == 3:
        variant = ct and _flash_variant(ct, hs)
        if (not variant or B * n_head > 65535 or att.shape != (B, n_head, T)
                or dout.shape != (B, T, C3 // 3) or dqkv.shape != qkv.shape):
            return reference.attention_lse_backward(dqkv, dout, qkv, att, n_head)
        import cupy
        grid, block = ((T + _ATT_WARPS - 1) // _ATT_WARPS, B * n_head), (32 * _ATT_WARPS,)
        # D_i = dout_i . out_i: re-run the forward for out (the layer API does not pass it)
        o, lse2 = cupy.empty_like(dout), cupy.empty_like(att)
        loader.function("attention", f"attention_forward_flash<{variant}>")(
            grid, block, (o, lse2, qkv, _I32(T), _I32(n_head), _I32(hs), _scalar(ct, scale)))
        D = cupy.ascontiguousarray(
            (dout * o).reshape(B, T, n_head, hs).sum(axis=-1).transpose(0, 2, 1))
        args = (dqkv, dout, qkv, att, D, _I32(T), _I32(n_head), _I32(hs), _scalar(ct, scale))
        loader.function("attention", f"attention_backward_dq_flash<{variant}>")(grid, block, args)
        loader.function("attention", f"attention_backward_dkdv_flash<{variant}>")(grid, block, args)
        return
    if (ct is None or att.shape != (B, n_head, T, T) or dout.shape != (B, T, C3 // 3)
            or dqkv.shape != qkv.shape):
        return layers.attention_backward(dqkv, dout, qkv, att, n_head)
    import cupy
    q, k_, v = _heads(qkv, n_head)
    dq, dk, dv = _heads(dqkv, n_head)
    dy = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)        # (B,NH,T,hs)
    dv[...] = cupy.matmul(att.transpose(0, 1, 3, 2), dy)
    datt = cupy.matmul(dy, v.transpose(0, 1, 3, 2))                  # (B,NH,T,T), fresh
    loader.function("attention", f"causal_softmax_backward<{ct}>")(
        (B * n_head * T,), (_threads(T),), (datt, att, _I32(T), _scalar(ct, scale)))
    dq[...] = cupy.matmul(datt, k_)
    dk[...] = cupy.matmul(datt.transpose(0, 1, 3, 2), q)


# --------------------------------------------------------------------------------------
# GELU, residual

def gelu_forward(out, x):
    ct = _floats(out, x)
    if ct is None or out.shape != x.shape:
        return layers.gelu_forward(out, x)
    loader.function("gelu", f"gelu_forward<{ct}>")((_blocks(x.size),), (256,),
                                                   (out, x, _I64(x.size)))


def gelu_backward(dx, dout, x):
    ct = _floats(dx, dout, x)
    if ct is None or not dx.shape == dout.shape == x.shape:
        return layers.gelu_backward(dx, dout, x)
    loader.function("gelu", f"gelu_backward<{ct}>")((_blocks(x.size),), (256,),
                                                    (dx, dout, x, _I64(x.size)))


def residual_forward(out, a, b):
    ct = _floats(out, a, b)
    if ct is None or not out.shape == a.shape == b.shape:
        return layers.residual_forward(out, a, b)
    loader.function("residual", f"residual_forward<{ct}>")((_blocks(a.size),), (256,),
                                                           (out, a, b, _I64(a.size)))


def residual_backward(da, db, dout):
    ct = _floats(da, db, dout)
    if (ct is None or not da.shape == db.shape == dout.shape
            or dout.data.ptr in (da.data.ptr, db.data.ptr)):   # dout overwritten midway
        return layers.residual_backward(da, db, dout)
    loader.function("residual", f"residual_backward<{ct}>")((_blocks(da.size),), (256,),
                                                            (da, db, dout, _I64(da.size)))


# --------------------------------------------------------------------------------------
# softmax + cross-entropy

def softmax_crossentropy_forward(losses, probs, logits, targets):
    ct, it = _floats(losses, probs, logits), _ids(targets)
    if (ct is None or it is None or not targets.shape == losses.shape == logits.shape[:-1]
            or probs.shape != logits.shape):
        return layers.softmax_crossentropy_forward(losses, probs, logits, targets)
    V = logits.shape[-1]
    N = logits.size // V
    loader.function("softmax_ce", f"softmax_crossentropy_forward<{ct}, {it}>")(
        (N,), (_threads(V, 1024 if V >= 8192 else 256),),
        (losses, probs, logits, targets, _I64(N), _I32(V)))


def softmax_crossentropy_backward(dlogits, dlosses, probs, targets):
    ct, it = _floats(dlogits, dlosses, probs), _ids(targets)
    if (ct is None or it is None or not targets.shape == dlosses.shape == probs.shape[:-1]
            or dlogits.shape != probs.shape):
        return layers.softmax_crossentropy_backward(dlogits, dlosses, probs, targets)
    V = probs.shape[-1]
    N = probs.size // V
    loader.function("softmax_ce", f"softmax_crossentropy_backward<{ct}, {it}>")(
        (N,), (_threads(V),), (dlogits, dlosses, probs, targets, _I64(N), _I32(V)))


# --------------------------------------------------------------------------------------
# AdamW over a flat vector

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
    if ct is None or params.ndim != 1 or not params.shape == grads.shape == m.shape == v.shape:
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
