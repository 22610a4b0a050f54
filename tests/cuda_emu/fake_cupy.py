"""A stand-in for the ``cupy`` module over NumPy, for running the GPU code paths on a CPU.

``fake_cupy()`` is a module to put in ``sys.modules['cupy']``: NumPy's functions, whose
array results are ``ndarray`` below (an ndarray subclass that ``layers.array_module``
takes for CuPy), plus the few pieces of ``cupy.cuda`` the worker uses:

- ``cuda.cublas.gemmEx`` and ``gemmStridedBatchedEx``: cuBLAS's column-major contract, computed with NumPy on the
  raw pointers and leading dimensions it is given (so the row-major / column-major
  mapping of ``worker/kernels/gemm.py`` is checked, not assumed), accumulating in
  float64 and rounding to the output type; it refuses the type combinations and
  leading dimensions cuBLAS refuses;
- ``cuda.Stream``, ``cuda.Event``, ``cuda.alloc_pinned_memory``, ``ndarray.get(out=,
  stream=, blocking=)`` and ``ndarray.set(arr, stream=)``: synchronous here; every
  copy is recorded in ``module.copies`` so tests can see which stream it was put on.

What it cannot tell: anything about timing or stream ordering (every operation here
completes at once), cuBLAS's own rounding and algorithms.
"""
from __future__ import annotations

import ctypes
import types

import numpy

from worker.kernels import halfs


class ndarray(numpy.ndarray):
    """NumPy memory that the project's code takes for a CuPy array."""
    __module__ = "cupy"
    _copies = None                 # the module's copy log, set by fake_cupy()

    @staticmethod
    def _launched(name):
        pass

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    def get(self, stream=None, order="C", out=None, blocking=True):
        if ndarray._copies is not None:
            ndarray._copies.append(("d2h", stream, blocking))
        if out is None:
            return numpy.array(self, copy=True).view(numpy.ndarray)
        if out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError(f"get(out=): {out.dtype} {out.shape} for {self.dtype} {self.shape}")
        out[...] = self
        return out

    def set(self, arr, stream=None):
        if ndarray._copies is not None:
            ndarray._copies.append(("h2d", stream, True))
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): {arr.dtype} {arr.shape} into {self.dtype} {self.shape}")
        self[...] = arr


def _wrap(x):
    if isinstance(x, numpy.ndarray) and not isinstance(x, ndarray):
        return x.view(ndarray)
    if isinstance(x, tuple):
        return tuple(_wrap(y) for y in x)
    return x


# --------------------------------------------------------------------------------------
# cuBLAS gemmEx, column-major, on raw pointers

class CUBLASError(RuntimeError):
    pass


_DATA = {0: numpy.dtype(numpy.float32), 1: numpy.dtype(numpy.float64), 2: halfs.FP16, 14: halfs.BF16}
_COMPUTE_32F, _COMPUTE_64F = 68, 70


def _colmajor(ptr, code, rows, cols, ld):
    """The column-major (rows x cols) matrix at ``ptr`` with leading dimension ``ld``."""
    if ld < max(1, rows):
        raise CUBLASError(f"CUBLAS_STATUS_INVALID_VALUE: leading dimension {ld} < rows {rows}")
    dt = _DATA[code]
    n = ld * (cols - 1) + rows if rows and cols else 0
    flat = numpy.frombuffer((ctypes.c_char * (n * dt.itemsize)).from_address(ptr), dtype=dt)
    return numpy.lib.stride_tricks.as_strided(flat, (rows, cols), (dt.itemsize, ld * dt.itemsize))


def _wide(x):
    x = numpy.ascontiguousarray(x)
    return (halfs.to_float32(x) if halfs.is_half(x.dtype) else x).astype(numpy.float64)


def gemmEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C,
           Ctype, ldc, computeType, algo):
    if Atype != Btype or not (Ctype == Atype or (Atype in (2, 14) and Ctype == 0)):
        raise CUBLASError(f"CUBLAS_STATUS_NOT_SUPPORTED: types A {Atype} B {Btype} C {Ctype}")
    if computeType != (_COMPUTE_64F if Atype == 1 else _COMPUTE_32F):
        raise CUBLASError(f"CUBLAS_STATUS_NOT_SUPPORTED: compute type {computeType} for A {Atype}")
    if transa not in (0, 1) or transb not in (0, 1):
        raise CUBLASError("CUBLAS_STATUS_INVALID_VALUE: transposition")
    scalar = ctypes.c_double if computeType == _COMPUTE_64F else ctypes.c_float
    a_, b_ = scalar.from_address(alpha).value, scalar.from_address(beta).value
    Am = _colmajor(A, Atype, *((m, k) if transa == 0 else (k, m)), lda)
    Bm = _colmajor(B, Btype, *((k, n) if transb == 0 else (n, k)), ldb)
    Cm = _colmajor(C, Ctype, m, n, ldc)
    opA = Am if transa == 0 else Am.T
    opB = Bm if transb == 0 else Bm.T
    with numpy.errstate(invalid="ignore", over="ignore"):     # inf in, inf or NaN out, as cuBLAS
        acc = a_ * (_wide(opA) @ _wide(opB))
        if b_ != 0:                              # beta == 0: C is not read (it may be NaN)
            acc += b_ * _wide(Cm)
    dt = _DATA[Ctype]
    Cm[...] = halfs.from_float32(acc, dt) if halfs.is_half(dt) else acc.astype(dt)


def gemmStridedBatchedEx(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
                         strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType, algo):
    """gemmEx on each of ``batchCount`` matrices, ``stride*`` elements apart."""
    for i in range(batchCount):
        gemmEx(handle, transa, transb, m, n, k, alpha, A + i * strideA * _DATA[Atype].itemsize, Atype, lda,
               B + i * strideB * _DATA[Btype].itemsize, Btype, ldb, beta,
               C + i * strideC * _DATA[Ctype].itemsize, Ctype, ldc, computeType, algo)


def _set_pointer_mode(handle, mode):
    if mode != 0:                                # the stand-in reads alpha and beta from the host
        raise CUBLASError(f"pointer mode {mode}: only CUBLAS_POINTER_MODE_HOST (0) is emulated")


# --------------------------------------------------------------------------------------
# streams, events, pinned memory

class Event:
    def record(self, stream=None):
        return self

    def synchronize(self):
        pass

    @property
    def done(self):
        return True


class Stream:
    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.ptr = 0 if null else id(self)
        self.non_blocking = non_blocking

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def record(self, event=None):
        return event or Event()

    def wait_event(self, event):
        pass


_NULL_STREAM = Stream(null=True)


def fake_cupy():
    """A module object to put in ``sys.modules['cupy']``: NumPy's functions, whose
    array results are ``ndarray`` above (ufuncs keep the subclass by themselves)."""
    mod = types.ModuleType("cupy")
    mod.ndarray = ndarray
    mod.asnumpy = lambda a: numpy.array(a, copy=True).view(numpy.ndarray)
    mod.copies = ndarray._copies = []
    mod.get_default_memory_pool = lambda: types.SimpleNamespace(total_bytes=lambda: 0)
    cublas = types.SimpleNamespace(gemmEx=gemmEx, gemmStridedBatchedEx=gemmStridedBatchedEx,
                                   setStream=lambda handle, ptr: None,
                                   setPointerMode=_set_pointer_mode)
    mod.cuda = types.SimpleNamespace(
        cublas=cublas, Stream=Stream, Event=Event,
        alloc_pinned_memory=lambda nbytes: bytearray(max(1, nbytes)),
        get_current_stream=lambda: _NULL_STREAM,
        device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
        Device=lambda i=0: types.SimpleNamespace(id=i, use=lambda: None, synchronize=lambda: None))

    def __getattr__(name):
        obj = getattr(numpy, name)
        if isinstance(obj, (type, numpy.ufunc)) or not callable(obj):
            return obj

        def wrapped(*args, **kwargs):
            return _wrap(obj(*args, **kwargs))
        return wrapped

    mod.__getattr__ = __getattr__
    return mod
