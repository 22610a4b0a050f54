"""Runs the CUDA kernels of worker/kernels/ on the CPU, through the project's launchers.

Two pieces, for tests only:
- ``build(family, dir)`` compiles ``loader.source(family)`` with g++ against
  ``emu.h`` (a fiber-per-thread emulator of blocks, __syncthreads and warp shuffles)
  into a shared library with one entry point per name expression of the family, and
  ``EmuKernel`` calls one the way ``cupy.RawModule.get_function(...)(grid, block,
  args)`` is called, checking each argument's C type against the kernel's parameter;
- ``fake_cupy()`` (``fake_cupy.py``) is a stand-in for the ``cupy`` module over NumPy:
  arrays are an ndarray subclass that ``layers.array_module`` takes for CuPy, so
  ``worker.kernels`` runs its kernel paths (launch geometry, scalar types, cuBLAS calls
  on raw pointers, stream and pinned-memory calls) on the CPU.

What it cannot tell: speed, memory-model races the fiber order happens to hide, the
real compiler's float contraction, a read out of bounds that lands in mapped memory.
The real GPU test (tests/test_kernels_gpu.py) runs the same checks on a GPU.
"""
from __future__ import annotations

import ctypes
import pathlib
import shutil
import subprocess
import sys

import numpy

from tests.cuda_emu.fake_cupy import fake_cupy, ndarray  # noqa: F401
from worker.kernels import loader

HERE = pathlib.Path(__file__).resolve().parent


def compiler():
    return shutil.which("g++") or shutil.which("c++")


def build(family: str, workdir: pathlib.Path):
    """The emulated ``family`` as a ctypes library; entry ``emu_k<i>`` for name i."""
    names = loader.name_expressions(family)
    exports = "\n".join(
        f'extern "C" int emu_k{i}(const unsigned* g, const unsigned* b, void** a, '
        f'const char* c, int n) {{ return emu::launch(&{name}, g, b, a, c, n); }}'
        for i, name in enumerate(names))
    src = workdir / f"{family}_emu.cpp"
    src.write_text(f'#include "emu.h"\n{loader.source(family)}\n{exports}\n')
    lib = workdir / f"{family}_emu.so"
    cmd = [compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-unknown-pragmas",
           "-I", str(HERE), str(src), "-o", str(lib)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{family}: emulator build failed:\n{done.stderr[-4000:]}")
    dll = ctypes.CDLL(str(lib))
    dll.emu_error.restype = ctypes.c_char_p
    return dll, {name: getattr(dll, f"emu_k{i}") for i, name in enumerate(names)}


_SCALARS = {numpy.float32: ("f", ctypes.c_float), numpy.float64: ("d", ctypes.c_double),
            numpy.int32: ("i", ctypes.c_int), numpy.int64: ("q", ctypes.c_longlong)}


class EmuKernel:
    """One kernel, called as CuPy calls a RawModule function."""

    def __init__(self, dll, entry, name):
        self.dll, self.entry, self.name = dll, entry, name
        self.calls = 0

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        values, codes = [], ""
        for a in args:
            if isinstance(a, numpy.ndarray):
                values.append(ctypes.c_void_p(a.ctypes.data))
                codes += "p"
            elif type(a) in _SCALARS:
                c, ctype = _SCALARS[type(a)]
                values.append(ctype(a))
                codes += c
            else:   # CuPy would guess a C type for a Python scalar: the launchers never may
                raise TypeError(f"{self.name}: argument {a!r} of type {type(a).__name__}; "
                                "pass NumPy scalars of the kernel's C type")
        ptrs = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        g = (ctypes.c_uint * 3)(*grid)
        b = (ctypes.c_uint * 3)(*block)
        if self.entry(g, b, ptrs, codes.encode(), len(values)):
            raise RuntimeError(f"{self.name}: {self.dll.emu_error().decode()}")
        self.calls += 1


_BUILT: dict = {}      # (family, source text) -> (library, entries), built once per process


class Emulator:
    """Builds families on demand; ``function`` has the signature of ``loader.function``."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.libs = {}
        self.calls = {}

    def function(self, family, name_expression):
        if name_expression not in loader.FAMILIES[family]:
            raise KeyError(name_expression)
        if family not in self.libs:
            # one build per source text in this process: the test files share it
            key = (family, loader.source(family))
            if key not in _BUILT:
                _BUILT[key] = build(family, self.workdir)
            self.libs[family] = _BUILT[key]
        dll, entries = self.libs[family]
        self.calls[name_expression] = self.calls.get(name_expression, 0) + 1
        return EmuKernel(dll, entries[name_expression], name_expression)


def available():
    """None when the emulator can run here, else why not."""
    if compiler() is None:
        return "no C++ compiler (g++)"
    if not sys.platform.startswith("linux"):
        return "the emulator uses ucontext fibers (Linux)"
    return None
