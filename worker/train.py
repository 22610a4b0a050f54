"""Train a GPT on one process: the reference loop, readable top to bottom (nanoGPT's shape).

    python -m worker.train                      # ~1 minute on 2 cores, built-in corpus
    python -m worker.train --help               # every flag, grouped by concern
    python -m worker.train --resume runs/X --steps 2000   # continue a run exactly

One step: zero the gradients, forward and backward on a batch, clip by global norm,
optimizer update at the scheduled learning rate. Every ``eval_interval`` steps the
loss on a fixed validation set; every ``log_interval`` steps a JSON line in
``metrics.jsonl``; a checkpoint (``worker/model_checkpoint.py``) every ``ckpt_interval``
steps and at the end. The run folder also holds ``run_config.json`` (the effective
configuration) so ``--resume`` rebuilds the same run: same model, optimizer state,
data order, hence the same loss curve as a run that never stopped.

After the weights are drawn from ``seed``, the only randomness is the data order, and
the sampler's state is in the checkpoint: there is no other random generator to save
(no dropout).

The pieces a distributed worker reuses are plain functions: ``compute_gradients``,
``apply_update``, ``train_step``, ``evaluate`` (and ``worker/metrics.py``). The distributed
loop itself (pull, push, servers) lives in the worker's PS client, not here.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy
from tqdm import tqdm

from common.config import (add_arguments, concern_group, describe, dump_json, from_args, given_flags, read_config,
                           sections_argv, to_dict)
from common.run import RunConfig
from common.optim import OptimConfig, clip_scale, lr_at, make_optimizer, sum_of_squares
from worker import backend
from worker import model_checkpoint as checkpoint
from worker.backend import check_device
from worker.data import (BatchSampler, DataConfig, bigram_entropy, data_tokenizer, load_data,
                         unigram_entropy, validation_batches)
from worker.deviceoptim import DeviceOptimizer
from worker.kernels.halfs import PRECISIONS
from worker.metrics import METRICS, MetricsWriter, ThroughputWindow, crossed
from worker.model import GPT, GPTConfig
from worker.pretrained import load_init, resolve_shape

RUN_CONFIG = "run_config.json"


@dataclass
class TrainConfig(RunConfig):
    """A run on one process: the shared run settings (common/run.py) and how it checkpoints."""
    ckpt_interval: int = 0        # checkpoint every this many steps (0 = only at the end)
    resume: str = ""              # run folder to continue from its checkpoint
    progress: bool = True         # show a tqdm progress bar (off: a line per log step)
    CHOICES = {"precision": PRECISIONS}

    def __post_init__(self):
        super().__post_init__()
        check_device(self.device, self.precision)
        if self.ckpt_interval < 0:
            raise ValueError(f"ckpt_interval must be >= 0, got {self.ckpt_interval}")


# Defaults of the single-process run, chosen to learn visibly in about a minute on two
# cores; they override the dataclasses' defaults for this command only.
# --lr-decay-steps, unless given, follows --steps (the cosine ends with the run).
# vocab_size 0: the data's tokenizer's (worker/pretrained.py).
TRAIN_DEFAULTS = dict(vocab_size=0, block_size=64, n_layer=3, n_head=4, n_embd=96,
                      lr=3e-3, warmup_steps=60, min_lr=3e-4, grad_clip=1.0)
# ps-train's run is longer than a worker's and looks less often (RunConfig's defaults are the worker's).
TRAIN_RUN_DEFAULTS = dict(steps=800, eval_interval=100, log_interval=10)


# --- one step, reusable by the distributed worker ----------------------------------------

def compute_gradients(model: GPT, idx, targets) -> float:
    """Zero ``model.grads``, then forward and backward on one batch; return its loss."""
    model.zero_grad()
    loss = model.forward(idx, targets)
    model.backward()
    return loss


def apply_update(model: GPT, optimizer, cfg: OptimConfig, step: int) -> tuple[float, float]:
    """Clip ``model.grads`` by global norm and take optimizer step number ``step`` (0-based).
    Return (learning rate, gradient norm before clipping)."""
    norm = math.sqrt(sum_of_squares(model.grads))
    lr = lr_at(cfg, step)
    optimizer.step(model.params, model.grads, lr, clip_scale(norm, cfg.grad_clip))
    return lr, norm


def train_step(model: GPT, optimizer, cfg: OptimConfig, step: int, idx, targets) -> dict:
    """One full step on one process: gradients, clip, update."""
    loss = compute_gradients(model, idx, targets)
    lr, norm = apply_update(model, optimizer, cfg, step)
    return {"loss": loss, "lr": lr, "grad_norm": norm}


def evaluate(model: GPT, batches) -> float:
    """Mean loss over a fixed list of (idx, targets) batches; touches no gradient."""
    return float(numpy.mean([model.forward(idx, targets) for idx, targets in batches]))


# --- configuration ---------------------------------------------------------------------

CONCERNS = {"model": GPTConfig, "optim": OptimConfig, "data": DataConfig, "train": TrainConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ps-train", description="Train a GPT-2 on one process (the reference "
        "loop of the parameter-server workers). With no --data it trains on this Python's "
        "standard-library sources as bytes: no download; --data FOLDER made by ps-prepare "
        "trains on its tokens (e.g. a BPE), the vocabulary following its tokenizer.",
        epilog="Writes run_config.json, metrics.jsonl and a GPT-2 checkpoint (model.safetensors, "
               "config.json, tokenizer.json) into the run folder; sample from it with scripts/generate.py.")
    add_arguments(parser, GPTConfig, "model", defaults=TRAIN_DEFAULTS,
                  default_text={"vocab_size": "0: the tokenizer's"})
    add_arguments(parser, DataConfig, "data")
    add_arguments(parser, TrainConfig, "training", defaults=TRAIN_RUN_DEFAULTS)
    add_arguments(parser, OptimConfig, "optimizer", defaults=TRAIN_DEFAULTS,
                  default_text={"lr_decay_steps": "--steps"})
    concern_group(parser, "training").add_argument(
        "--config", default="", metavar="FILE",
        help="start from the settings of a saved run_config.json (or its run folder) to repeat that run "
             "exactly; a flag typed beside --config overrides the file's value. The run folder is not taken "
             "from the file: give --out (default: runs/<timestamp>)")
    return parser


# keys of a saved run_config.json never taken from it: the run folder (``out_dir`` in files
# written before the run folder was named ``out`` everywhere) and what --resume names
NOT_REPLAYED = ("out", "out_dir", "resume")


def parse_configs(argv=None) -> dict:
    """{"model", "optim", "data", "train"} configs from the command line. With ``--config``
    FILE, or ``--resume`` DIR (its run_config.json, which may not then change the model or
    the data), the saved run's configuration, overridden by the flags typed."""
    typed = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(typed)
    source = args.resume or args.config
    argv = typed
    if source:
        try:
            saved = read_config(source)
            argv = sections_argv(parser, saved, CONCERNS, CONCERNS, source, ignore=NOT_REPLAYED) + typed
        except ValueError as e:
            parser.error(f"{e}; is it a ps-train run folder?" if args.resume else str(e))
        args = parser.parse_args(argv)
    given = given_flags(build_parser, argv)
    if "lr_decay_steps" not in given:
        args.lr_decay_steps = args.steps
    if args.resume and "out" not in given_flags(build_parser, typed):
        args.out = args.resume
    try:
        resolve_shape(args, given, data_tokenizer(from_args(DataConfig, args)).vocab_size)
        configs = {k: from_args(cls, args) for k, cls in CONCERNS.items()}
    except ValueError as e:           # (a CheckpointError or DataError too)
        parser.error(str(e))
    if args.resume:
        changed = [k for key in ("model", "data") for k, v in to_dict(configs[key]).items()
                   if saved.get(key, {}).get(k) != v]
        if changed:
            parser.error(f"--resume cannot change the model or the data: {changed}")
    return configs


# --- the loop --------------------------------------------------------------------------

def main(argv=None):
    """``ps-train``: parse the command line, train, exit 0."""
    configs = parse_configs(argv)
    try:
        backend.probe(configs["train"].device)     # --device cuda where it cannot run: say why, now
    except backend.BackendError as e:
        raise SystemExit(f"ps-train: {e}") from None
    train(configs)


def train(configs: dict) -> dict:
    """Run the loop for ``{"model", "optim", "data", "train"}`` configs; return the final
    figures (out, val_loss, unigram_entropy, bigram_entropy, step)."""
    mc, oc, dc, tc = configs["model"], configs["optim"], configs["data"], configs["train"]
    out = Path(tc.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    tc.out = str(out)
    print(describe(configs))

    # data: this process is worker 0 of 1, so it trains on every training document
    data = load_data(dc, rank=0, num_workers=1, seed=tc.seed)
    print(data.summary)
    V = data.tokenizer.vocab_size
    if mc.vocab_size < V:
        raise SystemExit(f"--vocab-size {mc.vocab_size}: the data's tokenizer has {V} tokens")
    sampler = BatchSampler(data.train, tc.batch_size, mc.block_size, seed=tc.seed)
    val_set = validation_batches(data.val, tc.batch_size, mc.block_size, tc.eval_batches)
    entropy, entropy2 = unigram_entropy(data.train, V), bigram_entropy(data.train, V)
    model, optimizer = make_model(mc, oc, tc)
    if tc.init_from and not tc.resume:
        load_init(model, tc.init_from)
        print(f"weights from {tc.init_from}")
    print(f"model: {model.num_params():,} parameters, layout {model.layout.hash()}; "
          f"entropy of the training tokens: unigram {entropy:.4f} nats, bigram {entropy2:.4f} "
          f"(uniform: {math.log(V):.4f})")
    start = time.perf_counter()
    step, elapsed0 = resume(tc, oc, model, optimizer, sampler) if tc.resume else (0, 0.0)
    (out / RUN_CONFIG).write_text(dump_json(configs) + "\n")
    data.tokenizer.save(out, model_max_length=mc.block_size)     # beside the model: HF loads both
    metrics = MetricsWriter(out / METRICS, keep_until=step)
    if step == 0:
        metrics.write(dict(step=step, fingerprint=data.fingerprint, unigram_entropy=entropy,
                           bigram_entropy=entropy2, bytes_per_token=data.bytes_per_token,
                           val_loss=evaluate(model, val_set)))

    def elapsed():                 # wall time of the run, over every resume
        return elapsed0 + time.perf_counter() - start

    def save(step):
        checkpoint.save_model(out, model, step)
        checkpoint.save_trainer_state(out, step, optimizer.state_dict(), {
            "sampler": sampler.state_dict(), "elapsed_s": elapsed(), "optimizer_name": oc.optimizer,
            "data_fingerprint": data.fingerprint})

    step = train_steps(model, optimizer, configs, sampler, val_set, step, metrics, elapsed, save)
    save(step)
    metrics.close()
    val = evaluate(model, val_set)
    print(f"final validation loss {val:.4f} nats vs unigram entropy {entropy:.4f} nats of the training "
          f"tokens ({val - entropy:+.4f}); bigram {entropy2:.4f}, uniform {math.log(V):.4f}; "
          f"{val / math.log(2) / data.bytes_per_token:.4f} bits per byte")
    print(f"checkpoint: {out}/{checkpoint.MODEL_FILE}; sample: python scripts/generate.py {out}")
    return {"out": str(out), "val_loss": val, "unigram_entropy": entropy,
            "bigram_entropy": entropy2, "step": step}


def make_model(mc: GPTConfig, oc: OptimConfig, tc: TrainConfig):
    """The GPT and its optimizer, where the run computes."""
    model = GPT(mc, seed=tc.seed, threads=tc.threads, device=tc.device, precision=tc.precision)
    if model.xp is numpy:
        optimizer = make_optimizer(oc, model.num_params(), model.dtype, model.layout.decay_ranges(),
                                   threads=tc.threads)
    else:                          # on a GPU, the optimizer steps where the parameters are
        optimizer = DeviceOptimizer(model.xp, oc, model.num_params(), model.dtype, model.layout.decay_ranges())
    return model, optimizer


def resume(tc: TrainConfig, oc: OptimConfig, model, optimizer, sampler) -> tuple[int, float]:
    """Load ``tc.resume``'s checkpoint into the model, optimizer and sampler; (step, elapsed_s)."""
    checkpoint.load_model_into(model, tc.resume)
    st = checkpoint.load_trainer_state(tc.resume, expected_size=model.num_params())
    if st["state"].get("optimizer_name") != oc.optimizer:
        raise SystemExit(f"--resume: the checkpoint's optimizer is {st['state'].get('optimizer_name')}, "
                         f"not {oc.optimizer}")
    optimizer.load_state_dict(st["optimizer"])
    sampler.load_state_dict(st["state"]["sampler"])
    print(f"resumed from {tc.resume} at step {st['step']}")
    return st["step"], float(st["state"]["elapsed_s"])


def train_steps(model, optimizer, configs: dict, sampler, val_set, step: int, metrics, elapsed, save) -> int:
    """Steps from ``step`` to the run's end: batch, train_step, log and evaluate, checkpoint."""
    mc, oc, tc = configs["model"], configs["optim"], configs["train"]
    bar = None
    if tc.progress:
        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    tokens_per_step = tc.batch_size * mc.block_size
    window, compute_s = ThroughputWindow(), 0.0        # throughput over compute time, since the last line
    window.mark(0.0, step * tokens_per_step)
    while step < tc.steps:
        idx, targets = sampler.next_batch()
        t0 = time.perf_counter()
        last = train_step(model, optimizer, oc, step, idx, targets)
        compute_s += time.perf_counter() - t0
        step += 1
        tps = window.rate(compute_s, step * tokens_per_step)
        record = {"step": step, "loss": last["loss"], "lr": last["lr"], "grad_norm": last["grad_norm"]}
        if crossed(tc.eval_interval, step - 1, step) or step == tc.steps:
            record["val_loss"] = evaluate(model, val_set)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"loss {last['loss']:.3f} {tps:,.0f} tok/s"
                                + (f" val {record['val_loss']:.3f}" if "val_loss" in record else ""),
                                refresh=False)
        if crossed(tc.log_interval, step - 1, step) or "val_loss" in record:
            record.update(tokens_per_s=tps, elapsed_s=elapsed())
            metrics.write(record)
            window.mark(compute_s, step * tokens_per_step)
            if bar is None:
                print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()),
                      flush=True)
        if tc.ckpt_interval and step % tc.ckpt_interval == 0 and step < tc.steps:
            save(step)
    if bar is not None:
        bar.close()
    return step


if __name__ == "__main__":
    main()
