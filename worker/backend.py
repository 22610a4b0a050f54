"""Which array library the worker computes with: NumPy on the CPU, CuPy on a CUDA GPU.

Chosen once per process (thinc's habit), from ``--device cpu|cuda|cuda:N``: ``cpu``
(the default) is NumPy and ``worker.layers``; ``cuda`` is CuPy and ``worker.kernels``
on the current CUDA device (``cuda:N``: device N, made current), and only when it can
really run there: asking for ``cuda`` on a machine without CuPy, without a CUDA
device, or with a driver too old for the CuPy build, raises ``BackendError`` naming
which of the three is missing, never a silent fall back to the CPU.

Every question to the GPU goes through ``cupy.cuda.runtime`` (the CUDA runtime API:
device count, current device, properties, free memory), so a test can stand in for the
runtime's answers under the real CuPy package (tests/test_backend_cuda.py).

Not here: the model's buffers on the device (``worker/model.py`` with
``worker/devicemodel.py``), the pinned host buffers for push and pull
(``worker/staging.py``), several GPUs per process.
"""
from __future__ import annotations

import numpy

DEVICES = ("cpu", "cuda")        # and cuda:N, device N


class BackendError(RuntimeError):
    """The device asked for cannot be used here; the message says what to install or fix."""


_chosen: tuple | None = None    # (device, array module)


def _cuda_module():
    try:
        import cupy
    except ImportError as e:
        raise BackendError(
            f"--device cuda needs CuPy, which is not installed ({e}). Install the gpu "
            "extra: pip install -e '.[gpu]' (CuPy for CUDA 13 with its NVRTC and cuBLAS), "
            "or run with --device cpu.") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:     # CUDARuntimeError: no driver, or one too old for this CuPy
        raise BackendError(
            f"--device cuda: CuPy {cupy.__version__} is installed but the CUDA driver "
            f"cannot be used ({type(e).__name__}: {e}). Is there an NVIDIA GPU with a "
            "driver recent enough for CUDA 13 (check nvidia-smi)? Or run with --device cpu."
        ) from None
    if n < 1:
        raise BackendError("--device cuda: the CUDA driver reports no device. "
                           "Check nvidia-smi and CUDA_VISIBLE_DEVICES, or run with --device cpu.")
    return cupy


def parse(device: str) -> tuple[str, int | None]:
    """``"cpu"`` -> ("cpu", None), ``"cuda"`` -> ("cuda", None), ``"cuda:1"`` -> ("cuda", 1);
    ``ValueError`` for anything else."""
    kind, sep, index = str(device).partition(":")
    if kind in DEVICES and not sep:
        return kind, None
    if kind == "cuda" and index.isdigit():
        return kind, int(index)
    raise ValueError(f"device must be cpu, cuda or cuda:N (N a device number); got {device!r}")


def check_device(device: str, precision: str = "fp32"):
    """The flags' check, without touching CUDA: ``device`` parses, ``precision`` is one of
    fp32, bf16, fp16, and a 16-bit precision comes with a GPU. ``ValueError`` else."""
    from worker.kernels.halfs import PRECISIONS
    kind, _ = parse(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and kind == "cpu":
        raise ValueError(f"--precision {precision} needs --device cuda; on the CPU the model "
                         "computes in float32")


def probe(device: str):
    """The array module for ``device`` (``numpy`` or ``cupy``), without choosing it;
    raises ``BackendError`` if it cannot be used here, ``ValueError`` if unknown."""
    kind, index = parse(device)
    if kind == "cpu":
        return numpy
    cupy = _cuda_module()
    n = cupy.cuda.runtime.getDeviceCount()
    if index is not None and index >= n:
        raise BackendError(f"--device {device}: this machine has {n} CUDA device(s), numbered "
                           f"from 0. Check nvidia-smi and CUDA_VISIBLE_DEVICES.")
    return cupy


def select(device: str = "cpu"):
    """Choose the device of this process and return its array module. Choosing again
    the same device is a no-op; choosing another one is an error (arrays of the first
    choice would be mixed with the second's)."""
    global _chosen
    if _chosen is not None:
        if _chosen[0] != device:
            raise BackendError(f"this process already computes on {_chosen[0]!r}; "
                               f"cannot switch to {device!r}")
        return _chosen[1]
    xp = probe(device)
    index = parse(device)[1]
    if index is not None:
        xp.cuda.runtime.setDevice(index)          # what cupy.cuda.Device(index).use() does
    _chosen = (device, xp)
    return xp


def current():
    """(device, array module) chosen so far; ("cpu", numpy) until ``select`` is called."""
    return _chosen if _chosen is not None else ("cpu", numpy)


def ops_module(device: str):
    """The layer functions for ``device``: ``worker.layers`` or ``worker.kernels``."""
    if probe(device) is numpy:
        from worker import layers
        return layers
    from worker import kernels
    return kernels


def describe(device: str) -> str:
    """One line for the start-up banner: what will compute."""
    xp = probe(device)
    if xp is numpy:
        return f"cpu: NumPy {numpy.__version__}"
    index = parse(device)[1]
    index = xp.cuda.runtime.getDevice() if index is None else index
    free, total = xp.cuda.runtime.memGetInfo()    # of the current device (select made it so)
    return (f"cuda:{index} {gpu_name(xp, index)}, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
            f"CuPy {xp.__version__}")


def gpu_name(xp, index: int | None = None) -> str:
    """``NVIDIA H100 80GB HBM3 (sm_90)``: the name and architecture of a CUDA device."""
    index = xp.cuda.runtime.getDevice() if index is None else index
    props = xp.cuda.runtime.getDeviceProperties(index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name} (sm_{props['major']}{props['minor']})"


def to_host(x):
    """A NumPy array of ``x`` (a copy from the GPU, or ``x`` itself on the CPU)."""
    if type(x).__module__.split(".")[0] == "cupy":
        return x.get()
    return numpy.asarray(x)
