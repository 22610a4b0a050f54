"""The emulator's race checker and shuffle checks, proven by mutation.

Every ``__syncthreads()`` of worker/kernels/ is removed in turn and every full-warp
shuffle mask narrowed in turn (tests/cuda_emu/mutations.py); the family is rebuilt
(float32 instances only) and its kernel checks run: each mutant must fail. The table
printed (``pytest -s``) says which check caught each site. Before this checker, two of
those barriers (the "previous readers are done" ones of the block reductions) passed
every emulated test: fibers run in thread order, so a write-after-read race could not
show in the numbers.

Also here: the clean kernels are race-free and give the same bits whatever order the
fibers of a block run in (forward, reverse, shuffled), and the checker's own report
names the kernel, the memory, the threads and the source lines.
"""
import sys

import numpy as np
import pytest

from tests import cuda_emu, kernel_checks as kc
from tests.cuda_emu import mutations
from worker.kernels import loader

why_not = cuda_emu.available()
pytestmark = pytest.mark.skipif(why_not is not None, reason=f"emulator unavailable: {why_not}")


def test_every_barrier_and_shuffle_mask_is_needed_and_caught(tmp_path, monkeypatch):
    sites = mutations.sites()
    assert sum(s.kind == "barrier" for s in sites) >= 11, [str(s) for s in sites]
    rows = []
    for site in sites:
        with monkeypatch.context() as m:
            rows.append((site, mutations.verdict(site, tmp_path, m)))
    print("\n" + mutations.table(rows))
    missed = [f"{s.file}:{s.line} ({s.kind} in {s.function})" for s, v in rows if v[0] == "MISSED"]
    caught = len(rows) - len(missed)
    print(f"mutation score: {caught}/{len(rows)} sites caught")
    assert not missed, f"not caught: {missed}"
    # barriers are races, not wrong numbers by luck: the checker must be what sees them
    assert all(v[0] == "racecheck" for s, v in rows if s.kind == "barrier"), mutations.table(rows)



@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_kernels_are_race_free_and_order_independent(tmp_path, monkeypatch, order):
    """The checks of every family with barriers or shuffles, race-checked, with the
    fibers of each block run in another order: the same bits as in thread order."""
    results = {}
    for run_order in ("forward", order):
        emulator = cuda_emu.Emulator(tmp_path, order=run_order, seed=7)
        dev = cuda_emu.EmulatedDevice(emulator)
        monkeypatch.setitem(sys.modules, "cupy", dev.xp)
        monkeypatch.setattr(loader, "function", emulator.function)
        rng = np.random.default_rng(1)
        qkv = dev.to_dev(rng.normal(size=(1, 40, 96)).astype(np.float32))
        out, lse = dev.xp.zeros((1, 40, 32), np.float32), dev.xp.zeros((1, 2, 40), np.float32)
        from worker import kernels
        kernels.attention_forward(out, lse, qkv, 2)
        dq = dev.xp.zeros_like(qkv)
        kernels.attention_backward(dq, out, qkv, lse, 2, out)
        logits = dev.to_dev(rng.normal(size=(3, 300)).astype(np.float32))
        losses, probs = dev.xp.zeros(3, np.float32), dev.xp.zeros_like(logits)
        kernels.softmax_crossentropy_forward(losses, probs, logits, dev.to_dev(np.array([1, 5, 9])))
        results[run_order] = [dev.to_host(a) for a in (out, lse, dq, losses, probs)]
        kc.check_layernorm(dev, np.float32, np.random.default_rng(2), 40)
    for a, b in zip(results["forward"], results[order]):
        assert np.array_equal(a, b)


def test_race_report_names_kernel_memory_threads_and_lines(tmp_path, monkeypatch):
    """The report of the first race: what a user needs to find it in the source."""
    site = next(s for s in mutations.sites() if s.kind == "barrier" and s.file == "common.cuh"
                and s.function == "block_reduce")     # the first: previous readers done
    by, family, check, message = mutations.verdict(site, tmp_path, monkeypatch)
    assert by == "racecheck", message
    assert "softmax_crossentropy_forward<float" in message
    assert "write-after-read race between threads of one barrier interval" in message
    assert "__shared__ scratch" in message and "thread (" in message
    assert message.count("common.cuh:") == 2, message   # both accesses, with their lines


def test_race_between_blocks_is_reported(tmp_path, monkeypatch):
    """Two blocks of one grid writing the same global address: a race (the GPU does not
    order blocks), reported though each block alone is race-free. embedding_backward_wte
    trusts its ids to be sorted: given unsorted ones, two blocks both head a run of id 5."""
    emulator = cuda_emu.Emulator(tmp_path)
    xp = cuda_emu.fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", xp)
    k = emulator.function("embedding", "embedding_backward_wte<float, long long>")
    C = 32
    dwte, dout = xp.zeros((8, C), np.float32), xp.ones((3, C), np.float32)
    order = xp.asarray(np.arange(3, dtype=np.int64))
    for ids, race in (([3, 5, 5], False), ([5, 3, 5], True)):
        args = (dwte, dout, order, xp.asarray(np.array(ids, np.int64)), np.int64(3), np.int32(C))
        if not race:
            k((3,), (C,), args)
            continue
        with pytest.raises(cuda_emu.RaceError, match="between blocks of one launch") as e:
            k((3,), (C,), args)
        assert "global memory, argument 0" in str(e.value) and "embedding.cu:" in str(e.value)
