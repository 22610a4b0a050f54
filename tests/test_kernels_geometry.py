"""Every launch of the full GPT-2 124M model, checked against sm_80 and sm_90, without
running it.

The model (12 layers, 12 heads, C 768, T 1024, V 50257, batch 8, as the benchmark)
runs one forward and one backward on its CUDA path, fp32 (both attention designs) and
bf16, and the AdamW kernel steps its 124,439,808 parameters, with the CuPy stand-in:
but no kernel runs and no product is computed. Each launch is recorded (kernel, grid,
block, argument types) and each cuBLAS call checked for its leading dimensions and
32-bit sizes. The kernels launched are compiled by NVRTC for sm_80 and sm_90 and their
resources read from the CUBIN (tests/cubin.py: registers, static shared memory,
``__launch_bounds__``); each launch must fit: block and grid limits, 48 KiB of static
shared memory, 64 K registers per block, the launch bounds. Arrays are NumPy zeros that
nothing writes (the operating system maps their pages only when touched), so this takes
seconds and little memory. ``pytest -s`` prints the table.
"""
import sys

import numpy as np
import pytest

from tests import cubin
from tests.cuda_emu import fake_cupy
from worker import backend, kernels
from worker.kernels import loader
from worker.model import GPT, GPTConfig

GPT2 = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
B, T = 8, 1024
INT32_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def nvrtc():
    """NVRTC of the real CuPy (imported before the stand-in takes its place)."""
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception as e:
        pytest.skip(f"NVRTC not usable ({type(e).__name__}: {e}); pip install cupy-cuda13x nvidia-cuda-nvrtc")


class Recorder:
    """``loader.function`` that records launches instead of running them."""

    def __init__(self):
        self.launches = {}        # (family, name, grid, block) -> count

    def function(self, family, name):
        if name not in loader.FAMILIES[family]:
            raise KeyError(name)

        def launch(grid, block, args, shared_mem=0):
            for a in args:
                assert isinstance(a, (np.ndarray, np.float32, np.float64, np.int32, np.int64)), (name, a)
            grid = tuple(grid) + (1,) * (3 - len(grid))
            block = tuple(block) + (1,) * (3 - len(block))
            key = (family, name, grid, block)
            self.launches[key] = self.launches.get(key, 0) + 1
        return launch


def _cublas_recorder(calls):
    def gemm(handle, transa, transb, m, n, k, *rest):
        calls.append((m, n, k))
        for v in (m, n, k):
            assert 0 < v <= INT32_MAX, (m, n, k)
    return gemm


@pytest.fixture
def recorded(monkeypatch):
    xp = fake_cupy()
    rec, gemms = Recorder(), []
    monkeypatch.setitem(sys.modules, "cupy", xp)
    monkeypatch.setattr(loader, "function", rec.function)
    monkeypatch.setattr(backend, "select", lambda device: xp)
    xp.cuda.cublas.gemmEx = _cublas_recorder(gemms)
    xp.cuda.cublas.gemmStridedBatchedEx = _cublas_recorder(gemms)
    idx = np.random.default_rng(0).integers(0, GPT2.vocab_size, size=(B, T + 1))
    for precision, attention in (("fp32", "lse"), ("fp32", "att"), ("bf16", "lse")):
        model = GPT(GPT2, device="cuda", precision=precision, attention=attention)
        model.forward(idx[:, :-1], idx[:, 1:])
        model.backward()
        del model
    n = GPT2.layout().size
    vecs = [xp.zeros(n, np.float32) for _ in range(4)]
    kernels.adamw_update(*vecs, lr=6e-4, step=1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                         decay_ranges=[(0, n // 2)])
    return rec.launches, gemms, n


def test_gpt2_124m_launches_fit_sm80_and_sm90(nvrtc, recorded, capsys):
    launches, gemms, n = recorded
    assert n == 124_439_808
    by_family = {}
    for family, name, _, _ in launches:
        by_family.setdefault(family, set()).add(name)
    res = {}
    for arch in cubin.LIMITS:
        for family, names in sorted(by_family.items()):
            elf, lowered = cubin.compile_cubin(nvrtc, family, sorted(names), arch)
            for name in names:
                res[arch, name] = cubin.resources(elf, lowered[name])
    problems, rows = [], []
    for (family, name, grid, block), count in sorted(launches.items()):
        cells = []
        for arch in cubin.LIMITS:
            r = res[arch, name]
            bad = cubin.launch_problems(arch, grid, block, r)
            problems += [f"sm_{arch} {name} grid {grid} block {block}: {p}" for p in bad]
            cells.append(f"{r['registers']:>3} {r['shared']:>6} {'ok' if not bad else 'FAIL'}")
        rows.append(f"{name:<48} {str(grid):<18} {str(block):<14} {count:>4}  " + "  ".join(cells))
    with capsys.disabled():
        print(f"\n{'kernel':<48} {'grid':<18} {'block':<14} {'n':>4}  "
              f"sm_80 regs shared      sm_90 regs shared")
        print("\n".join(rows))
        print(f"{len(launches)} distinct launches of {len(by_family)} families, {len(gemms)} cuBLAS calls; "
              f"largest grid.x {max(k[2][0] for k in launches)}; AdamW over {n:,} parameters")
    assert not problems, "\n".join(problems)
    names = {k[1].split("<")[0] for k in launches}
    for expected in ("embedding_forward", "embedding_backward_wte", "layernorm_forward", "layernorm_backward_dx",
                     "attention_forward_flash", "attention_backward_dkdv_flash", "causal_softmax_forward",
                     "gelu_backward", "softmax_crossentropy_forward", "adamw_update", "convert", "bias_forward",
                     "column_partial_sums"):
        assert expected in names, f"{expected} never launched"


def test_the_limits_are_enforced():
    """A launch over a limit is reported (the check can fail)."""
    r = {"registers": 64, "shared": 1024, "max_threads": (256, 1, 1)}
    assert cubin.launch_problems("90", (1, 1, 1), (256, 1, 1), r) == []
    assert any("launch_bounds" in p for p in cubin.launch_problems("90", (1, 1, 1), (512, 1, 1), r))
    assert any("registers for the block" in p
               for p in cubin.launch_problems("80", (1, 1, 1), (1024, 1, 1), dict(r, registers=72, max_threads=None)))
    assert any("grid.y" in p for p in cubin.launch_problems("80", (1, 70000, 1), (32, 1, 1), r))
    assert any("static shared" in p for p in cubin.launch_problems("80", (1, 1, 1), (32, 1, 1), dict(r, shared=50000)))
