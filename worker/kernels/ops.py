"""Launchers of the CUDA kernels, with the signatures of ``worker/layers.py``.

Every function here has the name, arguments and contract of the layer it replaces
(outputs first, then inputs, then weights; parameter gradients ``+=``; activation
gradients assigned, except the residual stream's, which add), so the model can take
``worker.kernels`` instead of ``worker.layers`` as its ops module. Each checks what it
was given: CuPy arrays, C-contiguous, one element type the kernels are compiled for,
integer ids of int32/int64, shapes the kernel handles. Anything else, NumPy arrays
included, goes to the reference layer in ``worker.layers``, which runs on CuPy too,
through its array module: slower, never wrong.

Element types (``halfs.py``): float32 and float64 throughout; for mixed precision also
bf16 (uint16 bits) and fp16 activations, with what must stay at full width in their
accumulation type (float32): LayerNorm's mean and rstd, attention's lse, the losses,
and the parameter gradients (float32 master gradients). A 16-bit call the kernels do
not take goes to the reference on float32 copies, written back rounded (``_reference``).

Matmuls are cuBLAS (``gemm.py``); the kernels do the rest. Attention is in
``attention_ops.py``, AdamW in ``optim_ops.py``.

Scalars are passed to kernels as NumPy scalars of the exact C type of the kernel's
parameter (CuPy would pass a Python float as a double and an int as a 64-bit int).
Nothing here imports CuPy at import time: cupy is taken from the arrays.
"""
from __future__ import annotations

import numpy

from worker import layers
from worker.kernels import gemm, halfs, loader

array_module = layers.array_module
_ITYPE = {numpy.dtype(numpy.int32): "int", numpy.dtype(numpy.int64): "long long"}
_I32, _I64 = numpy.int32, numpy.int64


def _is_cupy(x):
    return x is not None and type(x).__module__.split(".")[0] == "cupy"


def _kind(acts, accs=()):
    """The C type of the kernels for these arrays, or None (the caller falls back):
    ``acts`` non-empty, C-contiguous CuPy arrays of one compiled element type, and
    ``accs`` the same but of that type's accumulation dtype (float32 for 16 bits)."""
    if not all(_is_cupy(a) for a in (*acts, *accs)):
        return None
    ct = halfs.CTYPES.get(acts[0].dtype)
    if ct is None:
        return None
    acc = halfs.ACC_DTYPE[ct]
    for arrays, dtype in ((acts, acts[0].dtype), (accs, acc)):
        if any(a.dtype != dtype or not a.flags.c_contiguous or a.size == 0 for a in arrays):
            return None
    return ct


def _floats(*arrays):
    """``_kind`` for arrays that all share one element type."""
    return _kind(arrays)


def _acc_ctype(ct):
    return "double" if ct == "double" else "float"


def _ids(x):
    """The C type name of integer ids ``x`` (int32/int64, contiguous CuPy), else None."""
    if not _is_cupy(x) or not x.flags.c_contiguous or x.dtype not in _ITYPE:
        return None
    return _ITYPE[x.dtype]


def _scalar(ct, value):
    """``value`` as the kernel's ``Acc<T>`` scalar: double for double, else float."""
    return numpy.float64(value) if ct == "double" else numpy.float32(value)


def _threads(width, cap=256):
    """Threads of a block that strides over ``width`` elements: a multiple of 32."""
    return min(cap, 32 * ((width + 31) // 32))


def _blocks(n, threads=256, cap=65536):
    """Blocks of a grid-stride loop over ``n`` elements."""
    return max(1, min(cap, (n + threads - 1) // threads))


def _reference(fn, *args):
    """``fn(*args)``, the reference layer. 16-bit arrays, on which NumPy-form arithmetic
    is wrong (bf16 bits) or too coarse (fp16 sums), are replaced by float32 copies and
    every one of them is written back rounded afterwards (inputs come back unchanged:
    a 16-bit value survives the round trip exactly)."""
    if not any(getattr(a, "dtype", None) in halfs.HALF_DTYPES for a in args):
        return fn(*args)
    wide = [halfs.to_float32(a) if getattr(a, "dtype", None) in halfs.HALF_DTYPES else a
            for a in args]
    result = fn(*wide)
    for a, w in zip(args, wide):
        if w is not a:
            a[...] = halfs.from_float32(w, a.dtype)
    return result


# --------------------------------------------------------------------------------------
# token + position embedding

def embedding_forward(out, idx, wte, wpe):
    ct, it = _floats(out, wte, wpe), _ids(idx)
    if (ct is None or it is None or idx.ndim != 2 or wpe.shape[0] < idx.shape[1]
            or out.shape != idx.shape + wte.shape[1:] or wpe.shape[1:] != wte.shape[1:]):
        return _reference(layers.embedding_forward, out, idx, wte, wpe)
    (B, T), C = idx.shape, out.shape[-1]
    k = loader.function("embedding", f"embedding_forward<{ct}, {it}>")
    k((B * T,), (_threads(C),), (out, idx, wte, wpe, _I64(B * T), _I32(T), _I32(C)))


def embedding_backward(dwte, dwpe, dout, idx):
    ct, it = _kind((dout,), (dwte, dwpe)), _ids(idx)
    if (ct is None or it is None or idx.ndim != 2 or dwpe.shape[0] < idx.shape[1]
            or dout.shape != idx.shape + dwte.shape[1:] or dwpe.shape[1:] != dwte.shape[1:]):
        return _reference(layers.embedding_backward, dwte, dwpe, dout, idx)
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
    ct = _kind((out, x, w, b), (mean, rstd))
    if ct is None or not _ln_shapes_ok(x, (mean, rstd), (w, b), (out,)):
        return _reference(layers.layernorm_forward, out, mean, rstd, x, w, b)
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
    ct = _kind((dx, dout, x, w), (mean, rstd, dw, db))
    if ct is None or not _ln_shapes_ok(x, (mean, rstd), (dw, db, w), (dx, dout)):
        return _reference(layers.layernorm_backward, dx, dw, db, dout, x, mean, rstd, w)
    import cupy
    C = x.shape[-1]
    N = x.size // C
    k = loader.function("layernorm", f"layernorm_backward_dx<{ct}>")
    k(((N + 7) // 8,), (256,), (dx, dout, x, mean, rstd, w, _I64(N), _I32(C)))
    K, rows = _column_chunks(N)
    part_w = cupy.empty((K, C), dtype=dw.dtype)       # partial sums in Acc<T>
    part_b = cupy.empty((K, C), dtype=dw.dtype)
    k = loader.function("layernorm", f"layernorm_backward_dwdb_partial<{ct}>")
    k(((C + 31) // 32, K), (32, 8), (part_w, part_b, dout, x, mean, rstd, _I64(N), _I32(C),
                                     _I64(rows)))
    k = loader.function("layernorm", f"column_accumulate<{_acc_ctype(ct)}>")
    k(((C + 255) // 256,), (256,), (dw, part_w, _I32(K), _I32(C)))
    k(((C + 255) // 256,), (256,), (db, part_b, _I32(K), _I32(C)))


# --------------------------------------------------------------------------------------
# linear layer: cuBLAS for the product, kernels for the bias

def _rows(x, width):
    """``x`` as a 2-D (rows, width) array without a copy, or None."""
    if x.ndim == 2:
        return x
    return x.reshape(-1, width) if x.flags.c_contiguous else None


def matmul_forward(out, x, w, b=None):
    C, OC = w.shape
    x2, out2 = _rows(x, C), _rows(out, OC)
    bias_ct = None if b is None or b.shape != (OC,) else _floats(out, b)
    if x2 is None or out2 is None or (b is not None and not bias_ct) or not gemm.gemm(out2, x2, w):
        return _reference(layers.matmul_forward, out, x, w, b)
    if b is not None:
        N = out.size // OC
        loader.function("residual", f"bias_forward<{bias_ct}>")((N,), (_threads(OC),),
                                                                (out, b, _I64(N), _I32(OC)))


def matmul_backward(dx, dw, db, dout, x, w):
    C, OC = w.shape
    x2, dout2 = _rows(x, C), _rows(dout, OC)
    dx2 = None if dx is None else _rows(dx, C)
    ct = _kind((dout,), () if db is None else (db,))
    usable = (ct is not None and x2 is not None and dout2 is not None
              and (dx is None or dx2 is not None) and (db is None or db.shape == (OC,))
              and gemm.types_ok(dw, x2, dout2) and (dx is None or gemm.types_ok(dx2, dout2, w)))
    if not usable:
        return _reference(layers.matmul_backward, dx, dw, db, dout, x, w)
    if dx is not None and not gemm.gemm(dx2, dout2, w.T):              # dx = dout @ w^T
        return _reference(layers.matmul_backward, dx, dw, db, dout, x, w)
    if not gemm.gemm(dw, x2.T, dout2, accumulate=True):                # dw += x^T @ dout
        return _reference(layers.matmul_backward, None, dw, db, dout, x, w)
    if db is not None:
        import cupy
        N = dout.size // OC
        K, rows = _column_chunks(N)
        part = cupy.empty((K, OC), dtype=db.dtype)
        loader.function("residual", f"column_partial_sums<{ct}>")(
            ((OC + 31) // 32, K), (32, 8), (part, dout, _I64(N), _I32(OC), _I64(rows)))
        loader.function("residual", f"column_accumulate<{_acc_ctype(ct)}>")(
            ((OC + 255) // 256,), (256,), (db, part, _I32(K), _I32(OC)))


# --------------------------------------------------------------------------------------
# GELU, residual

def gelu_forward(out, x):
    ct = _floats(out, x)
    if ct is None or out.shape != x.shape:
        return _reference(layers.gelu_forward, out, x)
    loader.function("gelu", f"gelu_forward<{ct}>")((_blocks(x.size),), (256,),
                                                   (out, x, _I64(x.size)))


def gelu_backward(dx, dout, x):
    ct = _floats(dx, dout, x)
    if ct is None or not dx.shape == dout.shape == x.shape:
        return _reference(layers.gelu_backward, dx, dout, x)
    loader.function("gelu", f"gelu_backward<{ct}>")((_blocks(x.size),), (256,),
                                                    (dx, dout, x, _I64(x.size)))


def residual_forward(out, a, b):
    ct = _floats(out, a, b)
    if ct is None or not out.shape == a.shape == b.shape:
        return _reference(layers.residual_forward, out, a, b)
    loader.function("residual", f"residual_forward<{ct}>")((_blocks(a.size),), (256,),
                                                           (out, a, b, _I64(a.size)))


def residual_backward(da, db, dout):
    ct = _floats(da, db, dout)
    if (ct is None or not da.shape == db.shape == dout.shape
            or dout.data.ptr in (da.data.ptr, db.data.ptr)):   # dout overwritten midway
        return _reference(layers.residual_backward, da, db, dout)
    loader.function("residual", f"residual_backward<{ct}>")((_blocks(da.size),), (256,),
                                                            (da, db, dout, _I64(da.size)))


# --------------------------------------------------------------------------------------
# softmax + cross-entropy

def softmax_crossentropy_forward(losses, probs, logits, targets):
    ct, it = _kind((probs, logits), (losses,)), _ids(targets)
    if (ct is None or it is None or not targets.shape == losses.shape == logits.shape[:-1]
            or probs.shape != logits.shape):
        return _reference(layers.softmax_crossentropy_forward, losses, probs, logits, targets)
    V = logits.shape[-1]
    N = logits.size // V
    loader.function("softmax_ce", f"softmax_crossentropy_forward<{ct}, {it}>")(
        (N,), (_threads(V, 1024 if V >= 8192 else 256),),
        (losses, probs, logits, targets, _I64(N), _I32(V)))


def softmax_crossentropy_backward(dlogits, dlosses, probs, targets):
    ct, it = _kind((dlogits, probs), (dlosses,)), _ids(targets)
    if (ct is None or it is None or not targets.shape == dlosses.shape == probs.shape[:-1]
            or dlogits.shape != probs.shape):
        return _reference(layers.softmax_crossentropy_backward, dlogits, dlosses, probs, targets)
    V = probs.shape[-1]
    N = probs.size // V
    loader.function("softmax_ce", f"softmax_crossentropy_backward<{ct}, {it}>")(
        (N,), (_threads(V),), (dlogits, dlosses, probs, targets, _I64(N), _I32(V)))


# --------------------------------------------------------------------------------------
# element type conversion (the 16-bit compute copy of the float32 parameters)

def convert(out, x):
    """``out`` = ``x`` converted to ``out``'s dtype, rounded to nearest even: float32 to
    bf16 / fp16 or back. Any other pair, or NumPy arrays: the ``halfs`` functions."""
    src, dst = halfs.CTYPES.get(x.dtype), halfs.CTYPES.get(out.dtype)
    name = f"convert<{src}, {dst}>"
    if (name not in loader.FAMILIES["convert"] or out.shape != x.shape
            or not all(_is_cupy(a) and a.flags.c_contiguous for a in (out, x)) or not x.size):
        out[...] = (halfs.from_float32(x, out.dtype) if halfs.is_half(out.dtype)
                    else halfs.to_float32(x).astype(out.dtype, copy=False))
        return
    loader.function("convert", name)((_blocks(x.size),), (256,), (out, x, _I64(x.size)))
