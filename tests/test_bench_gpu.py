"""The GPU benchmark's arithmetic and plumbing, on a machine without a GPU.

scripts/bench_gpu.py (``bench_worker.py --device cuda``) cannot run here: what is
checked is what does not need a GPU: the FLOP count and MFU arithmetic against
figures worked out by hand, the peak table's lookup by device name, the report's
ratio, that ``--device cuda`` without a GPU stops with the backend's reason, and that
the two children (ours on the CUDA emulator, torch on the CPU) start from the same
weights and give the same first loss, the guard the benchmark relies on.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.cluster import ENV, ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import bench_gpu  # noqa: E402


def test_flops_per_token_of_gpt2_124m():
    # N = 12 layers x 12 x 768^2 + 50257 x 768 = 84,934,656 + 38,597,376 = 123,532,032
    # 6 N = 741,192,192; attention 12 x 12 x 1024 x 768 = 113,246,208; sum 854,438,400
    assert bench_gpu.flops_per_token(**bench_gpu.CONFIGS["gpt2"]) == 854_438_400
    assert bench_gpu.flops_per_token(**bench_gpu.CONFIGS["gpt2-50304"]) == 854_438_400 + 6 * 47 * 768


def test_peak_lookup_by_device_name():
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert bench_gpu.peak_tflops("NVIDIA H100 80GB HBM3", "fp32")[0] == 66.9
    assert bench_gpu.peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert bench_gpu.peak_tflops("NVIDIA H200", "fp16")[0] == 989.4
    assert bench_gpu.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32")[0] == 19.5
    assert bench_gpu.peak_tflops("Tesla T4", "bf16") == (None, None)
    with pytest.raises(ValueError):
        bench_gpu.peak_tflops("NVIDIA H100", "tf32")


def test_mfu_arithmetic():
    # 100,000 tokens/s x 854,438,400 FLOP = 85.44 TFLOP/s, over 989.4: 8.64%
    assert bench_gpu.mfu(1e5, 854_438_400, 989.4) == pytest.approx(0.086359, rel=1e-4)
    assert bench_gpu.mfu(1e5, 854_438_400, None) is None


def test_summary_ratio_and_mfu():
    fake = lambda ms: [dict(device="NVIDIA H100 80GB HBM3", times=[ms / 1e3] * 3, first_loss=10.9,  # noqa: E731
                            loss=10.8, peak_mem_gib=20.0)]
    out = bench_gpu.summarise("gpt2", "bf16", {"ours": fake(100.0), "ours-att": fake(80.0), "torch": fake(125.0)})
    assert out["tokens_per_step"] == 8192 and out["peak_tflops"] == 989.4
    assert out["ours"]["tokens_per_s"] == pytest.approx(81920.0)
    assert out["ratio_ours_over_torch"] == 1.25 and out["ratio_ours_att_over_torch"] == 1.562
    assert out["ours"]["mfu"] == pytest.approx(81920 * 854_438_400 / 989.4e12, abs=1e-4)


def test_device_cuda_without_a_gpu_says_why():
    from worker import backend
    try:
        backend.probe("cuda")
        pytest.skip("a GPU is usable here: the benchmark would run")
    except backend.BackendError as e:
        reason = str(e)
    done = subprocess.run([sys.executable, "scripts/bench_worker.py", "--device", "cuda", "--steps", "1"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and reason in done.stderr, done.stderr


def test_both_children_start_from_the_same_loss(monkeypatch, tmp_path):
    """ours (the CUDA path, emulated) and torch (on the CPU) at a tiny shape: same first loss."""
    pytest.importorskip("torch")
    from tests import cuda_emu
    if cuda_emu.available():
        pytest.skip(cuda_emu.available())
    from worker import backend
    from worker.kernels import loader
    fake = cuda_emu.fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(loader, "function", cuda_emu.Emulator(tmp_path).function)
    monkeypatch.setattr(backend, "select", lambda device: fake)
    monkeypatch.setattr(backend, "gpu_name", lambda xp, index=None: "emulated")
    monkeypatch.setitem(bench_gpu.CONFIGS, "tiny", dict(vocab_size=64, block_size=16, n_layer=1, n_head=2,
                                                        n_embd=32, batch=2))
    ours = bench_gpu._child("ours", "tiny", "fp32", warmup=1, steps=1)
    ours_att = bench_gpu._child("ours-att", "tiny", "fp32", warmup=1, steps=1)
    torch_ = bench_gpu._child("torch", "tiny", "fp32", warmup=1, steps=1, torch_device="cpu")
    for o in (ours, ours_att):
        assert o["first_loss"] == pytest.approx(torch_["first_loss"], rel=1e-5)
        assert o["loss"] == pytest.approx(torch_["loss"], rel=1e-3)   # one AdamW step later
    assert np.isfinite(ours["times"]).all() and len(torch_["times"]) == 1
