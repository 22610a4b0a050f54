"""Device selection (worker/backend.py) on its success path, against the real CuPy module.

No GPU here, so the CUDA runtime's answers are replaced at the lowest level CuPy lets
Python reach: the functions of ``cupy_backends.cuda.api.runtime`` (the Cython binding
of libcudart that ``cupy.cuda.runtime`` is): device count, current device, set device,
properties (name, compute capability), free memory. ``select``, ``probe``,
``describe`` and ``gpu_name`` run unpatched, on the real ``cupy`` module, and must ask
the runtime the right questions: ``cuda:1`` makes device 1 current, a device number
beyond the count is refused naming the count, a driver error or zero devices is a
``BackendError`` naming the cause. Skips without CuPy.
"""
import numpy as np
import pytest

from worker import backend

cupy = pytest.importorskip("cupy", reason="CuPy not installed (pip install cupy-cuda13x)")
runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")


class FakeRuntime:
    """The answers of a two-GPU machine's CUDA runtime, and the calls it got."""

    def __init__(self, count=2):
        self.count, self.current, self.calls = count, 0, []

    def getDeviceCount(self):
        self.calls.append("getDeviceCount")
        return self.count

    def getDevice(self):
        self.calls.append("getDevice")
        return self.current

    def setDevice(self, device):
        self.calls.append(f"setDevice({device})")
        if not 0 <= device < self.count:
            raise runtime.CUDARuntimeError(101)       # cudaErrorInvalidDevice
        self.current = device

    def getDeviceProperties(self, device):
        self.calls.append(f"getDeviceProperties({device})")
        return {"name": b"NVIDIA H100 80GB HBM3", "major": 9, "minor": 0,
                "totalGlobalMem": 85_045_558_272}

    def memGetInfo(self):
        self.calls.append("memGetInfo")
        return 84_000_000_000, 85_045_558_272


@pytest.fixture
def fake_runtime(monkeypatch):
    fr = FakeRuntime()
    for name in ("getDeviceCount", "getDevice", "setDevice", "getDeviceProperties", "memGetInfo"):
        monkeypatch.setattr(runtime, name, getattr(fr, name))
    monkeypatch.setattr(backend, "_chosen", None)
    assert cupy.cuda.runtime is runtime              # what backend.py reaches through cupy
    return fr


def test_select_cuda_n_makes_it_current_on_the_real_cupy(fake_runtime):
    xp = backend.select("cuda:1")
    assert xp is cupy and fake_runtime.current == 1 and "setDevice(1)" in fake_runtime.calls
    assert backend.current() == ("cuda:1", cupy)
    assert backend.select("cuda:1") is cupy           # the same choice again: a no-op
    with pytest.raises(backend.BackendError, match="already computes on 'cuda:1'"):
        backend.select("cuda:0")
    line = backend.describe("cuda:1")
    assert line == (f"cuda:1 NVIDIA H100 80GB HBM3 (sm_90), 78.2 of 79.2 GiB free, CuPy {cupy.__version__}")
    assert "getDeviceProperties(1)" in fake_runtime.calls and "memGetInfo" in fake_runtime.calls


def test_plain_cuda_uses_the_current_device(fake_runtime):
    assert backend.select("cuda") is cupy
    assert not any(c.startswith("setDevice") for c in fake_runtime.calls)
    assert backend.gpu_name(cupy) == "NVIDIA H100 80GB HBM3 (sm_90)" and "getDevice" in fake_runtime.calls
    assert backend.ops_module("cuda").__name__ == "worker.kernels"


def test_a_device_beyond_the_count_is_refused(fake_runtime):
    with pytest.raises(backend.BackendError, match=r"has 2 CUDA device\(s\), numbered from 0"):
        backend.select("cuda:2")
    assert backend.current() == ("cpu", np) and fake_runtime.current == 0


def test_no_device_and_a_driver_error_say_so(fake_runtime, monkeypatch):
    fake_runtime.count = 0
    with pytest.raises(backend.BackendError, match="reports no device"):
        backend.probe("cuda")

    def broken():
        raise runtime.CUDARuntimeError(35)             # cudaErrorInsufficientDriver
    monkeypatch.setattr(runtime, "getDeviceCount", broken)
    with pytest.raises(backend.BackendError, match="driver cannot be used .*CUDARuntimeError"):
        backend.probe("cuda")
    assert backend.current() == ("cpu", np)
