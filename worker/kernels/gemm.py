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

``gemm`` returns False, computing nothing, for what it does not take (NumPy arrays,
strided views, mixed dtypes other than the above); the caller then runs the
reference. Not here: batched products (the memory-efficient attention needs none).
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
    """(transposed?, leading dimension) of 2-D ``x`` read column-major: a C-contiguous
    (r, c) array is the column-major (c x r) matrix x^T with ld c; an F-contiguous one
    is x itself with ld r. None if neither."""
    r, c = x.shape
    if x.flags.c_contiguous:
        return False, max(1, c)
    if x.flags.f_contiguous:
        return True, max(1, r)
    return None


def _types_ok(c, a, b):
    if a.dtype != b.dtype or a.dtype not in _DATA_TYPE or c.dtype not in _DATA_TYPE:
        return False
    if c.dtype == a.dtype:
        return True
    return halfs.is_half(a.dtype) and c.dtype == numpy.float32


def gemm(c, a, b, accumulate=False) -> bool:
    """``c = a @ b`` (``c += a @ b`` with ``accumulate``) for 2-D CuPy arrays ``a`` (M, K),
    ``b`` (K, N), ``c`` (M, N). True if done; False if these arrays are not for cuBLAS."""
    if not (_is_cupy(a) and _is_cupy(b) and _is_cupy(c)) or not (a.ndim == b.ndim == c.ndim == 2):
        return False
    M, K = a.shape
    if b.shape[0] != K or c.shape != (M, b.shape[1]):
        raise ValueError(f"gemm shapes: {a.shape} @ {b.shape} -> {c.shape}")
    if not _types_ok(c, a, b):
        return False
    if c.size == 0:
        return True
    if not c.flags.c_contiguous:
        return c.flags.f_contiguous and gemm(c.T, b.T, a.T, accumulate)
    la, lb = _layout(a), _layout(b)
    if la is None or lb is None:
        return False
    if K == 0:                                       # an empty sum
        if not accumulate:
            c[...] = 0
        return True
    import cupy
    cublas = cupy.cuda.cublas                      # loads cuBLAS on first use
    N = c.shape[1]
    scalar = numpy.float64 if c.dtype == numpy.float64 else numpy.float32
    alpha, beta = numpy.array(1.0, scalar), numpy.array(1.0 if accumulate else 0.0, scalar)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    # column-major: c^T (N x M) = op(b-memory) (N x K) . op(a-memory) (K x M)
    (tb, ldb), (ta, lda) = lb, la
    cublas.gemmEx(handle, _OP_T if tb else _OP_N, _OP_T if ta else _OP_N, N, M, K,
                  alpha.ctypes.data, b.data.ptr, _DATA_TYPE[b.dtype], ldb,
                  a.data.ptr, _DATA_TYPE[a.dtype], lda,
                  beta.ctypes.data, c.data.ptr, _DATA_TYPE[c.dtype], N,
                  _COMPUTE_64F if scalar is numpy.float64 else _COMPUTE_32F, -1)  # -1: default algo
    return True
