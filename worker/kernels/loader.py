"""Compiles the CUDA kernels of ``worker/kernels/*.cu`` with NVRTC and caches them.

Each kernel family is one ``.cu`` file (``layernorm.cu``, ``attention.cu``, ...).
Its source is ``common.cuh`` (warp/block reductions, the accumulation type) pasted in
front of the file, with ``#line`` marks so that a compile error names the right file
and line. The list of template instances a family is loaded with (its *name
expressions*, e.g. ``layernorm_forward<float>``) is declared here, once: the launchers
(``ops.py``) ask for nothing else, and ``tests/test_kernels_compile.py`` compiles every
family with exactly these names for sm_80 and sm_90 without a GPU.

A family is compiled on first use (``cupy.RawModule``; CuPy keeps a disk cache keyed on
the source, options and architecture) and kept for the life of the process.

Not here: the launch geometry and the checks on arguments (``ops.py``). CuPy is
imported only inside ``module()``: importing this file needs no CuPy and no GPU.
"""
from __future__ import annotations

import pathlib

KERNEL_DIR = pathlib.Path(__file__).resolve().parent
COMMON = "common.cuh"

# Options given to NVRTC, beside those CuPy adds itself (-arch, -ftz=true,
# --device-as-default-execution-space); the compile test adds the same ones.
OPTIONS = ("--std=c++17",)

FLOATS = ("float", "double")             # element types: numpy float32, float64
HALVES = ("bf16", "fp16")                # 16-bit storage (common.cuh): numpy uint16 bits, float16
ALL = FLOATS + HALVES
INDICES = ("int", "long long")           # token id / target types: numpy int32, int64
# head-size bounds of the memory-efficient attention; 128 in double would need more
# than the 48 KiB of static shared memory a block may have (the 16-bit kernels stage
# their tiles in float: the float kernels' footprint)
ATTENTION_HS = (("float", 64), ("float", 128), ("double", 64), ("bf16", 64), ("bf16", 128),
                ("fp16", 64), ("fp16", 128))


def _each(names, types):
    return [f"{n}<{t}>" for n in names for t in types]


def _pairs(names, floats, indices):
    return [f"{n}<{t}, {i}>" for n in names for t in floats for i in indices]


# column_accumulate adds into a parameter gradient, which is float or double only (the
# 16-bit kernels' gradients are float32 master gradients).
FAMILIES = {
    "layernorm": (_each(("layernorm_forward", "layernorm_backward_dx",
                         "layernorm_backward_dwdb_partial"), ALL)
                  + _each(("column_accumulate",), FLOATS)),
    "gelu": _each(("gelu_forward", "gelu_backward"), ALL),
    "residual": (_each(("residual_forward", "residual_backward", "bias_forward",
                        "column_partial_sums"), ALL) + _each(("column_accumulate",), FLOATS)),
    "softmax_ce": _pairs(("softmax_crossentropy_forward", "softmax_crossentropy_backward"),
                         ALL, INDICES),
    "embedding": (_pairs(("embedding_forward", "embedding_backward_wte"), ALL, INDICES)
                  + _each(("embedding_backward_wpe",), ALL)),
    "attention": (_each(("causal_softmax_forward", "causal_softmax_backward",
                         "attention_backward_D"), ALL)
                  + [f"{n}<{t}, {hs}>" for n in ("attention_forward_flash",
                                                 "attention_backward_dq_flash",
                                                 "attention_backward_dkdv_flash")
                     for t, hs in ATTENTION_HS]),
    "adamw": _each(("adamw_update",), FLOATS),
    "convert": [f"convert<{s}, {d}>" for h in HALVES for s, d in (("float", h), (h, "float"))],
}

_modules: dict = {}


def source(family: str) -> str:
    """The full text NVRTC compiles for ``family``: common.cuh, then ``family.cu``."""
    if family not in FAMILIES:
        raise KeyError(f"unknown kernel family {family!r}; known: {', '.join(FAMILIES)}")
    common = (KERNEL_DIR / COMMON).read_text()
    body = (KERNEL_DIR / f"{family}.cu").read_text()
    return f'#line 1 "{COMMON}"\n{common}\n#line 1 "{family}.cu"\n{body}'


def name_expressions(family: str) -> list:
    return list(FAMILIES[family])


def module(family: str):
    """The compiled ``cupy.RawModule`` of ``family`` (compiled on first call)."""
    mod = _modules.get(family)
    if mod is None:
        import cupy
        mod = cupy.RawModule(code=source(family), options=OPTIONS,
                             name_expressions=name_expressions(family))
        _modules[family] = mod
    return mod


def function(family: str, name_expression: str):
    """One kernel of ``family``, e.g. ``function("gelu", "gelu_forward<float>")``."""
    if name_expression not in FAMILIES[family]:
        raise KeyError(f"{name_expression!r} is not among the instances of {family}.cu: "
                       f"{FAMILIES[family]}")
    return module(family).get_function(name_expression)
