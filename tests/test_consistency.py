"""The consistency models keep their promises, checked on real servers.

- ssp(s) never lets a worker compute on parameters that miss an update of a clock
  older than c - s, checked on the servers' log of applied updates (not on their own
  bookkeeping), for several s and with a slowed worker; asp, in the same setting,
  breaks that bound (so the check can fail);
- asp with one worker == bsp with one worker; ssp(0) with SGD at lr/W == bsp at lr;
- local SGD with H = 1 (SGD, momentum) == bsp; with H = the whole run it is the
  average of models trained alone on each shard;
- backup workers: k = n is bsp; with one worker always late, the run equals bsp over
  the k on-time workers, and every late push is dropped and counted;
- an answer is never torn by an update that comes before it leaves (asp);
- an ssp wait has a deadline that names the worker it waits for;
- every mode ends by itself under ps-local, with its metrics in the run folder.

Workers run as threads of this test (PSClient + the real worker loops of
worker/mode_loops.py); servers are real processes.
"""
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from common.cluster import JobConfig
from common.config import to_dict
from common.layout import Layout
from common.optim import OptimConfig, clip_scale, lr_at, make_optimizer
from tests.cluster import Servers, run_threads
from worker.client import PSClient, RemoteError
from worker.mode_loops import make_loop
from worker.distributed import ANY, Straggler, parse_straggler
from worker.model import GPT, GPTConfig
from worker.train import compute_gradients

CFG = GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=8)
B, T = 3, 8


def batch(k, rows):
    """Rows of the big batch of step k (the same examples whoever asks)."""
    rng = np.random.default_rng(100 + k)
    idx = rng.integers(0, CFG.vocab_size, size=(8 * B, T))
    return idx[rows], np.roll(idx, -1, axis=1)[rows]


def rows_of(rank):
    return slice(rank * B, (rank + 1) * B)


def single_process(optim: OptimConfig, K, ranks):
    """One process, batch = the rows of ``ranks`` at every step (the BSP reference)."""
    model = GPT(CFG, dtype=np.float64, seed=0)
    opt = make_optimizer(optim, model.params.size, np.float64, model.layout.decay_ranges())
    for k in range(K):
        parts = [batch(k, rows_of(r)) for r in ranks]
        idx, tgt = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        compute_gradients(model, idx, tgt)
        scale = clip_scale(float(np.linalg.norm(model.grads)), optim.grad_clip) if optim.grad_clip else 1.0
        opt.step(model.params, model.grads, lr_at(optim, k), grad_scale=scale)
    return model.params


def flags(optim: OptimConfig, job: JobConfig, out):
    f = []
    for k, v in {**to_dict(optim), **to_dict(job)}.items():
        f += ["--" + k.replace("_", "-"), v]
    return f + ["--out", out]


def gpt_job(job: JobConfig, optim: OptimConfig, S, W, K, tmp_path, before_push=None, after_push=None):
    """Train the tiny GPT with W worker threads in ``job``'s mode; worker r's i-th
    gradient uses rows_of(r) of batch i. Returns (every worker's params, server summaries)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    # every worker's first read is version 0: asp/ssp would otherwise let a worker that
    # pulls late (a loaded machine) start from a faster one's first update, which those
    # modes allow but the identities below (ssp(0) == BSP) assume away
    pulled = threading.Barrier(W)
    with Servers(S, W, str(tmp_path), flags(optim, job, tmp_path)) as servers:
        def worker(rank):
            model = GPT(CFG, dtype=np.float64, seed=0)
            client = PSClient(servers.cluster(rank), job)
            info = client.register(model.layout, "float64")
            if rank == 0:
                client.init(model.params)
            model.params[:] = np.nan                 # everything must come from the servers
            client.pull(model.params)
            pulled.wait(timeout=60)
            loop = make_loop(job, client, model, K, W, info.get("optim"))
            i = 0
            while not loop.finished():
                idx, tgt = batch(i, rows_of(rank))
                loss = compute_gradients(model, idx, tgt)
                if before_push:
                    before_push(rank, client)
                loop.step(loss, idx.size)
                if after_push:
                    after_push(rank, client)
                i += 1
            loop.finish()
            client.done()
            client.close()
            return model.params.copy()
        params = run_threads(worker, W)
        assert servers.wait() == [0] * S
    return params, [json.loads((tmp_path / f"server-{s}.json").read_text()) for s in range(S)]


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


# --- configuration --------------------------------------------------------------------

def test_job_config_refuses_settings_its_mode_would_ignore():
    JobConfig(mode="ssp", staleness=3)
    JobConfig(mode="local-sgd", local_steps=8)
    JobConfig(mode="bsp", backup_workers=1).check_workers(2)
    for bad in (dict(mode="asp", staleness=2), dict(mode="bsp", local_steps=4),
                dict(mode="ssp", backup_workers=1), dict(mode="ssp", staleness=-1), dict(mode="sync")):
        with pytest.raises(ValueError):
            JobConfig(**bad)
    with pytest.raises(ValueError, match="at most 1"):
        JobConfig(mode="bsp", backup_workers=2).check_workers(2)


def test_straggler_flag():
    assert parse_straggler("") is None
    assert parse_straggler("2:0.05") == (2, 0.05, None)
    assert parse_straggler("1:3x") == (1, 0.0, 3.0)
    assert parse_straggler("any:3x") == (ANY, 0.0, 3.0)
    for bad in ("1", "x:2", "1:0.5x", "1:-2", "1:2y", "all:2"):
        with pytest.raises(ValueError):
            parse_straggler(bad)
    with pytest.raises(ValueError, match="has 2 worker"):
        Straggler("2:0.1", 0, 2, 0)
    fixed = [Straggler("1:3x", r, 3, 0) for r in range(3)]
    assert [s.pause(0, 0.5) for s in fixed] == [0.0, 1.0, 0.0] and fixed[1].involves_me
    # 'any': at every step exactly one worker is slow, a different one from step to step
    moving = [Straggler("any:0.2", r, 3, 7) for r in range(3)]
    slow = [[s.pause(t, 0.01) for s in moving] for t in range(300)]
    assert all(sorted(p) == [0.0, 0.0, 0.2] for p in slow)
    share = [sum(p[r] > 0 for p in slow) / 300 for r in range(3)]
    assert all(0.25 < x < 0.42 for x in share), share


# --- ssp: the bound, checked on the recorded clocks -------------------------------------

LINEAR = Layout([("w", (6,)), ("b", (2,))])


def clock_staleness_from_log(summary, W):
    """For each applied update: the pusher's clock minus the slowest live worker's clock
    in the parameters it computed on, rebuilt from the log alone: the parameters of
    version v hold exactly the first v updates of the log."""
    counts, at_version = [0] * W, [[0] * W]
    done = {int(r): v for r, v in summary["done_at_version"].items()}
    for rank, clock, base, version in summary["log"]:
        assert version == len(at_version) - 1, "the log is in the order updates were applied"
        assert clock == counts[rank], "a worker's clocks are 0, 1, 2, ..."
        counts[rank] += 1
        at_version.append(list(counts))
    worst = []
    for rank, clock, base, version in summary["log"]:
        live = [at_version[base][r] for r in range(W) if done.get(r, 1 << 60) > base]
        worst.append(clock - min(live, default=clock))
    return worst


def linear_async_job(job, S, W, K, tmp_path, slow_rank, delay):
    """W linear-model workers in ``job``'s (async) mode; ``slow_rank`` sleeps ``delay`` per step."""
    optim = OptimConfig(optimizer="sgd", lr=0.01)
    with Servers(S, W, str(tmp_path), flags(optim, job, tmp_path)) as servers:
        def worker(rank):
            client = PSClient(servers.cluster(rank), job)
            client.register(LINEAR, "float64")
            model = SimpleNamespace(params=np.zeros(LINEAR.size), grads=np.zeros(LINEAR.size))
            if rank == 0:
                client.init(model.params)
            client.pull(model.params)
            loop = make_loop(job, client, model, K, W)
            while not loop.finished():
                model.grads[:] = model.params - (rank + 1)        # pulls w, b towards rank + 1
                time.sleep(delay if rank == slow_rank else 0.002)
                loop.step(0.0, 1)
            loop.finish()
            client.done()
            client.close()
        run_threads(worker, W)
        assert servers.wait() == [0] * S
    return [json.loads((tmp_path / f"server-{s}.json").read_text()) for s in range(S)]


@pytest.mark.parametrize("s,S", [(0, 1), (1, 2), (3, 1)])
def test_ssp_never_computes_on_parameters_staler_than_s(s, S, tmp_path):
    W = 3
    for summary in linear_async_job(JobConfig(mode="ssp", staleness=s), S, W, 12, tmp_path, slow_rank=2,
                                    delay=0.03):
        worst = clock_staleness_from_log(summary, W)
        assert len(worst) == summary["updates"] >= 3 * 12
        assert max(worst) <= s, f"s={s}: an update was computed {max(worst)} clocks ahead of the slowest"
        # the server's own measure agrees, and the bound was reached: fast workers ran
        # ahead as far as allowed and then waited for the slow one
        assert summary["max_clock_staleness"] == max(worst) == s
        assert summary["held_s_by_worker"]["0"] > 0 and summary["held_s_by_worker"]["1"] > 0
        assert sum(summary["staleness_hist"].values()) == summary["updates"]


def test_asp_runs_ahead_of_the_slow_worker(tmp_path):
    """The same job without a bound: the log check of the test above fails (it can fail)."""
    W = 3
    # the slow worker sleeps 0.1 s a step, the fast ones 0.002 s: even where a loaded machine makes a
    # round trip take 30 ms, a fast worker's step is 3x shorter, so it pushes well over twice as often
    [summary] = linear_async_job(JobConfig(mode="asp"), 1, W, 12, tmp_path, slow_rank=2, delay=0.1)
    worst = clock_staleness_from_log(summary, W)
    assert max(worst) > 3 and summary["max_clock_staleness"] == max(worst)
    counts = summary["applied_by_worker"]
    assert counts["0"] > 2 * counts["2"] and counts["1"] > 2 * counts["2"]   # fast workers pushed more
    assert summary["updates"] >= W * 12


def test_ssp_wait_has_a_deadline_that_names_the_slow_worker(tmp_path):
    job = JobConfig(mode="ssp", staleness=0)
    optim = OptimConfig(optimizer="sgd", lr=0.1)
    refused = threading.Event()
    with Servers(1, 2, str(tmp_path), flags(optim, job, tmp_path), timeout=2.0) as servers:
        def worker(rank):
            client, params = servers.joined(rank, LINEAR, job)
            try:
                if rank == 1:
                    refused.wait(60)              # alive (heartbeats go on), but never pushes
                    return None
                t0 = time.monotonic()
                try:
                    with pytest.raises(RemoteError) as err:
                        client.push_pull(np.ones(LINEAR.size), params, 0, base_version=0)
                finally:
                    refused.set()
                return str(err.value), time.monotonic() - t0
            finally:
                client.close()
        text, waited = run_threads(worker, 2)[0]
        assert "worker 1 at clock 0" in text and "ssp(s=0)" in text
        # the servers' deadline is 2 s: never answered sooner, and on a loaded machine maybe a few s later
        assert 1.5 < waited < 2.0 + 10


# --- equivalences ---------------------------------------------------------------------

OPTIMS = {
    "sgd": OptimConfig(optimizer="sgd", lr=0.5),
    "adamw+clip": OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, warmup_steps=2, lr_decay_steps=4,
                              grad_clip=0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMS))
@pytest.mark.parametrize("S", [1, 2])
def test_asp_with_one_worker_equals_bsp_with_one_worker(name, S, tmp_path):
    optim, K = OPTIMS[name], 4
    (bsp,), _ = gpt_job(JobConfig(), optim, S, 1, K, tmp_path / "bsp")
    (asp,), [summary, *_] = gpt_job(JobConfig(mode="asp"), optim, S, 1, K, tmp_path / "asp")
    if S == 1:
        np.testing.assert_array_equal(asp, bsp)     # the same arithmetic, bit for bit
    else:                                           # the clipping norm is summed in another order
        assert rel_err(asp, bsp) <= 1e-12
    assert rel_err(bsp, single_process(optim, K, [0])) <= 1e-12
    assert summary["staleness_hist"] == {"0": K} and summary["updates"] == K


def test_ssp_with_s0_is_bsp_one_gradient_at_a_time(tmp_path):
    """ssp(0): every worker of a round reads the same parameters, and the round's W
    updates are applied one by one, each at lr / W: with SGD that is BSP's averaged step."""
    W, K, lr = 2, 4, 0.5
    params, [summary] = gpt_job(JobConfig(mode="ssp", staleness=0), OptimConfig(optimizer="sgd", lr=lr),
                                1, W, K, tmp_path)
    want = single_process(OptimConfig(optimizer="sgd", lr=lr), K, range(W))
    for p in params:
        assert rel_err(p, want) <= 1e-12
    assert summary["clock_staleness_hist"] == {"0": W * K}
    assert summary["staleness_hist"] == {"0": K, "1": K}      # the second update of a round is 1 behind


@pytest.mark.parametrize("name,optim", [("sgd", OptimConfig(optimizer="sgd", lr=0.5)),
                                        ("momentum+wd", OptimConfig(optimizer="momentum", lr=0.3, momentum=0.9,
                                                                    weight_decay=0.1))])
@pytest.mark.parametrize("S", [1, 3])
def test_local_sgd_with_one_local_step_equals_bsp(name, optim, S, tmp_path):
    """H = 1: each worker steps from the same parameters, and averaging the W changes is
    the step of the averaged gradient (the update is linear in the gradient; for momentum
    also in the buffer, which each worker keeps for its own gradients)."""
    W, K = 2, 4
    params, [summary, *_] = gpt_job(JobConfig(mode="local-sgd", local_steps=1), optim, S, W, K, tmp_path)
    want = single_process(optim, K, range(W))
    for p in params:
        assert rel_err(p, want) <= 1e-9, f"{name}, S={S}"
    assert summary["updates"] == K and summary["applied"] == W * K


def test_local_sgd_over_the_whole_run_averages_independent_models(tmp_path):
    """H = K: each worker trains alone on its shard; the servers average the models once."""
    W, K = 2, 4
    optim = OptimConfig(optimizer="momentum", lr=0.3, momentum=0.9)
    params, [summary] = gpt_job(JobConfig(mode="local-sgd", local_steps=K), optim, 1, W, K, tmp_path)
    want = np.mean([single_process(optim, K, [r]) for r in range(W)], axis=0)
    for p in params:
        assert rel_err(p, want) <= 1e-9
    assert summary["updates"] == 1


def test_backup_workers_with_k_equal_n_is_bsp(tmp_path):
    W, K = 3, 4
    params, [summary] = gpt_job(JobConfig(mode="bsp", backup_workers=0), OPTIMS["sgd"], 1, W, K, tmp_path)
    for p in params:
        assert rel_err(p, single_process(OPTIMS["sgd"], K, range(W))) <= 1e-9
    assert summary["dropped"] == 0 and summary["applied"] == W * K


@pytest.mark.parametrize("S", [1, 2])
def test_backup_worker_always_late_is_bsp_over_the_others(S, tmp_path):
    """W = 3, one backup worker; worker 2 pushes each step only after it is complete, so
    its every gradient is dropped, it goes on from the servers' version, and the run is
    BSP over workers 0 and 1 (global-norm clipping included)."""
    W, K = 3, 5
    optim = OptimConfig(optimizer="sgd", lr=0.5, grad_clip=0.05)
    progress, cond = [0], threading.Condition()

    def before_push(rank, client):              # worker 2 waits until its step is over
        if rank == 2:
            with cond:
                assert cond.wait_for(lambda: progress[0] > client.version, timeout=20)

    def after_push(rank, client):               # worker 0 says which steps are over
        if rank == 0:
            with cond:
                progress[0] = client.version
                cond.notify_all()

    params, summaries = gpt_job(JobConfig(mode="bsp", backup_workers=1), optim, S, W, K, tmp_path,
                                before_push, after_push)
    want = single_process(optim, K, [0, 1])
    for p in params:                            # worker 2 ends with the servers' parameters too
        assert rel_err(p, want) <= 1e-9
    for summary in summaries:
        assert summary["updates"] == K and summary["applied_by_worker"] == {"0": K, "1": K, "2": 0}
        assert summary["dropped_by_worker"]["2"] == summary["dropped"] >= 1


# --- torn answers ---------------------------------------------------------------------

def test_asp_answers_are_never_torn_by_a_later_update(tmp_path):
    """Every push adds 1 to every parameter (SGD, lr 1 / W per push, gradient -W), so an answer of
    version v must be v everywhere. Answers are big (8 MB) and updates keep coming while
    they are queued: an answer sent from the live parameters would mix two versions."""
    big = Layout([("x", (1 << 21,))])
    job, W, N = JobConfig(mode="asp"), 2, 12
    with Servers(1, W, str(tmp_path), flags(OptimConfig(optimizer="sgd", lr=1.0), job, tmp_path)) as servers:
        def worker(rank):
            client = PSClient(servers.cluster(rank), job)
            client.register(big, "float32")
            params, grads = np.zeros(big.size, np.float32), np.full(big.size, -float(W), np.float32)
            if rank == 0:
                client.init(params)
            client.pull(params)
            torn = 0
            for clock in range(N):
                client.push_pull(grads, params, clock, base_version=client.version)
                torn += not (params.min() == params.max() == client.version)
            client.done()
            client.close()
            return torn
        assert run_threads(worker, W) == [0] * W
        assert servers.wait() == [0]


# --- every mode under ps-local --------------------------------------------------------

SMALL = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
         "--eval-interval", "10", "--eval-batches", "1", "--sample-bytes", "0", "--timeout", "30",
         "--straggler", "2:0.02"]


@pytest.mark.parametrize("mode", [["bsp"], ["asp"], ["ssp", "--staleness", "2"], ["local-sgd", "--local-steps", "4"],
                                  ["bsp", "--backup-workers", "1"],
                                  ["diloco", "--local-steps", "4", "--compress-pull", "int8"]], ids=lambda m: "".join(m[::2]) + "".join(m[1::2][1:]))
def test_every_mode_ends_by_itself_with_its_metrics(mode, tmp_path):
    from tests.test_local import ps_local
    out, steps = tmp_path / "run", 20
    t0 = time.monotonic()
    done = ps_local("--servers", 1, "--workers", 3, "--steps", steps, "--out", out, "--no-progress", "--mode", *mode,
                    *SMALL, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - t0 < 100
    config = json.loads((out / "run_config.json").read_text())
    assert config["job"]["mode"] == mode[0] and config["worker"]["worker"]["straggler"] == "2:0.02"
    server = json.loads((out / "server-0.json").read_text())
    workers = [json.loads((out / f"worker-{r}.json").read_text()) for r in range(3)]
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == steps and "val_loss" in records[-1]
    assert all(w["wait_s"] >= 0 and w["pushes"] >= 1 for w in workers) and workers[2]["straggle_s"] > 0
    assert server["updates_per_s"] > 0 and sum(server["staleness_hist"].values()) == server["applied"]
    assert server["dropped"] == sum(w["dropped"] for w in workers)
    if mode[0] == "ssp":
        assert server["max_clock_staleness"] <= 2
    if mode[0] in ("asp", "ssp"):
        assert server["applied"] == sum(w["pushes"] for w in workers) >= 3 * steps
    if mode[0] in ("local-sgd", "diloco"):
        assert server["updates"] == steps // 4 and all(w["pushes"] == steps // 4 for w in workers)
    wire = [r["bytes_pushed"] for r in records if "bytes_pushed" in r]       # the job's totals, never worker 0's own
    # (asp/ssp: worker 0 logs as the job's progress passes each interval, and on a loaded machine the other
    # workers may carry it past several intervals, or to the end, during one of its steps)
    assert wire == sorted(wire) and len(wire) >= (1 if mode[0] in ("asp", "ssp") else 4)
    if mode[0] in ("bsp", "local-sgd", "diloco") and "--backup-workers" not in mode:   # every push answered with the totals
        assert wire[-1] == sum(w["bytes_pushed"] for w in workers)


def test_a_moving_straggler_is_slowed_by_its_compute_only(tmp_path):
    """``--straggler any:3x`` with overlap: the drawn worker sleeps twice its compute time,
    where its compute excludes the forward's wait for the last step's answers. Counting
    that wait (which holds the previous straggler's pause) made each pause feed the next:
    lesson 4's 200-step run hung at a loaded machine's step ~190. Each worker's compute,
    waits and pauses are disjoint parts of its wall time, so they sum to at most it."""
    from tests.test_local import ps_local
    out = tmp_path / "run"
    done = ps_local("--servers", 1, "--workers", 3, "--steps", 30, "--out", out, "--no-progress",
                    "--n-layer", "2", "--n-embd", "64", "--block-size", "64", "--batch-size", "8",
                    "--eval-interval", "30", "--eval-batches", "1", "--sample-bytes", "0",
                    "--straggler", "any:3x", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    for r in range(3):
        w = json.loads((out / f"worker-{r}.json").read_text())
        parts = w["compute_s"] + w["wait_s"] + w["straggle_s"]
        assert parts <= 1.02 * w["wall_s"] + 0.2, (r, w)     # (the first pull's wait lies before wall_s)


def test_the_experiment_draws_labelled_curves(tmp_path):
    """scripts/experiments/consistency.py, shortened: two modes, a few steps."""
    pytest.importorskip("matplotlib")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "experiments"))
    import consistency as experiment
    png = tmp_path / "c.png"
    results, labels = experiment.main(["--modes", "bsp,ssp2", "--scenarios", "moving", "--steps", "8",
                                       "--eval-interval", "4", "--out", str(tmp_path / "runs"), "--png", str(png)])
    assert png.exists() and (tmp_path / "c_staleness_moving.png").exists()
    runs = results["moving"]
    assert [r["label"] for r in runs] == ["BSP", "SSP (s=2)"]
    assert len(labels) == 4 and all(any(lab.startswith(r["label"] + ":") for lab in labels) for r in runs)
    assert all(r["wall_s"] > 0 and 8 <= r["curve"][-1]["bsp_steps"] < 9 for r in runs)
    assert runs[1]["max_clock_staleness"] <= 2
    assert all(w["straggler"] for w in runs[0]["workers"])        # 'any': every worker may be slowed
