"""Matrix products on the GPU: cuBLAS ``gemmEx`` through CuPy, for row-major arrays.

The worker's arrays are row-major (C order); cuBLAS is column-major. A row-major
(M, N) array is, read column-major, its transpose, so ``C = A @ B`` is computed as the
column-major product ``C^T = B^T A^T``: cuBLAS gets B's memory first and A's second,
each with the transposition flag and leading dimension its layout implies. An operand
may be a transposed view (F-contiguous, e.g. the tied ``wte.T``); an F-contiguous
output ``C`` is handled as ``C^T = B^T @ A^T``.

One call covers every precision the worker uses, always accumulating in float32 (or
float64 for float64 arrays):

| A, B            | C                  | compute            |
|-----------------|--------------------|--------------------|
| float32         | float32            | CUBLAS_COMPUTE_32F |
| float64         | float64            | CUBLAS_COMPUTE_64F |
| bf16 or fp16    | the same, or float32 (a parameter gradient accumulated at full width) | CUBLAS_COMPUTE_32F (tensor cores) |

Batches of matrices (3-D arrays with one stride between matrices) go to
``gemmStridedBatchedEx`` in one call: the attention that keeps ``att`` uses them.
``gemm`` returns False, computing nothing, for what it does not take (NumPy arrays,
other strided views, mixed dtypes other than the above); the caller then runs the
reference.
"""
from __future__ import annotations

import numpy

from worker.kernels import halfs

# cudaDataType values (library_types.h); CuPy exposes the same in cupy.cuda.runtime
_DATA_TYPE = {numpy.dtype(numpy.float32): 0, numpy.dtype(numpy.float64): 1,
              halfs.FP16: 2, halfs.BF16: 14}
_COMPUTE_32F, _COMPUTE_64F = 68, 70     # cublasComputeType_t
_OP_N, _OP_T = 0, 1


def _is_cupy(x):
    return type(x).__module__.split(".")[0] == "cupy"


def _layout(x):
    """(transposed?, leading dimension, batch stride) of the matrices of ``x`` (2-D, or 3-D:
    a batch of them), read column-major: a row-major (r, c) matrix is the column-major
    (c x r) matrix x^T with ld c; a transposed view (column-major already) is x itself
    with ld r. None for any other layout. Strides in elements."""
    item = x.dtype.itemsize
    r, c = x.shape[-2:]
    s_r, s_c = x.strides[-2] // item, x.strides[-1] // item
    batch = x.strides[0] // item if x.ndim == 3 else 0
    if (s_c == 1 or c == 1) and (s_r == c or r == 1):
        return False, max(1, c), batch
    if (s_r == 1 or r == 1) and (s_c == r or c == 1):
        return True, max(1, r), batch
    return None


def types_ok(c, a, b):
    """Whether cuBLAS can multiply these: a and b of one supported data type, c of a supported one."""
    if a.dtype != b.dtype or a.dtype not in _DATA_TYPE or c.dtype not in _DATA_TYPE:
        return False
    if c.dtype == a.dtype:
        return True
    return halfs.is_half(a.dtype) and c.dtype == numpy.float32


def gemm(c, a, b, accumulate=False) -> bool:
    """``c = a @ b`` (``c += a @ b`` with ``accumulate``) for CuPy arrays ``a`` (M, K),
    ``b`` (K, N), ``c`` (M, N), or batches of them (3-D, one batch size: one strided
    batched call). True if done; False if these arrays are not for cuBLAS."""
    if not (_is_cupy(a) and _is_cupy(b) and _is_cupy(c)) or not (a.ndim == b.ndim == c.ndim) \
            or c.ndim not in (2, 3):
        return False
    M, K = a.shape[-2:]
    if (b.shape[-2] != K or c.shape[-2:] != (M, b.shape[-1])
            or len({a.shape[:-2], b.shape[:-2], c.shape[:-2]}) != 1):
        raise ValueError(f"gemm shapes: {a.shape} @ {b.shape} -> {c.shape}")
    if not types_ok(c, a, b):
        return False
    if c.size == 0:
        return True
    lc = _layout(c)
    if lc is None:
        return False
    if lc[0]:                                        # c is a transposed view: c^T = b^T a^T
        t = (lambda x: x.swapaxes(-1, -2))  # noqa: E731
        return gemm(t(c), t(b), t(a), accumulate)
    la, lb = _layout(a), _layout(b)
    if la is None or lb is None:
        return False
    if K == 0:                                       # an empty sum
        if not accumulate:
            c[...] = 0
        return True
    import cupy
    cublas = cupy.cuda.cublas                      # loads cuBLAS on first use
    N = c.shape[-1]
    scalar = numpy.float64 if c.dtype == numpy.float64 else numpy.float32
    alpha, beta = numpy.array(1.0, scalar), numpy.array(1.0 if accumulate else 0.0, scalar)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(handle, 0)               # CUBLAS_POINTER_MODE_HOST: alpha, beta above
    compute = _COMPUTE_64F if scalar is numpy.float64 else _COMPUTE_32F
    (tb, ldb, sb), (ta, lda, sa) = lb, la
    op_b, op_a = _OP_T if tb else _OP_N, _OP_T if ta else _OP_N
    # column-major: c^T (N x M) = op(b-memory) (N x K) . op(a-memory) (K x M)
    if c.ndim == 2:
        cublas.gemmEx(handle, op_b, op_a, N, M, K, alpha.ctypes.data,
                      b.data.ptr, _DATA_TYPE[b.dtype], ldb, a.data.ptr, _DATA_TYPE[a.dtype], lda,
                      beta.ctypes.data, c.data.ptr, _DATA_TYPE[c.dtype], N, compute, -1)  # -1: default algo
    else:
        cublas.gemmStridedBatchedEx(handle, op_b, op_a, N, M, K, alpha.ctypes.data,
                                    b.data.ptr, _DATA_TYPE[b.dtype], ldb, sb,
                                    a.data.ptr, _DATA_TYPE[a.dtype], lda, sa,
                                    beta.ctypes.data, c.data.ptr, _DATA_TYPE[c.dtype], N, lc[2],
                                    c.shape[0], compute, -1)
    return True
