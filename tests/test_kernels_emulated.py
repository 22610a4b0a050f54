"""The CUDA kernels, run on the CPU by the emulator of tests/cuda_emu/, against the layers.

The same list of checks as tests/test_kernels_gpu.py (``CASES`` in tests/kernel_checks.py,
bf16 / fp16 ones from tests/half_checks.py), through the
same launchers (worker/kernels/ops.py), with a stand-in ``cupy`` over NumPy and each
kernel compiled by g++ against a fiber-per-thread model of blocks, __syncthreads and
warp shuffles. This is how the kernels are known to compute the right thing on a
machine without a GPU; it says nothing of their speed, and the GPU test still owes the
proof on real hardware (NVRTC's code, real warps, cuBLAS).
"""
import sys

import numpy as np
import pytest

from tests import cuda_emu, kernel_checks as kc
from worker.kernels import loader

why_not = cuda_emu.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"emulator unavailable: {why_not}")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return cuda_emu.Emulator(tmp_path_factory.mktemp("cuda_emu"))


@pytest.fixture
def dev(emulator, monkeypatch):
    d = cuda_emu.EmulatedDevice(emulator)
    emulator.calls.clear()
    monkeypatch.setitem(sys.modules, "cupy", d.xp)
    monkeypatch.setattr(loader, "function", emulator.function)
    return d


@pytest.fixture
def rng():
    return np.random.default_rng(20240)


@pytest.mark.parametrize("case", kc.cases(emulated=True), ids=repr)
def test_kernel_against_its_layer(dev, rng, case):
    """tests/kernel_checks.py's list, the same one tests/test_kernels_gpu.py runs on a GPU
    (less the shapes too slow to emulate, marked there)."""
    case.run(dev, rng)


def test_emulator_catches_wrong_scalar_type(emulator):
    """A Python float where the kernel takes a float would be passed as a double by
    CuPy: the emulator refuses it, so the launchers are checked for it."""
    k = emulator.function("gelu", "gelu_forward<float>")
    x = np.ones(4, np.float32)
    with pytest.raises(TypeError):
        k((1,), (32,), (x, x, 4))
    with pytest.raises(RuntimeError, match="argument types"):
        k((1,), (32,), (x, x, np.int32(4)))       # the kernel takes long long
