"""The whole GPT on a real GPU against the NumPy model: tests/model_checks.py through
CuPy, NVRTC and cuBLAS, plus the GPT-2 124M shape in bf16 (a smoke test of memory and
launch limits at full size: finite loss and gradients, and a lower loss after a few
AdamW steps on one batch). Skips, saying why, without CuPy or a usable CUDA device.

Run on a GPU machine with:  pip install -e '.[gpu,test]'; pytest -s tests/test_gpu_model_gpu.py
"""
import numpy as np
import pytest

from tests import model_checks as mc

cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install -e '.[gpu]')")
try:
    _why = None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
except Exception as e:   # no driver, or a driver too old for this CuPy
    _why = f"CUDA unusable: {type(e).__name__}: {e}"
pytestmark = pytest.mark.skipif(_why is not None, reason=str(_why))


@pytest.fixture
def xp(monkeypatch):
    mc.no_fallback(monkeypatch)
    yield cupy
    cupy.cuda.Device().synchronize()       # a kernel fault surfaces in its own test


@pytest.mark.parametrize("attention", ["lse", "att"])
@pytest.mark.parametrize("dtype,precision", [(np.float32, "fp32"), (np.float64, "fp32"),
                                             (np.float32, "bf16"), (np.float32, "fp16")])
def test_loss_and_every_gradient_match_the_reference(xp, dtype, precision, attention):
    mc.check_loss_and_gradients(xp, dtype, precision, attention)


@pytest.mark.parametrize("dtype,precision", [(np.float32, "fp32"), (np.float32, "bf16")])
def test_logits_come_back_as_host_arrays(xp, dtype, precision):
    mc.check_logits(xp, dtype, precision)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_steps_with_the_adamw_kernel(xp, dtype):
    mc.check_training_steps(xp, dtype)


def test_microbatches_accumulate(xp):
    mc.check_accumulation(xp, np.float64)


def test_fp16_loss_scaling_recovers_from_overflow(xp):
    assert mc.check_loss_scaling(xp) >= 1


@pytest.mark.parametrize("attention", ["lse", "att"])
def test_gpt2_124m_shape_bf16_trains(xp, attention):
    from common.optim import OptimConfig
    from worker.deviceoptim import DeviceOptimizer
    from worker.model import GPT, GPTConfig
    cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    model = GPT(cfg, seed=0, device="cuda", precision="bf16", attention=attention)
    opt = DeviceOptimizer(cupy, OptimConfig(optimizer="adamw", lr=6e-4, weight_decay=0.1),
                          model.num_params(), np.float32, model.layout.decay_ranges())
    idx, targets = mc.batch(cfg=cfg, shape=(4, 1024))
    losses = []
    for _ in range(4):
        model.zero_grad()
        losses.append(model.forward(idx, targets))
        model.backward()
        assert bool(cupy.isfinite(model.grads).all())
        opt.step(model.params, model.grads, 6e-4)
    print(f"GPT-2 124M bf16 (attention saving {attention}), B=4 T=1024: losses {[round(x, 4) for x in losses]}")
    assert np.isfinite(losses).all() and abs(losses[0] - np.log(cfg.vocab_size)) < 0.5
    assert losses[-1] < losses[0]
