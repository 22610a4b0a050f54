"""Choosing where a worker computes: --device / --precision on the worker, ps-train and
ps-local (--devices, one per worker rank), and the clear refusal where there is no GPU.

The GPU itself is not needed: the flags' parsing and plumbing are checked here, and
so is the error a user gets when asking for ``cuda`` on a machine that cannot run it
(those checks skip where a GPU is usable). A job with a GPU worker beside a CPU worker
runs in tests/test_gpu_worker_emulated.py (emulated GPU).
"""
import subprocess
import sys

import numpy as np
import pytest

from common.launch.local import worker_flags
from tests.cluster import ENV, ROOT
from worker import backend
from worker.distributed import WorkerConfig
from worker.model import GPT, GPTConfig
from worker.tasks import make_task
from worker.train import TrainConfig

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)


def cuda_reason():
    """Why --device cuda cannot run here, or None where it can."""
    try:
        backend.probe("cuda")
        return None
    except backend.BackendError as e:
        return str(e)


needs_no_gpu = pytest.mark.skipif(cuda_reason() is None, reason="a GPU is usable here")


def test_device_names():
    assert backend.parse("cpu") == ("cpu", None)
    assert backend.parse("cuda") == ("cuda", None)
    assert backend.parse("cuda:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", "CUDA"):
        with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
            backend.parse(bad)


def test_config_checks():
    WorkerConfig(device="cuda:1", precision="bf16")
    TrainConfig(device="cuda", precision="fp16")
    with pytest.raises(ValueError, match="needs --device cuda"):
        WorkerConfig(precision="bf16")
    with pytest.raises(ValueError, match="needs --device cuda"):
        TrainConfig(precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        WorkerConfig(device="cuda", precision="fp8")
    with pytest.raises(ValueError, match="cuda:N"):
        WorkerConfig(device="tpu")


def test_model_refuses_what_the_gpu_path_does_not_do():
    with pytest.raises(ValueError, match="needs a GPU"):
        GPT(CFG, precision="bf16")
    with pytest.raises(ValueError, match="threads > 1"):
        GPT(CFG, device="cuda", threads=2)
    with pytest.raises(ValueError, match="--model gpt"):
        make_task("bert", CFG, device="cuda")
    assert GPT(CFG).xp is np and GPT(CFG).device == "cpu"


@needs_no_gpu
def test_gpu_model_without_a_gpu_says_why():
    with pytest.raises(backend.BackendError, match="--device cuda"):
        GPT(CFG, device="cuda")


def test_ps_local_devices_per_rank():
    assert worker_flags("", 3, []) == [[], [], []]
    assert worker_flags("cuda", 2, []) == [["--device", "cuda"], ["--device", "cuda"]]
    assert worker_flags("cuda:0,cpu,cpu", 3, ["--precision", "bf16"]) == [
        ["--device", "cuda:0", "--precision", "bf16"], ["--device", "cpu"], ["--device", "cpu"]]
    assert worker_flags("cuda:1, cuda:0", 2, ["--precision=fp16"])[1] == ["--device", "cuda:0", "--precision=fp16"]
    with pytest.raises(ValueError, match="2 device"):
        worker_flags("cuda,cpu", 3, [])
    with pytest.raises(ValueError, match="not both"):
        worker_flags("cuda,cpu", 2, ["--device", "cpu"])


def run(*cmd, timeout=120):
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


@needs_no_gpu
def test_cuda_requests_fail_at_once_with_the_reason(tmp_path):
    reason = cuda_reason()
    done = run("-m", "worker", "--device", "cuda", "--dry-run")
    assert done.returncode == 2 and reason in done.stderr
    done = run("-m", "worker.train", "--device", "cuda", "--steps", 1, "--out", tmp_path / "t")
    assert done.returncode == 1 and reason in done.stderr and not (tmp_path / "t").exists()
    done = run("-m", "common.launch.local", "--workers", 2, "--devices", "cuda:0,cpu", "--out", tmp_path / "r")
    assert done.returncode == 2 and reason in done.stderr
    assert not (tmp_path / "r").exists()          # nothing started, no run folder


def test_ps_local_checks_the_devices_list(tmp_path):
    done = run("-m", "common.launch.local", "--workers", 2, "--devices", "cpu,cpu,cpu", "--out", tmp_path / "r")
    assert done.returncode == 2 and "3 device(s) for 2 worker(s)" in done.stderr
    done = run("-m", "common.launch.local", "--workers", 2, "--devices", "cpu,gpu", "--out", tmp_path / "r")
    assert done.returncode == 2 and "cpu, cuda or cuda:N" in done.stderr
