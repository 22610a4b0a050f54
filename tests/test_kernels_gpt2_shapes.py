"""Each kernel family at GPT-2 124M's shapes, on the CPU emulator, float32 and bf16.

Attention at head size 64 and T = 1024 (one head, one batch row), softmax +
cross-entropy at V = 50257, LayerNorm at C = 768 and GELU at 4C, the embedding's
backward into a (50257, 768) table: tests/gpt2_shape_checks.py, against the NumPy
layers. The race checker is on except for the attention at T = 1024 (tens of millions
of shared-memory accesses: a minute), whose barriers the race checker proves at
T = 37 (tests/test_emulator_races.py: two key tiles, every barrier needed); here it
proves the numbers. The launch geometry of the whole 124M model against the sm_80 /
sm_90 limits is tests/test_kernels_geometry.py.
"""
import sys

import numpy as np
import pytest

from tests import cuda_emu, gpt2_shape_checks as g2
from worker.kernels import halfs, loader

why_not = cuda_emu.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"emulator unavailable: {why_not}")


def _float_and_bf16(name):
    return "<float" in name or "<bf16" in name



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda_emu_gpt2")


@pytest.mark.parametrize("dtype", [np.float32, halfs.BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(g2.CHECKS))
def test_family_at_gpt2_shape(workdir, monkeypatch, family, dtype):
    if family == "attention":     # its own build, uninstrumented: only the instances it runs
        emulator = cuda_emu.Emulator(workdir, racecheck=False, instances=_float_and_bf16)
    else:                         # the race-checked builds the other emulated tests share
        emulator = cuda_emu.Emulator(workdir)
    dev = cuda_emu.EmulatedDevice(emulator)
    monkeypatch.setitem(sys.modules, "cupy", dev.xp)
    monkeypatch.setattr(loader, "function", emulator.function)
    g2.CHECKS[family](dev, dtype, np.random.default_rng(124))
