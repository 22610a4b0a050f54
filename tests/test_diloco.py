"""DiLoCo on the parameter server (--mode diloco), checked on real servers in float64.

- outer SGD at lr 1 (and Nesterov with momentum 0) is local-sgd, to 1e-9, with AdamW inside;
- H = 1, outer SGD lr 1, SGD inside is BSP;
- with Nesterov outer momentum and AdamW inside, the servers' parameters are those of a
  single-process DiLoCo written from the paper's algorithm (W model copies, mean change,
  PyTorch-form Nesterov step), so the outer state really carries over from round to round;
- compressed pseudo-gradients (int8, top-k; error feedback on the workers) are what a
  single-process DiLoCo gets from the same encoder and decoder, and error feedback matters;
- the settings that only DiLoCo reads are refused in other modes;
- scripts/experiments/diloco.py counts every byte a BSP step moves (its runs use sockets).

Workers are threads of the test (``tests/test_consistency.py``'s ``gpt_job``); servers are
real processes.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from common.cluster import JobConfig
from common.optim import OptimConfig, make_optimizer
from common.placement import place_chunks
from common.wire.compress import PushEncoder, decode_chunk, make_scheme
from tests.test_consistency import CFG, batch, gpt_job, rel_err, rows_of, single_process
from worker.model import GPT
from worker.train import apply_update, compute_gradients

ADAMW = OptimConfig(optimizer="adamw", lr=0.01, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=1.0)


def diloco_reference(inner: OptimConfig, outer: OptimConfig, H: int, K: int, W: int, job: JobConfig | None = None):
    """Single-process DiLoCo: W copies take H inner steps each on their rows of the batches,
    the mean of their changes (summed in rank order, as the servers do) is the outer gradient.
    ``job`` with --compress: each change goes through the workers' encoder (error feedback,
    their seeds) and the servers' decoder, chunk by chunk (one server's placement)."""
    theta = GPT(CFG, dtype=np.float64, seed=0).params.copy()
    models = [GPT(CFG, dtype=np.float64, seed=0) for _ in range(W)]
    inners = [make_optimizer(inner, theta.size, np.float64, models[0].layout.decay_ranges()) for _ in range(W)]
    outer_opt = make_optimizer(outer, theta.size, np.float64)
    encoders, chunks = [], []
    if job is not None and job.compress != "none":
        ef = job.error_feedback == "on"
        encoders = [PushEncoder(make_scheme(job.compress, job.compress_ratio, ef), theta.size, np.float64, ef,
                                seed=[1, r]) for r in range(W)]
        chunks = [(b, e) for b, e, _ in place_chunks(models[0].layout, 1, job.chunk_mb)]
    for r0 in range(0, K, H):
        changes = []
        for r, (m, opt) in enumerate(zip(models, inners)):
            m.params[:] = theta
            for i in range(r0, min(K, r0 + H)):
                idx, tgt = batch(i, rows_of(r))
                compute_gradients(m, idx, tgt)
                apply_update(m, opt, inner, i)
            changes.append(theta - m.params)
        if encoders:
            changes = [sent(enc, c, chunks) for enc, c in zip(encoders, changes)]
        mean = changes[0].copy()
        for c in changes[1:]:
            mean += c
        mean *= 1.0 / W
        outer_opt.step(theta, mean, outer.lr)
    return theta


def sent(encoder, change, chunks):
    """What a server decodes of ``change`` pushed through ``encoder``."""
    out = np.empty_like(change)
    for b, e in sorted(chunks):
        parts = encoder.encode(b, e, change)
        decode_chunk(encoder.scheme, [a for _, a in parts], [n for n, _ in parts], out[b:e])
    return out


def test_config():
    JobConfig(mode="diloco", local_steps=50, outer_lr=0.5, outer_momentum=0.8)
    JobConfig(mode="diloco", outer_optimizer="sgd", outer_lr=1.0)
    assert JobConfig(mode="diloco").outer_optim() == OptimConfig(optimizer="nesterov", lr=0.7, momentum=0.9)
    for bad, msg in ((dict(mode="local-sgd", outer_lr=1.0), "applies to --mode diloco"),
                     (dict(mode="bsp", outer_optimizer="sgd"), "applies to --mode diloco"),
                     (dict(mode="diloco", outer_optimizer="sgd", outer_momentum=0.5), "applies to --outer-optimizer"),
                     (dict(mode="diloco", outer_optimizer="adam"), "outer_optimizer"),
                     (dict(mode="diloco", outer_lr=0.0), "outer_lr > 0")):
        with pytest.raises(ValueError, match=msg):
            JobConfig(**bad)


@pytest.mark.parametrize("outer", [dict(outer_optimizer="sgd", outer_lr=1.0),
                                   dict(outer_optimizer="nesterov", outer_lr=1.0, outer_momentum=0.0)])
def test_outer_lr_1_without_momentum_is_local_sgd(outer, tmp_path):
    W, K, H = 2, 6, 3
    local, _ = gpt_job(JobConfig(mode="local-sgd", local_steps=H), ADAMW, 2, W, K, tmp_path / "local")
    diloco, [summary, _] = gpt_job(JobConfig(mode="diloco", local_steps=H, **outer), ADAMW, 2, W, K,
                                   tmp_path / "diloco")
    for a, b in zip(diloco, local):
        assert rel_err(a, b) <= 1e-9
    assert summary["updates"] == K // H


def test_one_local_step_outer_sgd_lr_1_and_sgd_inside_is_bsp(tmp_path):
    W, K, sgd = 2, 4, OptimConfig(optimizer="sgd", lr=0.5)
    params, _ = gpt_job(JobConfig(mode="diloco", local_steps=1, outer_optimizer="sgd", outer_lr=1.0), sgd,
                        1, W, K, tmp_path)
    want = single_process(sgd, K, range(W))
    for p in params:
        assert rel_err(p, want) <= 1e-9


@pytest.mark.parametrize("S", [1, 2])
def test_nesterov_outer_steps_match_single_process_diloco(S, tmp_path):
    W, K, H = 2, 8, 2
    job = JobConfig(mode="diloco", local_steps=H, outer_lr=0.7, outer_momentum=0.9)
    params, [summary, *_] = gpt_job(job, ADAMW, S, W, K, tmp_path)
    want = diloco_reference(ADAMW, job.outer_optim(), H, K, W)
    for p in params:
        assert rel_err(p, want) <= 1e-9
    # the outer momentum matters: plain averaging (local-sgd) ends elsewhere
    averaged = diloco_reference(ADAMW, OptimConfig(optimizer="sgd", lr=1.0), H, K, W)
    assert rel_err(averaged, want) > 1e-3
    assert summary["updates"] == K // H and summary["applied"] == W * K // H


@pytest.mark.parametrize("compress", [dict(compress="int8"), dict(compress="topk", compress_ratio=0.1)])
def test_compressed_pseudo_gradients_with_error_feedback(compress, tmp_path):
    W, K, H = 2, 8, 2
    job = JobConfig(mode="diloco", local_steps=H, **compress)
    params, _ = gpt_job(job, ADAMW, 1, W, K, tmp_path)
    want = diloco_reference(ADAMW, job.outer_optim(), H, K, W, job)
    for p in params:
        assert rel_err(p, want) <= 1e-9
    plain = diloco_reference(ADAMW, job.outer_optim(), H, K, W)
    no_ef = diloco_reference(ADAMW, job.outer_optim(), H, K, W,
                             JobConfig(mode="diloco", local_steps=H, error_feedback="off", **compress))
    assert rel_err(want, plain) < rel_err(no_ef, plain)        # what was not sent is sent later


def test_the_experiment_counts_every_byte_bsp_moves(tmp_path):
    """scripts/experiments/diloco.py compares bytes: a float32 BSP step must count its whole
    vector each way (with shared memory, ps-local's default, it once counted almost none and
    the lesson's '50x fewer bytes' came out as 5x)."""
    root = Path(__file__).resolve().parents[1]
    steps, W = 10, 2
    done = subprocess.run([sys.executable, "scripts/experiments/diloco.py", "--steps", str(steps), "--workers", str(W),
                           "--runs", "bsp", "--eval-interval", "10", "--out", str(tmp_path), "--img", str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    P = sum(a.size for a in load_file(str(tmp_path / "bsp" / "model.safetensors")).values())
    [bsp] = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert bsp["pushed"] >= steps * W * 4 * P and bsp["pulled"] >= steps * W * 4 * P, (bsp, P)
    assert all(json.loads((tmp_path / "bsp" / f"worker-{r}.json").read_text())["shm_pushes"] == 0 for r in range(W))
