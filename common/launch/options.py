"""The launchers' own settings, and the flags every launcher splits between the roles.

``ps-local``, ``ps-launch`` (ssh) and ``ps-role`` (Slurm/MPI) make no flag of their own
for what a role already has: ``--steps`` and ``--out`` come from ``RunConfig``
(``common/run.py``), ``--timeout``, ``--curve``, the heartbeats and the address flags
from ``ClusterConfig``, the consistency and wire flags from ``JobConfig``
(``common/cluster.py``), the optimizer's from ``OptimConfig``, ``--checkpoint-every``
and ``--resume`` from ``DurabilityConfig`` (``common/durability.py``), each through
``common/config.py``'s ``add_arguments``. What is left is here: ``LaunchConfig``, how
many processes a launcher starts and how.

Not here: starting anything (``local.py``, ``ssh.py``, ``role.py``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.cluster import JobConfig
from common.config import add_arguments, from_args, to_flags
from common.optim import OptimConfig
from common.run import RunConfig

# The optimizer of the single-process trainer's small GPT (worker/train.py TRAIN_DEFAULTS;
# a test keeps the two equal), so a ps-local run and a ps-train run compare.
OPTIM_DEFAULTS = dict(lr=3e-3, warmup_steps=60, min_lr=3e-4, grad_clip=1.0)
STEPS = 600                         # every launcher's default run: the README's ps-local job


@dataclass
class LaunchConfig:
    """How many processes a launcher starts, and how it starts and watches them."""
    servers: int = 2              # number of server processes S
    workers: int = 2              # number of worker processes W
    port: int = 0                 # the coordinator's port (ps-local: on 127.0.0.1, 0 = a free one; ps-launch: on the first server host)
    threads: int = 0              # BLAS threads per process (0 = the cores divided among the processes, at least 1)
    progress: bool = True         # one progress bar for the job (--no-progress: a line per evaluation)
    trace: bool = False           # every process writes a Chrome trace (trace-server-S.json, trace-worker-R.json), merged into trace.json in the run folder: open it at https://ui.perfetto.dev
    devices: str = ""             # each worker's device, by rank, comma-separated: e.g. cuda:0,cpu,cpu (one CuPy worker and two CPU workers), or one device for all ('' = the workers' --device, cpu)
    respawn: bool = False         # start again a process killed by a signal (kill -9: a crash); a server resumes from its checkpoint (off: the job goes on without a worker, and waits --timeout for a server)

    def __post_init__(self):
        if self.servers < 1 or self.workers < 1 or self.threads < 0:
            raise ValueError(f"need --servers >= 1, --workers >= 1 and --threads >= 0; got {self.servers}, "
                             f"{self.workers}, {self.threads}")


def add_job_arguments(parser: argparse.ArgumentParser):
    """The flags every launcher splits between the roles: steps, consistency, wire, optimizer."""
    add_arguments(parser, RunConfig, "training", only=("steps",), defaults={"steps": STEPS})
    add_arguments(parser, JobConfig, "consistency")
    add_arguments(parser, OptimConfig, "optimizer", defaults=dict(OPTIM_DEFAULTS, lr_decay_steps=None),
                  default_text={"lr_decay_steps": "--steps"})


def role_flags(args: argparse.Namespace, worker_args: list[str]) -> tuple[list[str], list[str]]:
    """(server flags, worker flags) from the parsed job/optimizer flags and the rest;
    raises ValueError on a bad job or optimizer setting."""
    if args.lr_decay_steps is None:              # the cosine ends with the run
        args.lr_decay_steps = args.steps
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    job, optim = from_args(JobConfig, args), from_args(OptimConfig, args)
    return to_flags(job) + to_flags(optim), to_flags(job) + ["--steps", str(args.steps), *worker_args]
