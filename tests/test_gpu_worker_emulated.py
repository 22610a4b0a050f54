"""A GPU worker's plumbing, on the CPU emulator: host staging, ps-train, and a job in
which one emulated CuPy worker trains beside a CPU worker through real servers.

The model is ``GPT(device="cuda")`` over the stand-in CuPy and the emulated kernels of
tests/cuda_emu/ (as in tests/test_gpu_model_emulated.py). What is checked here is what
surrounds it: that ``worker/staging.py`` copies through pinned buffers on its own
stream, non-blocking, and that each of its waits is needed (the stand-in's streams
defer their copies until waited for: each wait removed in turn gives stale numbers or
an unordered copy); that ``ps-train --device cuda`` trains the same curve as the CPU
(optimizer on the device, checkpoints through the host, resume); and that the worker
loop of ``worker/distributed.py`` with a GPU worker and a CPU worker in one BSP job
gives the parameters of an all-CPU job. Timing and real stream concurrency are not
visible here: a GPU owes those.
"""
import json
import sys

import numpy as np
import pytest

from common.cluster import JobConfig
from tests import cuda_emu
from tests.cluster import Servers, run_threads
from worker import backend
from worker.data import DataConfig
from worker.kernels import loader
from worker.model import GPT, GPTConfig
from worker.staging import HostStaging
from worker.metrics import METRICS, read_metrics
from worker.train import parse_configs, train

why_not = cuda_emu.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"emulator unavailable: {why_not}")

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
        "--eval-batches", "2", "--log-interval", "1", "--eval-interval", "3", "--no-progress",
        "--lr-decay-steps", "20", "--warmup-steps", "3"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return cuda_emu.Emulator(tmp_path_factory.mktemp("cuda_emu_worker"))


@pytest.fixture
def fake(emulator, monkeypatch):
    xp = cuda_emu.fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", xp)
    monkeypatch.setattr(loader, "function", emulator.function)
    monkeypatch.setattr(backend, "select", lambda device: xp)
    monkeypatch.setattr(backend, "describe", lambda device: f"{device} (emulated)")
    return xp


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "(", ")", ":", "\n"]
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 3000)))
    return path


STAGING_CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)


def staging_cycle(staging_class, fake):
    """One step of the worker loop through ``staging_class`` (a HostStaging), with the
    stand-in's deferred streams: after a forward and backward, params and grads reach
    the host with the model's values; new params written on the host are what the
    next forward computes with. AssertionError or StreamOrderError if not."""
    model = GPT(STAGING_CFG, device="cuda")
    host = staging_class(model)
    idx = np.random.default_rng(0).integers(0, 16, size=(2, 9))
    model.forward(idx[:, :-1], idx[:, 1:])
    model.backward()                                        # kernels on the compute stream
    host.grads_to_host()
    np.testing.assert_array_equal(host.grads, model.grads.get(), "grads_to_host: stale host grads")
    assert np.abs(host.grads).max() > 0
    model.forward(idx[:, :-1], idx[:, 1:])                  # more kernels, then an upload
    host.params_to_host()
    np.testing.assert_array_equal(host.params, model.params.get(), "params_to_host: stale host params")
    host.params[...] -= 0.5 * host.grads                    # what the servers would answer
    new = host.params.copy()
    host.params_to_device()
    loss = model.forward(idx[:, :-1], idx[:, 1:])           # must compute with the new params
    ref = GPT(STAGING_CFG)
    ref.params[...] = new
    assert loss == pytest.approx(ref.forward(idx[:, :-1], idx[:, 1:]), rel=1e-5), "stale params on the device"
    return host


def test_host_staging_copies_through_pinned_buffers_on_its_own_stream(fake):
    fake.copies.clear()
    host = staging_cycle(HostStaging, fake)
    assert type(host.params) is np.ndarray and host.params.dtype == np.float32
    assert host.params.size == host.grads.size == host.model.num_params()
    staged = [(kind, stream is host.stream, blocking) for kind, stream, blocking in fake.copies
              if stream is not None]                     # (the test's own reads: stream None)
    # every copy on the staging stream, asynchronous (pinned memory)
    assert staged == [("d2h", True, False), ("d2h", True, False), ("h2d", True, False)]
    assert host.copies == 3 and host.stream.is_non_blocking
    cpu = GPT(STAGING_CFG)
    same = HostStaging(cpu)
    assert same.params is cpu.params and same.grads is cpu.grads
    same.grads_to_host()
    same.params_to_device()                      # nothing to do on the CPU


def _staging_waits():
    """(line number, text) of each wait of HostStaging: a synchronize() or wait_event()."""
    import ast
    import inspect

    from worker import staging
    source = inspect.getsource(staging)
    waits = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr in ("synchronize", "wait_event")):
            waits.append((node.lineno, source.split("\n")[node.lineno - 1].strip()))
    return source, waits


def test_each_wait_of_the_staging_is_needed_and_caught(fake):
    """worker/staging.py with one of its waits removed (each in turn) fails the staging
    cycle: stale numbers, or a copy refused as unordered after the kernels."""
    import types
    source, waits = _staging_waits()
    assert len(waits) >= 5, waits
    rows = []
    for lineno, text in waits:
        lines = source.split("\n")
        indent = lines[lineno - 1][:len(lines[lineno - 1]) - len(lines[lineno - 1].lstrip())]
        lines[lineno - 1] = indent + "pass"
        mutant = types.ModuleType("staging_mutant")
        exec(compile("\n".join(lines), "worker/staging.py (mutant)", "exec"), mutant.__dict__)
        try:
            staging_cycle(mutant.HostStaging, fake)
            caught = "MISSED"
        except AssertionError as e:
            caught = "numbers: " + str(e).strip().split("\n")[0][:70]
        except cuda_emu.StreamOrderError as e:
            caught = "StreamOrderError: " + str(e)[:60]
        rows.append((lineno, text, caught))
    print("\n" + "\n".join(f"staging.py:{n:<4} {t:<70} {c}" for n, t, c in rows))
    assert not [r for r in rows if r[2] == "MISSED"], rows


def test_ps_train_on_the_gpu_trains_the_cpu_curve_and_resumes(fake, tmp_path, text_file, capsys):
    data = ["--data", text_file, "--doc-bytes", "1000"]
    cpu = train(parse_configs([str(a) for a in TINY + data + ["--steps", 6, "--out", tmp_path / "cpu"]]))
    gpu = train(parse_configs([str(a) for a in TINY + data + ["--steps", 6, "--out", tmp_path / "gpu",
                                                               "--device", "cuda"]]))
    a, b = read_metrics(tmp_path / "cpu" / METRICS), read_metrics(tmp_path / "gpu" / METRICS)
    np.testing.assert_allclose([r["loss"] for r in a[1:]], [r["loss"] for r in b[1:]], rtol=1e-4)
    assert abs(cpu["val_loss"] - gpu["val_loss"]) < 1e-3
    # resume the GPU run from its checkpoint (optimizer state written from the device) up to 8
    # steps: the same curve as a CPU run that went to 8 straight
    train(parse_configs([str(a) for a in TINY + data + ["--steps", 8, "--out", tmp_path / "cpu8"]]))
    train(parse_configs(["--resume", str(tmp_path / "gpu"), "--steps", "8"]))
    a, b = read_metrics(tmp_path / "cpu8" / METRICS), read_metrics(tmp_path / "gpu" / METRICS)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    np.testing.assert_allclose([r["loss"] for r in a[1:]], [r["loss"] for r in b[1:]], rtol=1e-4)
    capsys.readouterr()


def test_ps_train_bf16_learns(fake, tmp_path, text_file, capsys):
    data = ["--data", text_file, "--doc-bytes", "1000"]
    cpu = train(parse_configs([str(a) for a in TINY + data + ["--steps", 6, "--out", tmp_path / "c"]]))
    bf16 = train(parse_configs([str(a) for a in TINY + data + ["--steps", 6, "--out", tmp_path / "b",
                                                                "--device", "cuda", "--precision", "bf16"]]))
    a, b = read_metrics(tmp_path / "c" / METRICS), read_metrics(tmp_path / "b" / METRICS)
    np.testing.assert_allclose([r["loss"] for r in a[1:]], [r["loss"] for r in b[1:]], rtol=2e-2)
    assert abs(cpu["val_loss"] - bf16["val_loss"]) < 2e-2
    assert json.loads((tmp_path / "b" / "run_config.json").read_text())["train"]["precision"] == "bf16"
    capsys.readouterr()


def _job(tmp_path, devices, text_file, steps=5):
    """A BSP job, SGD, 2 servers, one worker thread per entry of ``devices``; the final
    parameters (from worker 0's checkpoint) and the workers' results."""
    from worker import model_checkpoint as checkpoint
    from worker.distributed import WorkerConfig, run
    logdir = tmp_path / "logs"
    logdir.mkdir(parents=True)
    mc = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)
    dc = DataConfig(data=str(text_file), doc_bytes=1000)
    with Servers(2, len(devices), str(logdir), args=["--optimizer", "sgd", "--lr", "0.5", "--warmup-steps", "0",
                                                     "--grad-clip", "0"]) as servers:
        def worker(r):
            wc = WorkerConfig(batch_size=4, steps=steps, eval_interval=steps, eval_batches=2, sample_bytes=0,
                              out=str(tmp_path / "run"), device=devices[r])
            return run(servers.cluster(rank=r), JobConfig(), mc, dc, wc)
        results = run_threads(worker, len(devices), timeout=300)
        assert servers.wait() == [0, 0]
    params = checkpoint.read_model(tmp_path / "run")[1]
    return params, results


def test_a_gpu_worker_beside_a_cpu_worker_trains_as_two_cpu_workers(fake, emulator, tmp_path, text_file):
    emulator.calls.clear()
    mixed, res = _job(tmp_path / "mixed", ["cuda", "cpu"], text_file)
    assert any(n.startswith("attention_backward_dq_flash") for n in emulator.calls)   # rank 0 ran kernels
    cpu, _ = _job(tmp_path / "cpu", ["cpu", "cpu"], text_file)
    init = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)).named_tensors()
    assert [r["iterations"] for r in res] == [5, 5] and res[0]["bytes_pushed"] == res[1]["bytes_pushed"]
    moved = max(float(np.abs(cpu[n] - init[n]).max()) for n in cpu)
    worst = max(float(np.abs(mixed[n] - cpu[n]).max()) for n in cpu)
    print(f"mixed vs all-CPU job: max |difference| {worst:.2e}; the training moved parameters by up to {moved:.2e}")
    assert moved > 1e-2 and worst < 1e-5, (worst, moved)
    assert res[0]["val_loss"] < np.log(256)
