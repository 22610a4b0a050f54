"""Every CUDA kernel on a real GPU against its NumPy layer, forward and backward.

The checks are the one list of tests/kernel_checks.py (``CASES``; bf16 / fp16 ones from
tests/half_checks.py, tolerances stated there, per kernel), the same that
tests/test_kernels_emulated.py runs on the CPU emulator; here they run through
CuPy, NVRTC and cuBLAS on the current CUDA device, plus GPT-2-sized shapes too slow
to emulate. Skips, saying why, where CuPy is not installed or no CUDA device can be
used. Run on a GPU machine with: pip install -e '.[gpu,test]'; pytest tests/test_kernels_gpu.py
"""
import numpy as np
import pytest

from tests import kernel_checks as kc
from worker.kernels import halfs, loader

cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install -e '.[gpu]')")
try:
    _n_devices = cupy.cuda.runtime.getDeviceCount()
    _why = None if _n_devices > 0 else "no CUDA device"
except Exception as e:   # no driver, or a driver too old for this CuPy
    _why = f"CUDA unusable: {type(e).__name__}: {e}"
pytestmark = pytest.mark.skipif(_why is not None, reason=str(_why))


class CudaDevice:
    def __init__(self):
        self.xp = cupy
        self.calls = {}

    def to_dev(self, a):
        return cupy.array(a)

    def to_host(self, a):
        return cupy.asnumpy(a)


@pytest.fixture
def dev(monkeypatch):
    d = CudaDevice()
    real = loader.function

    def counting(family, name_expression):
        d.calls[name_expression] = d.calls.get(name_expression, 0) + 1
        return real(family, name_expression)

    monkeypatch.setattr(loader, "function", counting)
    yield d
    cupy.cuda.Device().synchronize()       # a kernel fault surfaces in its own test


@pytest.fixture
def rng():
    return np.random.default_rng(20240)


@pytest.mark.parametrize("case", kc.cases(emulated=False), ids=repr)
def test_kernel_against_its_layer(dev, rng, case):
    """tests/kernel_checks.py's list, every check: the one tests/test_kernels_emulated.py
    runs on the emulator, plus the GPT-2-sized shapes marked too slow to emulate."""
    case.run(dev, rng)


def test_gemm_gpt2_shapes_bf16(dev, rng):
    """cuBLAS gemmEx on the GPT-2 124M shapes in bf16 with float32 weight gradients:
    the tied logits (wte.T, a transposed operand) and an MLP projection."""
    from tests.half_checks import HalfRun
    from worker import kernels, layers
    BT, C, V = 256, 768, 50257
    for w_shape, tied in (((C, V), True), ((4 * C, C), False)):
        r = HalfRun(dev, halfs.BF16, ("dw",), x=rng.normal(size=(BT, w_shape[0])),
                    w=rng.normal(size=(w_shape[1], w_shape[0]) if tied else w_shape) * 0.05,
                    out=np.zeros((BT, w_shape[1])), dout=rng.normal(size=(BT, w_shape[1])),
                    dx=np.zeros((BT, w_shape[0])),
                    dw=np.zeros((w_shape[1], w_shape[0]) if tied else w_shape))
        for f, a in ((layers.matmul_forward, r.h), (kernels.matmul_forward, r.d)):
            f(a["out"], a["x"], a["w"].T if tied else a["w"])
        for f, a in ((layers.matmul_backward, r.h), (kernels.matmul_backward, r.d)):
            f(a["dx"], a["dw"].T if tied else a["dw"], None, a["dout"], a["x"], a["w"].T if tied else a["w"])
        r.compare(["out", "dx", "dw"], f"gemm bf16 {w_shape}", ("dw",))
