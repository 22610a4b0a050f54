"""The 16-bit element types of the mixed-precision worker, as arrays on the Python side.

``--precision bf16`` and ``fp16`` keep activations and the compute copy of the weights
in 16 bits; the kernels know them as the ``bf16`` and ``fp16`` types of ``common.cuh``.
Here is how such an array looks to NumPy and CuPy:

- fp16 is ``float16``, a dtype both libraries have;
- bf16 has no dtype in NumPy or CuPy (short of the ml_dtypes package), so a bf16 array
  is a ``uint16`` array holding the bits: the top half of the float32 of the same value.
  Nothing else in the worker uses uint16 arrays, so the launchers read a uint16 array
  as bf16, and never do arithmetic on it in NumPy form: ``to_float32`` first.

Both conversions round to nearest, ties to even, as the kernels do; ``from_float32`` is
the specification the emulator's and the GPU's conversions are checked against (for
fp16 it is NumPy's own float16 cast). Works on NumPy and CuPy arrays alike.

Not here: arithmetic in 16 bits (there is none: the kernels compute in float).
"""
from __future__ import annotations

import numpy

from worker import layers

BF16 = numpy.dtype(numpy.uint16)        # bits of a bfloat16
FP16 = numpy.dtype(numpy.float16)
HALF_DTYPES = (BF16, FP16)
PRECISIONS = ("fp32", "bf16", "fp16")
# the element type each precision computes in (fp32: the model's own dtype, float32 or float64)
COMPUTE_DTYPE = {"bf16": BF16, "fp16": FP16}
# C type names of the kernels (loader.FLOATS + loader.HALVES)
CTYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double",
          BF16: "bf16", FP16: "fp16"}
# what a kernel keeps at full width beside each element type (common.cuh's Acc<T>)
ACC_DTYPE = {"float": numpy.dtype(numpy.float32), "double": numpy.dtype(numpy.float64),
             "bf16": numpy.dtype(numpy.float32), "fp16": numpy.dtype(numpy.float32)}


def is_half(dtype) -> bool:
    return numpy.dtype(dtype) in HALF_DTYPES


def to_float32(x):
    """A float32 copy of ``x`` (bf16 bits, float16, or any float array)."""
    xp = layers.array_module(x)
    if x.dtype == BF16:
        return (x.astype(xp.uint32) << 16).view(xp.float32)
    return x.astype(xp.float32)


def from_float32(x, dtype):
    """``x`` (float32, or float64 first rounded to float32) in the 16-bit ``dtype``,
    rounded to nearest even; NaN stays NaN, overflow becomes inf."""
    xp = layers.array_module(x)
    dtype = numpy.dtype(dtype)
    x32 = xp.ascontiguousarray(x, dtype=xp.float32)
    if dtype == FP16:
        return x32.astype(xp.float16)
    if dtype != BF16:
        raise TypeError(f"not a 16-bit dtype: {dtype}")
    bits = x32.view(xp.uint32)
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    # round to nearest even on the 16 dropped bits (a carry may reach the exponent: inf)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return xp.where(nan, (bits >> 16) | 0x40, rounded).astype(xp.uint16)


def round_trip(x, dtype):
    """``x`` as the float32 values it has once stored in ``dtype`` (the identity for
    float32 and float64 dtypes): what a 16-bit copy of a float array holds."""
    if not is_half(dtype):
        return x
    return to_float32(from_float32(x, dtype))
