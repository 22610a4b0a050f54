"""The whole GPT on its CUDA path, run on the CPU emulator, against the NumPy model.

Every layer of ``GPT(device="cuda")`` (worker/devicemodel.py) goes through its
launcher in worker/kernels/ and runs its real ``.cu`` kernel, compiled by g++ against
the fiber emulator of tests/cuda_emu/; matmuls go through worker/kernels/gemm.py to a
column-major cuBLAS stand-in that reads the raw pointers and leading dimensions it is
given; CuPy is the stand-in of tests/cuda_emu/fake_cupy.py. No layer may fall back to
its reference (``model_checks.no_fallback``). Compared with ``GPT(reference=True)``:
the loss and every gradient in float32, float64, bf16 and fp16 (tolerances in
tests/model_checks.py), a few AdamW steps with the AdamW kernel, micro-batch
accumulation, and fp16's loss scaling recovering from overflow.

This is the strongest evidence a machine without a GPU can give; it says nothing of
speed, of NVRTC's code or of real cuBLAS: tests/test_gpu_model_gpu.py runs the same
checks on a GPU.
"""
import sys

import numpy as np
import pytest

from tests import cuda_emu, model_checks as mc
from worker import backend
from worker.kernels import loader

why_not = cuda_emu.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"emulator unavailable: {why_not}")


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return cuda_emu.Emulator(tmp_path_factory.mktemp("cuda_emu_model"))


@pytest.fixture
def xp(emulator, monkeypatch):
    fake = cuda_emu.fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(loader, "function", emulator.function)
    monkeypatch.setattr(backend, "select", lambda device: fake)   # no CUDA driver to probe
    mc.no_fallback(monkeypatch)
    emulator.calls.clear()
    return fake


@pytest.mark.parametrize("attention", ["lse", "att"])
@pytest.mark.parametrize("dtype,precision", [(np.float32, "fp32"), (np.float64, "fp32"),
                                             (np.float32, "bf16"), (np.float32, "fp16")])
def test_loss_and_every_gradient_match_the_reference(xp, emulator, dtype, precision, attention):
    mc.check_loss_and_gradients(xp, dtype, precision, attention)
    ct = {"float32": "float", "float64": "double"}[np.dtype(dtype).name] if precision == "fp32" else precision
    ran = {n.split("<")[0] for n in emulator.calls if f"<{ct}" in n}
    attention_kernels = {"lse": ("attention_forward_flash", "attention_backward_D", "attention_backward_dq_flash",
                                 "attention_backward_dkdv_flash"),
                         "att": ("causal_softmax_forward", "causal_softmax_backward")}[attention]
    for name in ("embedding_forward", "embedding_backward_wte", "embedding_backward_wpe",
                 "layernorm_forward", "layernorm_backward_dx", "layernorm_backward_dwdb_partial",
                 "bias_forward", "column_partial_sums", "gelu_forward", "gelu_backward",
                 "residual_forward", "softmax_crossentropy_forward", "softmax_crossentropy_backward",
                 *attention_kernels):
        assert name in ran, f"{name}<{ct}> never launched"
    # the forward is not re-run in the backward: out is passed to it
    assert sum(c for n, c in emulator.calls.items()
               if n.startswith(attention_kernels[0])) == mc.CFG.n_layer


@pytest.mark.parametrize("dtype,precision", [(np.float32, "fp32"), (np.float32, "bf16")])
def test_logits_come_back_as_host_arrays(xp, dtype, precision):
    mc.check_logits(xp, dtype, precision)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_training_steps_with_the_adamw_kernel(xp, emulator, dtype):
    mc.check_training_steps(xp, dtype)
    assert any(n.startswith("adamw_update") for n in emulator.calls)


def test_microbatches_accumulate(xp):
    mc.check_accumulation(xp, np.float64)


def test_fp16_loss_scaling_recovers_from_overflow(xp):
    assert mc.check_loss_scaling(xp) >= 1
