"""Runs the CUDA kernels of worker/kernels/ on the CPU, through the project's launchers.

Three pieces, for tests only:
- ``build(family, dir)`` compiles ``loader.source(family)`` with g++ against
  ``emu.h`` (a fiber-per-thread emulator of blocks, __syncthreads and warp shuffles)
  into a shared library with one entry point per name expression of the family, and
  ``EmuKernel`` calls one the way ``cupy.RawModule.get_function(...)(grid, block,
  args)`` is called, checking each argument's C type against the kernel's parameter;
- the race checker (``racecheck.cpp``): the kernel code is built with GCC's
  ThreadSanitizer instrumentation pointed at the checker's own hooks, so every shared
  and global access of a launch is checked: two threads of a block touching one
  address between two barriers, or two blocks of a grid touching one address, one of
  them writing, fails the launch with a ``RaceError`` naming the kernel, the memory,
  the threads and both source lines;
- ``fake_cupy()`` (``fake_cupy.py``) is a stand-in for the ``cupy`` module over NumPy:
  arrays are an ndarray subclass that ``layers.array_module`` takes for CuPy, so
  ``worker.kernels`` runs its kernel paths (launch geometry, scalar types, cuBLAS calls
  on raw pointers, deferred stream copies, pinned memory) on the CPU.

What it cannot tell: speed, the real compiler's float contraction and code, races
between accesses that overlap without starting at the same address, a read out of
bounds that lands in mapped memory, anything of the memory model finer than "ordered
by a barrier or not". The real GPU test (tests/test_kernels_gpu.py) runs the same
checks on a GPU.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy
from numpy.lib.array_utils import byte_bounds

from tests.cuda_emu.fake_cupy import fake_cupy, ndarray  # noqa: F401
from tests.cuda_emu.streams import StreamOrderError  # noqa: F401
from worker.kernels import loader

HERE = pathlib.Path(__file__).resolve().parent
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
_SHARED_DECL = re.compile(r"(__shared__\s+[\w:<>, ]+?\s+(\w+)\s*(\[[^;]*\])?\s*;)")


class RaceError(RuntimeError):
    """A data race found by the emulator's race checker."""


def compiler():
    return shutil.which("g++") or shutil.which("c++")


def instrument(text: str) -> str:
    """``text`` with every ``__shared__`` declaration followed by its registration with
    the race checker; an error if a declaration is not of the form the build knows."""
    out, n = _SHARED_DECL.subn(lambda m: f"{m.group(1)} EMU_SHARED({m.group(2)});", text)
    declared = sum(line.lstrip().startswith("__shared__") for line in text.split("\n"))
    if n != declared:
        raise RuntimeError("a __shared__ declaration the emulator's build does not recognise")
    return out


def _run(cmd, what):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{what}: emulator build failed:\n{done.stderr[-4000:]}")


def build(family: str, workdir: pathlib.Path, names=None, source=None, racecheck=True, tag=""):
    """The emulated ``family`` as (ctypes library, {name: entry}); entry ``emu_k<i>`` for
    name i. ``names``: a subset of the family's name expressions (a faster build);
    ``source``: another text than ``loader.source(family)`` (a mutant); ``racecheck``:
    the kernels instrumented for the race checker (else it sees nothing)."""
    names = list(names or loader.name_expressions(family))
    exports = "\n".join(
        f'extern "C" int emu_k{i}(const unsigned* g, const unsigned* b, void** a, '
        f'const char* c, int n) {{ return emu::launch(&{name}, g, b, a, c, n); }}'
        for i, name in enumerate(names))
    text = instrument(source if source is not None else loader.source(family))
    program = f'#include "emu.h"\n{text}\n{exports}\n'
    flags = [compiler(), "-std=c++17", "-O1", "-gdwarf-4", "-fPIC", "-U_FORTIFY_SOURCE",
             "-Wno-unknown-pragmas", "-I", str(HERE)]
    if racecheck:
        flags += ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]
    key = hashlib.sha256("\0".join([program, *flags[1:], (HERE / "emu.h").read_text(),
                                     (HERE / "racecheck.cpp").read_text()]).encode()).hexdigest()[:24]
    library = _cached(key)
    if library is None:
        stem = workdir / f"{family}{tag}_emu"
        stem.with_suffix(".cpp").write_text(program)
        _run(flags + ["-c", str(stem) + ".cpp", "-o", str(stem) + ".o"], family)
        _run([compiler(), "-shared", str(stem) + ".o", str(_racecheck_object(workdir)), "-o",
              str(stem) + ".so", "-Wl,--no-undefined"], family)
        library = _store(key, pathlib.Path(str(stem) + ".so"))
    dll = ctypes.CDLL(str(library))
    dll.emu_error.restype = dll.emu_rc_report.restype = ctypes.c_char_p
    dll.emu_rc_global.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int]
    dll.emu_set_order.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
    dll.path = str(library)
    return dll, {name: getattr(dll, f"emu_k{i}") for i, name in enumerate(names)}


def _cache_dir():
    """Where built libraries are kept between processes (``PS_EMU_CACHE``, else
    ~/.cache/paramserver-cuda-emu), keyed by a hash of everything that went into them."""
    return pathlib.Path(os.environ.get("PS_EMU_CACHE") or pathlib.Path.home() / ".cache" / "paramserver-cuda-emu")


def _cached(key):
    path = _cache_dir() / f"{key}.so"
    return path if path.exists() else None


def _store(key, built):
    """``built`` copied into the cache (atomically; a cache that cannot be written is skipped)."""
    try:
        _cache_dir().mkdir(parents=True, exist_ok=True)
        tmp = _cache_dir() / f".{key}.{os.getpid()}.tmp"
        shutil.copyfile(built, tmp)
        os.replace(tmp, _cache_dir() / f"{key}.so")
        return _cache_dir() / f"{key}.so"
    except OSError:
        return built


@functools.lru_cache(maxsize=None)
def _racecheck_object(workdir):
    obj = workdir / "racecheck.o"
    _run([compiler(), "-std=c++17", "-O2", "-g", "-fPIC", "-c", str(HERE / "racecheck.cpp"),
          "-o", str(obj)], "racecheck.cpp")
    return obj


@functools.lru_cache(maxsize=None)
def _source_line(library, offset):
    """``file:line (function)`` of a code offset in ``library``, as addr2line gives it."""
    tool = shutil.which("addr2line")
    if tool is None:
        return f"offset 0x{offset:x}"
    done = subprocess.run([tool, "-e", library, "-f", "-C", "-i", hex(offset)],
                          capture_output=True, text=True)
    lines = done.stdout.split("\n")
    if len(lines) < 2 or lines[1].startswith("??"):
        return f"offset 0x{offset:x}"
    func = lines[0].split("(")[0]
    return f"{pathlib.Path(lines[1].split(' ')[0]).name} ({func})"


def _decode(report, library):
    return re.sub(r"\{pc:0x([0-9a-f]+)\}",
                  lambda m: "at " + _source_line(library, int(m.group(1), 16)), report)


_SCALARS = {numpy.float32: ("f", ctypes.c_float), numpy.float64: ("d", ctypes.c_double),
            numpy.int32: ("i", ctypes.c_int), numpy.int64: ("q", ctypes.c_longlong)}


class EmuKernel:
    """One kernel, called as CuPy calls a RawModule function."""

    def __init__(self, dll, entry, name, racecheck=True, order="forward", seed=1):
        self.dll, self.entry, self.name = dll, entry, name
        self.racecheck, self.order, self.seed = racecheck, order, seed
        self.calls = 0

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        values, codes = [], ""
        self.dll.emu_rc_begin(int(self.racecheck))
        for i, a in enumerate(args):
            if isinstance(a, numpy.ndarray):
                values.append(ctypes.c_void_p(a.ctypes.data))
                codes += "p"
                lo, hi = byte_bounds(a)
                self.dll.emu_rc_global(lo, hi - lo, i)
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
        self.dll.emu_set_order(ORDERS[self.order], self.seed)
        failed = self.entry(g, b, ptrs, codes.encode(), len(values))
        if self.dll.emu_rc_failed():
            report = _decode(self.dll.emu_rc_report().decode(), self.dll.path)
            raise RaceError(f"{self.name} grid {grid} block {block}: {report}")
        if failed:
            raise RuntimeError(f"{self.name}: {self.dll.emu_error().decode()}")
        self.calls += 1
        ndarray._launched(self.name)


_BUILT: dict = {}      # (family, source, racecheck, names) -> (library, entries), once per process


class Emulator:
    """Builds families on demand; ``function`` has the signature of ``loader.function``.
    ``racecheck``: check every launch for races; ``order``: the order in which the
    fibers of a block run ("forward", "reverse", "shuffled" with ``seed``)."""

    def __init__(self, workdir, racecheck=True, order="forward", seed=1, instances=None):
        self.workdir = pathlib.Path(workdir)
        self.racecheck, self.order, self.seed = racecheck, order, seed
        self.instances = instances        # a predicate on name expressions: build only those
        self.libs = {}
        self.calls = {}

    def function(self, family, name_expression):
        if name_expression not in loader.FAMILIES[family]:
            raise KeyError(name_expression)
        if family not in self.libs:
            # one build per source text in this process: the test files share it
            names = [n for n in loader.FAMILIES[family] if not self.instances or self.instances(n)]
            key = (family, loader.source(family), self.racecheck, tuple(names))
            if key not in _BUILT:
                _BUILT[key] = build(family, self.workdir, names, racecheck=self.racecheck,
                                    tag=f"_{len(_BUILT)}")
            self.libs[family] = _BUILT[key]
        dll, entries = self.libs[family]
        if name_expression not in entries:
            raise KeyError(f"{name_expression}: not built by this emulator (instances=)")
        self.calls[name_expression] = self.calls.get(name_expression, 0) + 1
        return EmuKernel(dll, entries[name_expression], name_expression, self.racecheck,
                         self.order, self.seed)


def available():
    """None when the emulator can run here, else why not."""
    if compiler() is None:
        return "no C++ compiler (g++)"
    if not sys.platform.startswith("linux"):
        return "the emulator uses ucontext fibers (Linux)"
    return None


class EmulatedDevice:
    """The device side of tests/kernel_checks.py's checks on the emulator: arrays to and from
    the stand-in CuPy, and the emulator's record of the kernels launched."""

    def __init__(self, emulator):
        self.xp = fake_cupy()
        self.calls = emulator.calls

    def to_dev(self, a):
        return self.xp.array(a)

    def to_host(self, a):
        return self.xp.asnumpy(a)
