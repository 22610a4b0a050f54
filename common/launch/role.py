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

from common.cluster import ClusterConfig
from common.config import add_arguments, concern_group
from common.launch.launcher_env import derive
from common.launch.options import LaunchConfig, add_job_arguments, role_flags


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
    add_arguments(p, LaunchConfig, "launch", only=("servers",), defaults={"servers": 0},
                  default_text={"servers": "0: PS_NUM_SERVERS, else 1"})
    add_arguments(p, ClusterConfig, "launch", only=("coordinator", "timeout"), defaults={"coordinator": "", "timeout": 0.0},
                  default_text={"coordinator": "'': PS_COORDINATOR, else the first node of the Slurm step and PS_PORT "
                                               "or 5700", "timeout": "0: PS_TIMEOUT, else 60"})
    concern_group(p, "launch").add_argument(
        "--print", action="store_true", dest="show",
        help="print the placement and the command as JSON instead of running it")
    add_job_arguments(p)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, worker_args = parser.parse_known_args(argv)
    try:
        placement = derive(num_servers=args.servers or None, coordinator=args.coordinator)
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
