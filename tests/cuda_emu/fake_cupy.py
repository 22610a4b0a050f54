"""A stand-in for the ``cupy`` module over NumPy, for running the GPU code paths on a CPU.

``fake_cupy()`` is a module to put in ``sys.modules['cupy']``. It has exactly the
names listed here (``FUNCTIONS``, ``UFUNCS``, ``TYPES``, ``CONSTANTS`` taken from NumPy,
plus the pieces of ``cupy.cuda`` the worker uses); any other name raises
``AttributeError``, as it would if real CuPy lacked it. tests/test_fake_cupy.py holds every name the product uses and
every name this stand-in has to the installed CuPy package (existence and signature).
Arrays are ``ndarray`` below, an ndarray subclass that ``layers.array_module`` takes for
CuPy. Device and host memory are kept apart as CuPy keeps them: ``asarray`` and
``array`` of a NumPy array copy it; any other function, ufunc or operator given a NumPy
array (host memory) raises ``TypeError``, as CuPy does.

- ``cuda.cublas.gemmEx`` and ``gemmStridedBatchedEx``: cuBLAS's column-major contract,
  computed with NumPy on the raw pointers and leading dimensions it is given (so the
  row-major / column-major mapping of ``worker/kernels/gemm.py`` is checked, not
  assumed), accumulating in float64 and rounding to the output type; it refuses the
  type combinations and leading dimensions cuBLAS refuses;
- streams (``streams.py``): the current (null) stream runs everything at once, as the
  emulated kernels do; a non-blocking ``cuda.Stream`` DEFERS its asynchronous copies
  (``ndarray.get(stream=, out=, blocking=False)``, ``ndarray.set(arr, stream=)``) until
  the stream, or an event recorded on it, is synchronised, or another stream waits on
  such an event, or a later operation on the stream runs. So a missing
  synchronisation shows as stale numbers; and a device-to-host copy enqueued on a
  stream that never waited for the kernels launched before it is refused
  (``StreamOrderError``). Every copy is logged in ``module.copies``.

What it cannot tell: anything about timing or real concurrency; cuBLAS's own rounding
and algorithms; a ``__setitem__`` of host data (allowed here).
"""
from __future__ import annotations

import ctypes
import types

import numpy

from tests.cuda_emu import streams
from tests.cuda_emu.streams import StreamOrderError  # noqa: F401
from worker.kernels import halfs

# NumPy names the stand-in provides (what the product and the tests use); nothing else
FUNCTIONS = ("arange", "argsort", "ascontiguousarray", "empty", "empty_like", "ones",
             "take", "take_along_axis", "triu", "where", "zeros", "zeros_like")
UFUNCS = ("add", "exp", "isfinite", "log", "matmul", "multiply", "sqrt", "subtract", "tanh")
TYPES = ("float16", "float32", "float64", "int32", "int64", "uint16", "uint32")
CONSTANTS = ("inf",)


def _host_arrays(args):
    for a in args:
        if isinstance(a, (tuple, list)):
            yield from _host_arrays(a)
        elif isinstance(a, numpy.ndarray) and not isinstance(a, ndarray) and a.ndim > 0:
            yield a


def _device_only(name, args):
    if any(True for _ in _host_arrays(args)):
        raise TypeError(f"cupy.{name}: a NumPy array (host memory) among the arguments; CuPy "
                        "takes device arrays only: cupy.asarray(x) copies one to the device")


def _plain(x):
    return x.view(numpy.ndarray) if isinstance(x, ndarray) else x


class ndarray(numpy.ndarray):
    """NumPy memory that the project's code takes for a CuPy array."""
    __module__ = "cupy"

    @staticmethod
    def _launched(name):
        """A kernel ran on the current stream (called by the emulator's launcher)."""
        streams.STATE.launched(name)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _device_only(ufunc.__name__, inputs)
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*(_plain(x) for x in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    def get(self, stream=None, order="C", out=None, blocking=True):
        if out is None:
            out = numpy.empty(self.shape, self.dtype)
        elif out.shape != self.shape or out.dtype != self.dtype:
            raise ValueError(f"get(out=): {out.dtype} {out.shape} for {self.dtype} {self.shape}")
        src = self.view(numpy.ndarray)
        streams.STATE.copy("d2h", stream, blocking, lambda: numpy.copyto(out, src))
        return out

    def set(self, arr, stream=None):
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): {arr.dtype} {arr.shape} into {self.dtype} {self.shape}")
        dst = self.view(numpy.ndarray)
        streams.STATE.copy("h2d", stream, False, lambda: numpy.copyto(dst, arr))


def _wrap(x):
    if isinstance(x, numpy.ndarray) and not isinstance(x, ndarray):
        return x.view(ndarray)
    if isinstance(x, tuple):
        return tuple(_wrap(y) for y in x)
    return x


class _Ufunc:
    """A NumPy ufunc that takes device arrays only, as CuPy's."""

    def __init__(self, ufunc):
        self._ufunc, self.__name__ = ufunc, ufunc.__name__
        self.nin, self.nout = ufunc.nin, ufunc.nout

    def __call__(self, *args, **kwargs):
        _device_only(self.__name__, args)
        return _wrap(self._ufunc(*args, **kwargs))

    def at(self, a, indices, b=None):
        _device_only(f"{self.__name__}.at", (a, indices, b))
        self._ufunc.at(_plain(a), _plain(indices), _plain(b))


def _function(name):
    fn = getattr(numpy, name)

    def wrapped(*args, **kwargs):
        _device_only(name, args)
        return _wrap(fn(*args, **kwargs))
    wrapped.__name__ = name
    return wrapped


def asarray(a, dtype=None, order=None, *, blocking=False):
    """A device array: ``a`` itself if it is one (of that dtype), else a copy."""
    if isinstance(a, ndarray) and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a
    return array(a, dtype=dtype)


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    """A new device array holding a copy of ``obj``."""
    return numpy.array(_plain(obj), dtype=dtype, copy=True, order=order, ndmin=ndmin).view(ndarray)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    return numpy.array(_plain(a), copy=True)


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
    streams.STATE.launched("cublasGemmEx")


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
# the device and the runtime: one emulated device

class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def use(self):
        if self.id != 0:
            raise RuntimeError(f"the emulator has one device, 0; not {self.id}")

    def synchronize(self):
        streams.STATE.synchronize_device()


class MemoryPool:
    def total_bytes(self):
        return 0

    def used_bytes(self):
        return 0


PROPERTIES = {"name": b"CUDA emulator (tests/cuda_emu)", "major": 9, "minor": 0,
              "totalGlobalMem": 16 << 30, "multiProcessorCount": 1}


def _runtime():
    def getDeviceCount():
        return 1

    def getDeviceProperties(device):
        return dict(PROPERTIES)

    def getDevice():
        return 0

    def setDevice(device):
        Device(device).use()

    def memGetInfo():
        return PROPERTIES["totalGlobalMem"], PROPERTIES["totalGlobalMem"]
    return types.SimpleNamespace(getDeviceCount=getDeviceCount, getDeviceProperties=getDeviceProperties,
                                 getDevice=getDevice, setDevice=setDevice, memGetInfo=memGetInfo)


def _cuda(state):
    cublas = types.SimpleNamespace(gemmEx=gemmEx, gemmStridedBatchedEx=gemmStridedBatchedEx,
                                   setStream=lambda handle, ptr: None,
                                   setPointerMode=_set_pointer_mode)
    return types.SimpleNamespace(
        cublas=cublas, Stream=streams.Stream, Event=streams.Event,
        alloc_pinned_memory=lambda size: bytearray(max(1, size)),
        get_current_stream=lambda device_id=-1: streams.STATE.current,
        device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
        Device=Device, MemoryPool=MemoryPool, runtime=_runtime())


def fake_cupy():
    """A module object to put in ``sys.modules['cupy']`` (see the module's docstring);
    it starts a fresh stream state (the copy log, pending copies, launch counts)."""
    state = streams.STATE = streams.DeviceState()
    mod = types.ModuleType("cupy")
    mod.__version__ = "emulated"
    mod.ndarray = ndarray
    mod.asarray, mod.array, mod.asnumpy = asarray, array, asnumpy
    mod.copies = state.copies
    mod.get_default_memory_pool = MemoryPool
    for name in FUNCTIONS:
        setattr(mod, name, _function(name))
    for name in UFUNCS:
        setattr(mod, name, _Ufunc(getattr(numpy, name)))
    for name in TYPES + CONSTANTS:
        setattr(mod, name, getattr(numpy, name))
    mod.cuda = _cuda(state)

    def __getattr__(name):
        raise AttributeError(f"the CuPy stand-in has no {name!r}: real CuPy may lack it too. "
                             "If CuPy has it, add it to tests/cuda_emu/fake_cupy.py "
                             "(tests/test_fake_cupy.py checks it against the real package)")
    mod.__getattr__ = __getattr__
    return mod
