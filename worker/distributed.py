"""The distributed worker: the single-process loop with the optimizer moved to the servers.

One worker, top to bottom:

    register with the coordinator          -> rank r, the servers, who owns which chunk
    load data shard r of W                 (worker/data.py)
    worker 0: init the servers             with its freshly initialised parameters
    pull                                   params <- the servers (on a GPU: into pinned host
                                           memory, then copied up: worker/staging.py)
    until the job's steps are done:
        forward + backward on a batch      grads (this worker's shard of the batch; on a GPU
                                           copied down to pinned host memory for the wire); with
                                           --overlap (bsp, CPU), each layer's gradients leave as
                                           soon as the backward has them, and the forward
                                           waits for each layer's new parameters
        (--straggler: this worker sleeps)  a slow worker, to see what each mode does with it
        the mode's step                    BSP: push grads, the servers average over every
                                           worker, step the optimizer, answer with fresh
                                           params; the other modes: worker/mode_loops.py
        worker 0: log, evaluate
    worker 0: save model.safetensors       (before done: the training's result is safe first)
    done                                   the coordinator stops the servers after the last worker
    worker 0: sample text; every worker: worker-R.json (its waits)

A worker that joins a running job (it was restarted, or the job resumed from the
servers' checkpoints) starts at the job's version, with its data sampler moved on by
the batches it would have drawn by then (rank r always reads shard r), so that a
resumed job continues the same loss curve; worker 0 keeps the metrics lines up to
that version. A worker dropped for silence registers again and pulls (docs/failures.md).

Compare with ``worker/train.py``: the loop is the same, except that
``apply_update(model, optimizer, ...)`` became ``client.push_pull(grads, params, ...)``.
``--model`` chooses what is learned (``worker/tasks.py``: the GPT, or the BERT-style
encoder on masked bytes); ``--trace`` records the loop's spans (``common/trace.py``).

Not here: sockets or bytes (``worker/client.py`` and ``common/``), the layers.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass

import numpy
from pathlib import Path

from common.cluster import ClusterConfig, JobConfig
from common.run import RunConfig
from common.trace import NULL_TRACER, Tracer, trace_file
from worker import backend
from worker.client import PSClient
from worker.mode_loops import make_loop
from worker.data import BatchSampler, DataConfig, data_tokenizer, load_data, unigram_entropy, validation_batches
from worker.kernels.halfs import PRECISIONS
from worker.model import GPTConfig
from worker.pretrained import load_init
from worker.staging import HostStaging
from worker.tasks import MODELS, make_task
from worker.metrics import METRICS, MetricsWriter, ThroughputWindow, crossed
from worker.train import evaluate

log = logging.getLogger("worker")


@dataclass
class WorkerConfig(RunConfig):
    """How a worker trains: the shared run settings (common/run.py) and the worker's own
    (every worker of a job should get the same values)."""
    sample_bytes: int = 300       # worker 0: tokens of text (bytes, for a byte-level run) to sample from the final model into sample.txt (0 = none)
    model: str = "gpt"            # gpt: next byte, causal attention | bert: 15% of the bytes masked, bidirectional
    trace: bool = False           # write a Chrome trace of this worker (trace-worker-R.json in the run folder)
    overlap: bool = True          # bsp: push each layer's gradients during the backward and wait for each layer's new parameters in the next forward (--no-overlap: push and pull after the backward)
    straggler: str = ""           # RANK:SECONDS (worker RANK sleeps that long after each gradient) or RANK:Fx (its steps take F times its compute time); RANK 'any': a different random worker at each step; '' = none
    CHOICES = {"model": MODELS, "precision": PRECISIONS}

    def __post_init__(self):
        super().__post_init__()
        parse_straggler(self.straggler)
        backend.check_device(self.device, self.precision)
        if self.sample_bytes < 0:
            raise ValueError(f"sample_bytes must be >= 0, got {self.sample_bytes}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")


ANY = -1


def parse_straggler(text: str):
    """``"2:0.05"`` -> (2, 0.05, None): worker 2 sleeps 0.05 s after each gradient;
    ``"2:3x"`` -> (2, 0.0, 3.0): it sleeps twice its compute time, so each of its steps
    takes 3x as long; ``"any:3x"`` -> (ANY, 0.0, 3.0): at each step one worker, drawn
    at random, is the slow one; ``""`` -> None."""
    if not text:
        return None
    m = re.fullmatch(r"(\d+|any):(\d+(?:\.\d*)?|\.\d+)(x?)", text.strip())
    if not m:
        raise ValueError(f"straggler must be RANK:SECONDS or RANK:FACTORx, RANK a number or 'any' "
                         f"(e.g. 1:0.05, 1:3x, any:3x), got {text!r}")
    rank = ANY if m.group(1) == "any" else int(m.group(1))
    value, factor = float(m.group(2)), m.group(3) == "x"
    if factor and value < 1:
        raise ValueError(f"a straggler's factor must be >= 1, got {text!r}")
    return (rank, 0.0, value) if factor else (rank, value, None)


class Straggler:
    """Which of this worker's steps ``--straggler`` slows down, and by how long.

    With RANK 'any', step t's slow worker is drawn from (seed, t), the same draw in every
    worker: in BSP exactly one worker is slow at each step, but never the same one for
    long, and each worker is slow on about 1/W of its steps."""

    def __init__(self, text: str, rank: int, num_workers: int, seed: int):
        parsed = parse_straggler(text)
        self.rank, self.seconds, self.factor = parsed or (None, 0.0, None)
        self.me, self.W, self.seed = rank, num_workers, seed
        if self.rank is not None and self.rank != ANY and self.rank >= num_workers:
            raise ValueError(f"--straggler names worker {self.rank}, but the job has {num_workers} worker(s)")

    @property
    def involves_me(self) -> bool:
        return self.rank is not None and self.rank in (ANY, self.me)

    def describe(self) -> str:
        how = f"{self.factor:g}x its compute time" if self.factor else f"+{self.seconds:g} s per step"
        return how + (" on the steps where it is drawn (one worker per step)" if self.rank == ANY else "")

    def pause(self, step: int, compute_s: float) -> float:
        """Seconds to sleep after this worker's ``step``-th gradient, which took ``compute_s``."""
        if not self.involves_me:
            return 0.0
        if self.rank == ANY and numpy.random.default_rng([self.seed, step]).integers(self.W) != self.me:
            return 0.0
        return self.seconds or (self.factor - 1.0) * compute_s


def batches_before(job: JobConfig, version: int, num_workers: int) -> int:
    """How many batches a worker of a job at ``version`` has drawn: bsp, one per step;
    local-sgd and diloco, H per round; asp/ssp, about one per W updates."""
    if job.local:
        return version * job.local_steps
    return version if job.mode == "bsp" else version // num_workers


def run(cluster: ClusterConfig, job: JobConfig, mc: GPTConfig, dc: DataConfig, wc: WorkerConfig) -> dict:
    client = PSClient(cluster, job)
    try:
        return _run(client, job, mc, dc, wc)
    finally:
        client.close()


def _run(client: PSClient, job_cfg: JobConfig, mc: GPTConfig, dc: DataConfig, wc: WorkerConfig) -> dict:
    """One worker's run, top to bottom (see the module's docstring)."""
    task = make_task(wc.model, mc, seed=wc.seed, threads=wc.threads, device=wc.device, precision=wc.precision)
    run = WorkerRun(client, job_cfg, wc, task)
    run.join(dc, mc)          # register, this rank's data shard, worker 0 inits, pull, catch the sampler up
    run.open_metrics(mc)      # worker 0: the validation set and metrics.jsonl (its first line)
    run.train()               # batch, forward, backward, the mode's step, log and evaluate
    return run.finish()       # worker 0: the last line, the model, a sample; done; worker-R.json


class WorkerRun:
    """The state one worker's run carries from step to step of ``_run``."""

    def __init__(self, client: PSClient, job_cfg: JobConfig, wc: WorkerConfig, task):
        self.client, self.job_cfg, self.wc, self.task = client, job_cfg, wc, task
        self.model = task.model
        # what the wire sees of the model: host vectors (on a GPU, pinned copies; on the CPU, the model's own)
        self.host = HostStaging(self.model)
        self.out = Path(wc.out or time.strftime("runs/%Y%m%d-%H%M%S"))
        self.metrics = self.val_set = None
        self.window = ThroughputWindow()
        self.times = {"compute_s": 0.0, "straggle_s": 0.0}

    # --- before the loop ------------------------------------------------------------------
    def join(self, dc: DataConfig, mc: GPTConfig):
        client, wc, host, model = self.client, self.wc, self.host, self.model
        tokenizer = data_tokenizer(dc)               # registered with the layout: every worker's must agree
        if wc.model == "bert" and tokenizer.kind != "bytes":
            raise ValueError("--model bert fills in masked bytes: give it raw text or a folder prepared with bytes")
        t_register = time.perf_counter()
        self.job = client.register(model.layout, model.dtype.name, tokenizer.sha256)
        self.rank, self.W = client.rank, self.job["num_workers"]
        self.block_size = mc.block_size
        log.info("rank %d of %d; %d parameters over %d server(s); mode %s; registration took %.1f s",
                 self.rank, self.W, model.num_params(), self.job["num_servers"], self.job_cfg.mode,
                 time.perf_counter() - t_register)
        self.data = load_data(dc, rank=self.rank, num_workers=self.W, seed=wc.seed)
        log.info("%s", self.data.summary)
        log.info("computing on %s, precision %s", backend.describe(wc.device), wc.precision)
        seed = wc.seed * 7919 + self.rank
        self.sampler = self.task.batches(BatchSampler(self.data.train, wc.batch_size, mc.block_size, seed=seed),
                                         seed=seed)
        self.lead = self.rank == 0
        self.tracer = client.tracer = Tracer(f"worker {self.rank}") if wc.trace else NULL_TRACER
        if self.lead:
            if wc.init_from:
                load_init(model, wc.init_from)
                log.info("weights from %s", wc.init_from)
            host.params_to_host()
            client.init(host.params)                 # (a server already initialized says so and keeps its own)
        client.pull(host.params)
        host.params_to_device()
        self.joined = client.version
        for _ in range(batches_before(self.job_cfg, self.joined, self.W)):   # the batches drawn before `joined`
            self.sampler.next_batch()
        if self.joined:
            log.info("joining the job at version %d (the data sampler moved on accordingly)", self.joined)
        # overlap needs the model's layer hooks over the very vectors the wire fills: a CPU model
        self.loop = make_loop(self.job_cfg, client, model if not host.on_device else host, wc.steps, self.W,
                              self.job.get("optim"), overlap=wc.overlap and not host.on_device)
        self.straggler = Straggler(wc.straggler, self.rank, self.W, wc.seed)
        if self.straggler.involves_me:
            log.info("this worker is slowed: %s", self.straggler.describe())

    def open_metrics(self, mc: GPTConfig):
        """Worker 0: the fixed validation set, and metrics.jsonl: a fresh file with the first
        line, or (joining a running or resumed job) the lines up to where it is."""
        if not self.lead:
            return
        wc, job = self.wc, self.job
        self.out.mkdir(parents=True, exist_ok=True)
        self.val_set = self.task.validation(validation_batches(self.data.val, wc.batch_size, mc.block_size,
                                                               wc.eval_batches))
        self.metrics = MetricsWriter(self.out / METRICS, keep_until=self.joined if self.joined else -1)
        if not self.joined:
            self.metrics.write({"step": 0, "val_loss": evaluate(self.model, self.val_set), "workers": self.W,
                                "servers": job["num_servers"], "mode": self.job_cfg.mode, "elapsed_s": 0.0,
                                "updates": 0, "gradients": 0,
                                "unigram_entropy": unigram_entropy(self.data.train, self.data.tokenizer.vocab_size),
                                "bytes_per_token": self.data.bytes_per_token, "fingerprint": self.data.fingerprint})

    # --- the loop ---------------------------------------------------------------------------
    def train(self):
        loop, client, tracer = self.loop, self.client, self.tracer
        self.t_start, self.epoch_start = time.perf_counter(), time.time()
        # joining a running or resumed job, the clock goes on from the last line kept: elapsed_s
        # is the time the job ran (the time it was down is not in it), so curves against time continue
        self.clock0 = self.metrics.last.get("elapsed_s", 0.0) if self.metrics is not None else 0.0
        self.window.mark(self.t_start, 0)
        self.val, self.iterations = float("nan"), 0
        self.last_log = self.last_eval = self.joined     # the job's step at the last metrics line and evaluation
        self.record, self.wire, self.p = {"step": 0}, {}, None   # wire: the job's totals from the servers
        while not loop.finished():
            t_step, step = tracer.now(), self.iterations
            loss, tokens = self._compute(step)
            self.p = loop.step(loss, tokens)
            if client.rejoin_if_dropped():               # dropped for silence (a stall): back into the view
                client.pull(self.host.params)
            self.host.params_to_device()      # the answer back to a GPU (asynchronous); on the CPU, nothing
            tracer.add("step", t_step, tracer.now(), step=step)
            self.iterations += 1
            if self.lead and self._log(step, loss):
                break                                    # the last line is written by ``finish``
        if self.p is not None:
            self.p = loop.settle(self.p)    # overlap: the last answers in before this worker says done
        self.wall_s = time.perf_counter() - self.t_start

    def _compute(self, step: int) -> tuple[float, int]:
        """A batch, its forward and backward (and the straggler's pause); (loss, tokens)."""
        model, tracer, loop = self.model, self.tracer, self.loop
        idx, targets = self.sampler.next_batch()
        t0, waited = time.perf_counter(), self.client.wait_s
        with tracer.span("forward", step=step):         # overlap: waits for each layer's new parameters
            loss = model.forward(idx, targets, **loop.forward_hooks())
        with tracer.span("backward", step=step):        # overlap: each layer's gradients leave when final
            model.zero_grad()      # after the forward: until then the last step's push may still be leaving
            model.backward(**loop.backward_hooks(loss, idx.size))
            self.host.grads_to_host()     # a GPU's gradients into pinned host memory, once computed
        # overlap: the forward waits for the last step's answers, which may have waited for
        # a straggler's pause; that wait is not compute (a pause grown from it would feed on itself)
        dt = time.perf_counter() - t0 - (self.client.wait_s - waited)
        self.times["compute_s"] += dt
        pause = self.straggler.pause(step, dt)
        if pause:
            time.sleep(pause)
            self.times["straggle_s"] += pause
        return loss, idx.size

    def _log(self, step: int, loss: float) -> bool:
        """Worker 0: log and evaluate when the job's progress passes a multiple of the
        intervals (a mode may jump over one: backup workers, asp); local-sgd evaluates only
        averaged models. True when the loop is finished."""
        wc, loop, p = self.wc, self.loop, self.p
        if not p.synced and (loop.finished() or crossed(wc.eval_interval, self.last_eval, p.step)
                             or crossed(wc.log_interval, self.last_log, p.step)):
            p = self.p = loop.settle(p)     # overlap: logging and evaluating need this step's answers
        self.wire = p.reply.get("stats", self.wire)
        self.record = {"step": p.step, "loss": p.reply.get("loss", loss), "updates": p.updates,
                       "gradients": p.gradients}
        if loop.finished():
            return True
        if p.synced and crossed(wc.eval_interval, self.last_eval, p.step):
            with self.tracer.span("evaluate", step=step):
                self.val = self.record["val_loss"] = evaluate(self.model, self.val_set)
            self.last_eval = p.step
        if crossed(wc.log_interval, self.last_log, p.step) or "val_loss" in self.record:
            self._write_line(p.tokens, self.wire)
            self.last_log = p.step
        return False

    def _write_line(self, tokens: int, wire: dict, now: float | None = None):
        """The record so far, with throughput over the window and the wire's totals."""
        now, client = time.perf_counter() if now is None else now, self.client
        self.record.update(tokens_per_s=self.window.rate(now, tokens), elapsed_s=self.clock0 + now - self.t_start,
                           bytes_pushed=wire.get("bytes_pushed", client.bytes_pushed),
                           bytes_pulled=wire.get("bytes_pulled", client.bytes_pulled),
                           bytes_sent=wire.get("bytes_sent", client.bytes_sent),
                           bytes_received=wire.get("bytes_received", client.bytes_received))
        self.metrics.write(self.record)
        self.window.mark(now, tokens)

    # --- after the loop ---------------------------------------------------------------------
    def finish(self) -> dict:
        client, wc, rank = self.client, self.wc, self.rank
        if self.lead:
            self.loop.finish()
            self.host.params_to_device()
            now = time.perf_counter()
            wire, tokens = (self.wire, self.p.tokens) if self.p else ({}, 0)
            self.val = self.record["val_loss"] = evaluate(self.model, self.val_set)
            self._write_line(tokens, wire, now)
            self.task.save(self.out, wc.steps)           # before done: the coordinator may not outlive it
            self.data.tokenizer.save(self.out, model_max_length=self.block_size)
        client.done()
        log.info("finished: %d gradients computed, %d pushes (%d dropped) in %.1f s; waited %.1f s for answers",
                 self.iterations, client.pushes, client.dropped, self.wall_s, client.wait_s)
        if self.tracer.enabled:
            log.info("trace written to %s", self.tracer.save(trace_file(self.out, "worker", rank)))
        result = {"rank": rank, "steps": wc.steps, "mode": self.job_cfg.mode, "iterations": self.iterations,
                  "pushes": client.pushes, "dropped": client.dropped, "wait_s": client.wait_s, **self.times,
                  "wall_s": self.wall_s, "straggler": self.straggler.involves_me, "t_start": self.epoch_start,
                  "t_end": self.epoch_start + self.wall_s, "bytes_pushed": client.bytes_pushed,
                  "bytes_pulled": client.bytes_pulled, "bytes_sent": client.bytes_sent,
                  "bytes_received": client.bytes_received, "joined_at": self.joined, "resends": client.resends,
                  "rejoins": client.rejoins, "shm_pushes": client.shm_pushes}
        if self.lead or wc.out:
            try:                    # a report that cannot be written (a full disk) is not worth the run
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / f"worker-{rank}.json").write_text(json.dumps(result) + "\n")
            except OSError as e:
                log.warning("could not write worker-%d.json in %s: %s", rank, self.out, e)
        if self.lead:
            self.metrics.close()
            if wc.sample_bytes:
                (self.out / "sample.txt").write_text(self.task.demonstrate(self.data.val, wc.sample_bytes,
                                                                           self.data.tokenizer, seed=wc.seed))
            result.update(val_loss=self.val, out=str(self.out))
            log.info("validation loss %.4f; model saved in %s", self.val, self.out)
        return result
