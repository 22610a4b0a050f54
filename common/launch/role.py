"""``ps-role``: one command for every process of a job; the role comes from the global rank.

Under ``srun`` or ``mpirun`` every process runs the same command line. ``ps-role``
reads the global rank from the launcher's variables (``common/launch/launcher_env.py``: ranks
0..S-1 are servers, the rest workers) and replaces itself (``exec``) with exactly the
command a user would type for that role:

    python -m paramserver --rank s --num-servers S --num-workers W --coordinator HOST:PORT [optimizer]
    python -m worker      --rank w --num-servers S --num-workers W --coordinator HOST:PORT [model, data...]

so signals from Slurm or mpirun reach the role itself. Flags are split as in
``ps-local``: optimizer flags go to the servers, job flags to everyone, every other
flag to the workers (checked there). ``--print`` shows the placement and the command
without running it (what a test or a puzzled user wants).

    srun -n 4 ps-role --servers 1 --steps 100 --out runs/x
    PS_COORDINATOR=node1:5700 mpirun -n 4 ps-role --servers 1 --steps 100

Not here: the rules for the rank (``common/launch/launcher_env.py``), the roles themselves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from common.cluster import JobConfig
from common.config import add_arguments, from_args, to_dict
from common.launch.local import OPTIM_DEFAULTS     # ps-local's (= ps-train's): every launcher trains the same job
from common.optim import OptimConfig
from common.launch.launcher_env import derive


def add_job_arguments(parser: argparse.ArgumentParser):
    """The flags every launcher splits between the roles: steps, job, optimizer."""
    parser.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    add_arguments(parser, JobConfig, "consistency (every process)")
    add_arguments(parser, OptimConfig, "optimizer (servers)", defaults=dict(OPTIM_DEFAULTS, lr_decay_steps=None),
                  default_text={"lr_decay_steps": "--steps"})


def flags(cfg) -> list[str]:
    out = []
    for k, v in to_dict(cfg).items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def role_flags(args: argparse.Namespace, worker_args: list[str]) -> tuple[list[str], list[str]]:
    """(server flags, worker flags) from the parsed job/optimizer flags and the rest;
    raises ValueError on a bad job or optimizer setting."""
    if args.lr_decay_steps is None:              # the cosine ends with the run
        args.lr_decay_steps = args.steps
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    job, optim = from_args(JobConfig, args), from_args(OptimConfig, args)
    return flags(job) + flags(optim), flags(job) + ["--steps", str(args.steps), *worker_args]


def command(placement, server_flags, worker_flags, timeout=None, python=None) -> list[str]:
    """The role's command line for ``placement``."""
    py = python or sys.executable
    common = ["--rank", str(placement.rank), "--num-servers", str(placement.num_servers),
              "--num-workers", str(placement.num_workers), "--coordinator", placement.coordinator]
    if timeout:
        common += ["--timeout", str(timeout)]
    if placement.role == "server":
        return [py, "-m", "paramserver", *common, *server_flags]
    return [py, "-m", "worker", *common, *worker_flags, "--no-progress"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ps-role", allow_abbrev=False,
        description="Start this process's role of a job launched by srun or mpirun: global rank g < S is "
                    "server g, the others are workers. Flags not listed here go to the workers "
                    "(`python -m worker --help`).")
    p.add_argument("--servers", type=int, default=None,
                   help="S, the number of servers (default: PS_NUM_SERVERS, else 1)")
    p.add_argument("--coordinator", default="",
                   help="HOST:PORT of server 0 (default: PS_COORDINATOR, else the first node of the Slurm step "
                        "and PS_PORT or 5700)")
    p.add_argument("--timeout", type=float, default=None, help="seconds any wait may last (default: PS_TIMEOUT or 60)")
    p.add_argument("--print", action="store_true", dest="show",
                   help="print the placement and the command as JSON instead of running it")
    add_job_arguments(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, worker_args = parser.parse_known_args(argv)
    try:
        placement = derive(num_servers=args.servers, coordinator=args.coordinator)
        server_flags, worker_flags = role_flags(args, worker_args)
    except ValueError as e:
        print(f"ps-role: {e}", file=sys.stderr)
        return 2
    cmd = command(placement, server_flags, worker_flags, args.timeout)
    if args.show:
        print(json.dumps(dict(placement.to_dict(), command=cmd)))
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)          # the role replaces us: the launcher's signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
