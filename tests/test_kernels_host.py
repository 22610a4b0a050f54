"""The GPU backend's parts that run without a GPU: device selection, the loader, the
launchers' fall back on NumPy arrays, and the ``lse`` attention contract of
worker/kernels/reference.py (checked against the layers and finite differences)."""
import subprocess
import sys

import numpy as np
import pytest

from tests.gradcheck import assert_close, numerical_grad
from worker import backend, kernels, layers
from worker.kernels import loader, reference


def test_import_needs_no_cupy():
    code = ("import sys, worker.kernels, worker.backend, worker.kernels.loader; "
            "assert 'cupy' not in sys.modules, 'cupy imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_cpu_and_unknown():
    assert backend.probe("cpu") is np
    assert backend.ops_module("cpu") is layers
    with pytest.raises(ValueError, match="cpu, cuda"):
        backend.probe("tpu")


def test_backend_cuda_says_what_is_missing():
    try:
        import cupy
    except ImportError:
        with pytest.raises(backend.BackendError, match="needs CuPy"):
            backend.probe("cuda")
        return
    try:
        usable = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        usable = False
    if usable:
        assert backend.probe("cuda") is cupy
    else:
        with pytest.raises(backend.BackendError, match="driver|no device"):
            backend.probe("cuda")


def test_backend_chosen_once(monkeypatch):
    monkeypatch.setattr(backend, "_chosen", None)
    assert backend.current() == ("cpu", np)
    assert backend.select("cpu") is np
    assert backend.select("cpu") is np
    with pytest.raises(backend.BackendError, match="already computes on 'cpu'"):
        backend.select("cuda")


def test_loader_sources_and_names():
    for family in loader.FAMILIES:
        src = loader.source(family)
        assert '#line 1 "common.cuh"' in src and f'#line 1 "{family}.cu"' in src
        for name in loader.name_expressions(family):
            assert name.split("<")[0] in src, name
    with pytest.raises(KeyError, match="not among the instances"):
        loader.function("gelu", "gelu_forward<__half>")
    with pytest.raises(KeyError, match="unknown kernel family"):
        loader.source("conv")


def test_merge_ranges():
    assert kernels.merge_ranges([(5, 9), (0, 3), (3, 5), (10, 10), (12, 20)]) == [0, 9, 12, 20]
    assert kernels.merge_ranges([]) == []
    with pytest.raises(ValueError, match="overlap"):
        kernels.merge_ranges([(0, 5), (4, 8)])


def test_adamw_update_refuses_numpy():
    v = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="CuPy"):
        kernels.adamw_update(v, v, v, v, lr=1e-3, step=1, beta1=0.9, beta2=0.95, eps=1e-8)


def test_numpy_arrays_take_the_reference():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 8))
    w, b = rng.normal(size=8), rng.normal(size=8)
    got = [np.zeros((2, 3, 8)), np.zeros((2, 3)), np.zeros((2, 3))]
    want = [np.zeros((2, 3, 8)), np.zeros((2, 3)), np.zeros((2, 3))]
    kernels.layernorm_forward(*got, x, w, b)
    layers.layernorm_forward(*want, x, w, b)
    for g, wv in zip(got, want):
        np.testing.assert_array_equal(g, wv)
    out, ref = np.zeros_like(x), np.zeros_like(x)
    kernels.gelu_forward(out, x)
    layers.gelu_forward(ref, x)
    np.testing.assert_array_equal(out, ref)


def _lse_case(rng, B=2, T=5, NH=2, hs=3):
    C = NH * hs
    return rng.normal(size=(B, T, 3 * C)), (B, T, C), (B, NH, T, T)


def test_lse_reference_matches_layers():
    rng = np.random.default_rng(4)
    qkv, out_shape, att_shape = _lse_case(rng)
    B, NH, T, _ = att_shape
    hs = out_shape[2] // NH
    out, att = np.zeros(out_shape), np.zeros(att_shape)
    layers.attention_forward(out, att, qkv, NH)
    out2, lse = np.zeros(out_shape), np.zeros((B, NH, T))
    reference.attention_lse_forward(out2, lse, qkv, NH)
    np.testing.assert_allclose(out2, out, rtol=1e-14)
    # lse from first principles, one row at a time
    q5 = qkv.reshape(B, T, 3, NH, hs)
    for b in range(B):
        for h in range(NH):
            for i in range(T):
                s = [q5[b, i, 0, h] @ q5[b, j, 1, h] / np.sqrt(hs) for j in range(i + 1)]
                assert abs(lse[b, h, i] - np.log(np.sum(np.exp(s)))) < 1e-12
    dout = rng.normal(size=out_shape)
    d1, d2 = np.zeros_like(qkv), np.full_like(qkv, 9.0)
    layers.attention_backward(d1, dout, qkv, att, NH)
    reference.attention_lse_backward(d2, dout, qkv, lse, NH)
    np.testing.assert_allclose(d2, d1, rtol=1e-12, atol=1e-14)


def test_lse_backward_finite_differences():
    rng = np.random.default_rng(5)
    qkv, out_shape, att_shape = _lse_case(rng, B=1, T=4, NH=2, hs=2)
    B, NH, T, _ = att_shape
    R = rng.normal(size=out_shape)
    out, lse = np.zeros(out_shape), np.zeros((B, NH, T))

    def f():
        reference.attention_lse_forward(out, lse, qkv, NH)
        return float((out * R).sum())

    f()
    dqkv = np.zeros_like(qkv)
    reference.attention_lse_backward(dqkv, R, qkv, lse, NH)
    assert_close(dqkv, numerical_grad(f, qkv), what="dqkv")
