"""The distributed worker: the single-process loop with the optimizer moved to the servers.

One worker, top to bottom:

    register with the coordinator          -> rank r, the servers, who owns which chunk
    load data shard r of W                 (worker/data.py)
    worker 0: init the servers             with its freshly initialised parameters
    pull                                   params <- the servers
    repeat for each step t:
        forward + backward on a batch      grads (this worker's shard of the batch)
        push grads, get params back        BSP: the servers average over every worker,
                                           step the optimizer, answer with fresh params
        worker 0: log, evaluate
    done                                   the coordinator stops the servers after the last worker
    worker 0: save model.safetensors, sample text

Compare with ``worker/train.py``: the loop is the same, except that
``apply_update(model, optimizer, ...)`` became ``client.push_pull(grads, params, ...)``.
``--model`` chooses what is learned (``worker/tasks.py``: the GPT, or the BERT-style
encoder on masked bytes); ``--trace`` records the loop's spans (``common/trace.py``).

Not here: sockets or bytes (``worker/client.py`` and ``common/``), the layers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from common.cluster import ClusterConfig, JobConfig
from common.trace import NULL_TRACER, Tracer, trace_file
from worker.client import PSClient
from worker.data import BatchSampler, DataConfig, load_data, unigram_entropy, validation_batches
from worker.model import GPTConfig
from worker.tasks import MODELS, make_task
from worker.train import METRICS, MetricsWriter, evaluate

log = logging.getLogger("worker")


@dataclass
class WorkerConfig:
    """How a worker trains (every worker of a job should get the same values)."""
    batch_size: int = 16          # sequences per step on THIS worker (the job's batch is W times this)
    steps: int = 300              # training steps (BSP: every worker takes the same number)
    eval_interval: int = 50       # worker 0: validation loss every this many steps (and at the end)
    eval_batches: int = 8         # batches in the fixed validation set
    log_interval: int = 5         # worker 0: a metrics.jsonl line every this many steps
    seed: int = 0                 # seeds the initial weights (worker 0's are used) and the data order
    out: str = ""                 # run folder for worker 0's metrics, model and sample ('' = runs/<timestamp>)
    sample_bytes: int = 300       # worker 0: bytes of text to sample from the final model (0 = none)
    model: str = "gpt"            # gpt: next byte, causal attention | bert: 15% of the bytes masked, bidirectional
    trace: bool = False           # write a Chrome trace of this worker (trace-worker-R.json in the run folder)
    CHOICES = {"model": MODELS}

    def __post_init__(self):
        for name in ("batch_size", "steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_bytes < 0:
            raise ValueError(f"sample_bytes must be >= 0, got {self.sample_bytes}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)}, got {self.model!r}")


def run(cluster: ClusterConfig, job: JobConfig, mc: GPTConfig, dc: DataConfig, wc: WorkerConfig) -> dict:
    client = PSClient(cluster, job)
    try:
        return _run(client, cluster, mc, dc, wc)
    finally:
        client.close()


def _run(client: PSClient, cluster: ClusterConfig, mc: GPTConfig, dc: DataConfig, wc: WorkerConfig) -> dict:
    task = make_task(wc.model, mc, seed=wc.seed)
    model = task.model
    t_register = time.perf_counter()
    job = client.register(model.layout, model.dtype.name)
    rank, W = client.rank, job["num_workers"]
    log.info("rank %d of %d; %d parameters over %d server(s); registration took %.1f s",
             rank, W, model.num_params(), job["num_servers"], time.perf_counter() - t_register)

    data = load_data(dc, rank=rank, num_workers=W, seed=wc.seed)
    log.info("%s", data.summary)
    sampler = task.batches(BatchSampler(data.train, wc.batch_size, mc.block_size, seed=wc.seed * 7919 + rank),
                           seed=wc.seed * 7919 + rank)
    lead = rank == 0
    out = Path(wc.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    tracer = client.tracer = Tracer(f"worker {rank}") if wc.trace else NULL_TRACER
    if lead:
        client.init(model.params)
    client.pull(model.params)

    metrics = val_set = None
    if lead:
        out.mkdir(parents=True, exist_ok=True)
        val_set = task.validation(validation_batches(data.val, wc.batch_size, mc.block_size, wc.eval_batches))
        metrics = MetricsWriter(out / METRICS, keep_until=-1)    # a fresh file: keep no old line
        metrics.write({"step": 0, "val_loss": evaluate(model, val_set), "workers": W,
                       "servers": job["num_servers"], "unigram_entropy": unigram_entropy(data.train),
                       "fingerprint": data.fingerprint})

    t_start = time.perf_counter()
    window_t, window_tokens, val = t_start, 0, float("nan")
    for step in range(wc.steps):
        t_step = tracer.now()
        idx, targets = sampler.next_batch()
        with tracer.span("forward", step=step):
            model.zero_grad()
            loss = model.forward(idx, targets)
        with tracer.span("backward", step=step):
            model.backward()
        reply = client.push_pull(model.grads, model.params, step, loss=loss, tokens=idx.size)
        tracer.add("step", t_step, tracer.now(), step=step)
        done = step + 1
        window_tokens += reply.get("stats", {}).get("tokens", idx.size * W)
        if not lead:
            continue
        record = {"step": done, "loss": reply.get("loss", loss)}
        if done % wc.eval_interval == 0 or done == wc.steps:
            with tracer.span("evaluate", step=step):
                val = record["val_loss"] = evaluate(model, val_set)
        if done % wc.log_interval == 0 or "val_loss" in record:
            now = time.perf_counter()
            stats = reply.get("stats", {})
            record.update(tokens_per_s=window_tokens / max(now - window_t, 1e-9), elapsed_s=now - t_start,
                          bytes_pushed=stats.get("bytes_pushed", client.bytes_pushed),
                          bytes_pulled=stats.get("bytes_pulled", client.bytes_pulled))
            metrics.write(record)
            window_t, window_tokens = now, 0

    client.done()
    log.info("finished %d steps in %.1f s", wc.steps, time.perf_counter() - t_start)
    if tracer.enabled:
        log.info("trace written to %s", tracer.save(trace_file(out, "worker", rank)))
    result = {"rank": rank, "steps": wc.steps}
    if lead:
        metrics.close()
        task.save(out, wc.steps)
        if wc.sample_bytes:
            (out / "sample.txt").write_text(task.demonstrate(data.val, wc.sample_bytes, seed=wc.seed))
        result.update(val_loss=val, out=str(out))
        log.info("validation loss %.4f; model saved in %s", val, out)
    return result

