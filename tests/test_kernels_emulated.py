"""The CUDA kernels, run on the CPU by the emulator of tests/cuda_emu/, against the layers.

The same checks as tests/test_kernels_gpu.py (tests/kernel_checks.py), through the
same launchers (worker/kernels/ops.py), with a stand-in ``cupy`` over NumPy and each
kernel compiled by g++ against a fiber-per-thread model of blocks, __syncthreads and
warp shuffles. This is how the kernels are known to compute the right thing on a
machine without a GPU; it says nothing of their speed, and the GPU test still owes the
proof on real hardware (NVRTC's code, real warps, cuBLAS).
"""
import sys

import numpy as np
import pytest

from tests import cuda_emu, half_checks as hc, kernel_checks as kc
from worker.kernels import halfs, loader

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


DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_embedding(dev, rng, dtype, index_dtype):
    kc.check_embedding(dev, dtype, rng, index_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [40, 300])
def test_layernorm(dev, rng, dtype, C):
    kc.check_layernorm(dev, dtype, rng, C)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_bias(dev, rng, dtype):
    kc.check_matmul_bias(dev, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 37, 64])
def test_attention_att(dev, rng, dtype, T):
    kc.check_attention_att(dev, dtype, rng, hs=16, T=T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hs,T", [(16, 1), (16, 37), (16, 64), (80, 37)])
def test_attention_lse(dev, rng, dtype, hs, T):
    # head size 80 runs the 128-wide float kernel; in double it is beyond the kernels
    kc.check_attention_lse(dev, dtype, rng, hs=hs, T=T,
                           expect_kernel=not (hs > 64 and dtype == np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu(dev, rng, dtype):
    kc.check_gelu(dev, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual(dev, rng, dtype):
    kc.check_residual(dev, dtype, rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,BT,index_dtype", [(101, (2, 9), np.int64), (101, (2, 9), np.int32),
                                               (8200, (1, 3), np.int64)])
def test_softmax_crossentropy(dev, rng, dtype, V, BT, index_dtype):
    kc.check_softmax_ce(dev, dtype, rng, V, BT, index_dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw(dev, rng, dtype):
    kc.check_adamw(dev, dtype, rng)


def test_deterministic(dev, rng):
    kc.check_deterministic(dev, np.float32, rng)


def test_fallbacks(dev, rng):
    kc.check_fallbacks(dev, rng)


def test_emulator_catches_wrong_scalar_type(emulator):
    """A Python float where the kernel takes a float would be passed as a double by
    CuPy: the emulator refuses it, so the launchers are checked for it."""
    k = emulator.function("gelu", "gelu_forward<float>")
    x = np.ones(4, np.float32)
    with pytest.raises(TypeError):
        k((1,), (32,), (x, x, 4))
    with pytest.raises(RuntimeError, match="argument types"):
        k((1,), (32,), (x, x, np.int32(4)))       # the kernel takes long long


def test_half_conversions_bit_for_bit(dev, rng):
    """bf16 and fp16 round to nearest even in the kernels' own conversions (here the
    software path of common.cuh; on a GPU the PTX cvt for fp16): same bits as NumPy."""
    hc.check_convert(dev, rng)


@pytest.mark.parametrize("dtype", halfs.HALF_DTYPES, ids=["bf16", "fp16"])
def test_half_layers(dev, rng, dtype):
    hc.check_half_layers(dev, dtype, rng)


@pytest.mark.parametrize("dtype", halfs.HALF_DTYPES, ids=["bf16", "fp16"])
def test_half_attention_att(dev, rng, dtype):
    hc.check_half_attention_att(dev, dtype, rng)
