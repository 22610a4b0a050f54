"""Mutation testing of the emulator's checks: every barrier of worker/kernels/ removed in
turn, every full-warp shuffle mask narrowed in turn, and the kernel checks run on the
mutant, which must fail.

A *site* is one ``__syncthreads();`` or one ``0xffffffffu`` mask of a ``__shfl*_sync``
in ``common.cuh`` or a ``.cu`` file. Its mutant is the family's source with that one
site changed (the barrier deleted; the mask made ``0x0000ffffu``), built for float32
only (a quick build), and run through the checks of ``tests/kernel_checks.py`` that
launch the kernel holding the site. A site's verdict is the first failure:
``racecheck`` (the race checker's ``RaceError``), ``emulator`` (a deadlock or an invalid
shuffle found by the scheduler), ``numbers`` (a result off the NumPy reference), or
``MISSED`` (every check passed: the emulator cannot see the change). A barrier that
nothing can catch is not needed.

``run(workdir)`` returns the table; ``tests/test_emulator_races.py`` prints it and
requires every site caught.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import numpy as np

from tests import cuda_emu, kernel_checks as kc
from worker.kernels import loader

BARRIER = "__syncthreads();"
FULL_MASK = re.compile(r"(__shfl\w*_sync\()0xffffffffu")

# the kernel checks that launch each family's kernels (float32: one quick build)
CHECKS = {
    "layernorm": [("layernorm", lambda d, r: kc.check_layernorm(d, np.float32, r, 40))],
    "residual": [("matmul + bias", lambda d, r: kc.check_matmul_bias(d, np.float32, r)),
                 ("residual", lambda d, r: kc.check_residual(d, np.float32, r))],
    "softmax_ce": [("softmax-CE", lambda d, r: kc.check_softmax_ce(d, np.float32, r))],
    "attention": [("attention att", lambda d, r: kc.check_attention_att(d, np.float32, r)),
                  ("attention lse", lambda d, r: kc.check_attention_lse(d, np.float32, r))],
}


@dataclass
class Site:
    file: str           # common.cuh or a .cu file
    line: int           # 1-based
    function: str       # the function it sits in
    kind: str           # "barrier" or "shuffle mask"
    start: int          # offset of the site in the file's text
    end: int


def _function_at(code, offset):
    """The name of the function whose body holds ``offset``: the last __global__ or
    __device__ definition before it."""
    for head in reversed([m.start() for m in re.finditer(r"__global__|__device__", code[:offset])]):
        signature = code[head:code.find("{", head)]
        signature = re.sub(r"__launch_bounds__\([^)]*\)", "", signature)
        name = re.search(r"(\w+)\s*\(", signature)
        if name:
            return name.group(1)
    return "?"


def sites():
    """Every barrier and every full shuffle mask of the kernels, file by file."""
    found = []
    for path in [loader.KERNEL_DIR / loader.COMMON, *sorted(loader.KERNEL_DIR.glob("*.cu"))]:
        text = path.read_text()
        code = re.sub(r"//[^\n]*", lambda m: " " * len(m.group(0)), text)   # not in comments
        spans = [(m.start(), m.end(), "barrier") for m in re.finditer(re.escape(BARRIER), code)]
        spans += [(m.start(1) + len(m.group(1)), m.end(), "shuffle mask")
                  for m in FULL_MASK.finditer(code)]
        for start, end, kind in sorted(spans):
            found.append(Site(path.name, text.count("\n", 0, start) + 1,
                              _function_at(code, start), kind, start, end))
    return found


def mutant(site, text):
    replacement = "" if site.kind == "barrier" else "0x0000ffffu"
    return text[:site.start] + replacement + text[site.end:]


def families_of(site):
    """The checked families whose kernels run the code of ``site``."""
    if site.file != loader.COMMON:
        return [site.file[:-3]]
    # a helper of common.cuh: the families whose own kernels call it, directly or
    # through another helper of common.cuh that does (block_max -> block_reduce)
    common = (loader.KERNEL_DIR / loader.COMMON).read_text()
    names = {site.function}
    for _ in range(3):
        names |= {_function_at(common, m.start()) for n in list(names)
                  for m in re.finditer(rf"\b{n}\s*\(", common)}
    out = []
    for family in CHECKS:
        body = (loader.KERNEL_DIR / f"{family}.cu").read_text()
        used = " ".join(loader.FAMILIES[family]) + body
        if any(re.search(rf"\b{n}\b", used) for n in names):
            out.append(family)
    return out


class _Device:
    def __init__(self, xp, calls):
        self.xp, self.calls = xp, calls

    def to_dev(self, a):
        return self.xp.array(a)

    def to_host(self, a):
        return self.xp.asnumpy(a)


def _float32_names(family):
    return [n for n in loader.FAMILIES[family] if "<float" in n]


def verdict(site, workdir, monkeypatch):
    """(caught by, family, check, message) for one mutated site."""
    path = loader.KERNEL_DIR / site.file
    for family in families_of(site):
        text = mutant(site, path.read_text())
        source = loader.source(family)
        original = path.read_text()
        marker = f'#line 1 "{site.file}"\n'
        mutated = source.replace(marker + original, marker + text)
        assert mutated != source, f"{site.file}:{site.line}: the mutant is the original source"
        source = mutated
        dll, entries = cuda_emu.build(family, workdir, names=_float32_names(family), source=source,
                                      tag=f"_{site.file.split('.')[0]}_{site.line}")
        calls = {}

        def function(fam, name, _entries=entries, _dll=dll, _calls=calls):
            if fam != family:
                raise KeyError(f"{fam}: only {family} is built for this mutant")
            _calls[name] = _calls.get(name, 0) + 1
            return cuda_emu.EmuKernel(_dll, _entries[name], name)

        xp = cuda_emu.fake_cupy()
        monkeypatch.setitem(sys.modules, "cupy", xp)
        monkeypatch.setattr(loader, "function", function)
        for check_name, check in CHECKS[family]:
            try:
                check(_Device(xp, calls), np.random.default_rng(20240))
            except cuda_emu.RaceError as e:
                return "racecheck", family, check_name, str(e)
            except AssertionError as e:
                return "numbers", family, check_name, str(e).split("\n")[0]
            except RuntimeError as e:
                return "emulator", family, check_name, str(e)
    return "MISSED", ",".join(families_of(site)), "-", "every check passed"


def table(rows):
    """The printed table: one line per site."""
    head = f"{'site':<22} {'kind':<13} {'function':<30} {'caught by':<10} {'check':<14} message"
    lines = [head, "-" * len(head)]
    for site, (by, family, check, msg) in rows:
        lines.append(f"{site.file + ':' + str(site.line):<22} {site.kind:<13} {site.function:<30} "
                     f"{by:<10} {check:<14} {msg[:300]}")
    return "\n".join(lines)
