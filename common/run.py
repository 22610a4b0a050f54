"""The run: how long to train, how often to look, where to write, where to compute.

The settings that the single-process trainer (``ps-train``: ``TrainConfig`` in
``worker/train.py``) and a distributed worker (``python -m worker``: ``WorkerConfig`` in
``worker/distributed.py``) share, defined once: each of those is a ``RunConfig`` with
its own fields added. The launchers take ``--steps`` and ``--out`` from here too, so a
flag means the same in every command, and the run folder has one name: ``out``.

Not here: whether a device can be used here (``worker/backend.py``, checked by the
configs that add these fields), the loops.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunConfig:
    """How long to train, how often to look, where to write, where to compute."""
    batch_size: int = 16          # sequences per step on this process (a distributed job's batch is W times this)
    steps: int = 300              # optimizer steps of the run (a resumed run continues up to this); asp/ssp: the job's pushes / W (a fast worker pushes more)
    eval_interval: int = 50       # validation loss every this many steps, and at the end (distributed: worker 0)
    eval_batches: int = 8         # batches in the fixed validation set
    log_interval: int = 5         # a metrics.jsonl line every this many steps (distributed: worker 0)
    seed: int = 0                 # seeds the initial weights (distributed: worker 0's are used), the data order and the random shards
    out: str = ""                 # the run folder: run_config.json, metrics, the model, a sample, each server's server-S.json and checkpoints ('' = runs/<timestamp>; a server started by hand: none)
    threads: int = 1              # compute threads: slices of each batch in parallel; with OPENBLAS_NUM_THREADS=1, use one per core
    device: str = "cpu"           # where it computes: cpu (NumPy), cuda or cuda:N (the CUDA kernels of worker/kernels/ on that GPU, the optimizer too in ps-train; ps-local --devices gives each worker its own)
    precision: str = "fp32"       # with --device cuda: fp32, or bf16 / fp16 activations and matmuls (float32 parameters, gradients and optimizer state)
    init_from: str = ""           # a Hugging Face GPT-2 folder (config.json + model.safetensors) whose shape and weights the run starts from (distributed: worker 0's seed the servers; '' = random init from seed)

    def __post_init__(self):
        for name in ("batch_size", "steps", "eval_interval", "eval_batches", "log_interval", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
