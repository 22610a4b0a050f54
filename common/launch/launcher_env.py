"""Which role this process plays, from the launcher's environment (Slurm, MPI, or PS_*).

Launchers that start one command everywhere (``srun``, ``mpirun``) give each process
a global rank g in 0..N-1 and the world size N. The rule, the same under every
launcher: with S servers, ranks 0..S-1 are servers 0..S-1 and ranks S..N-1 are
workers 0..N-S-1. Server 0, the coordinator, is therefore global rank 0: under Slurm
it runs on the first node of the step's node list, which is how every process can
name the coordinator before anything has started.

Where the global rank comes from, first found wins:

| source   | rank                   | size                   | node name          |
|----------|------------------------|------------------------|--------------------|
| explicit | PS_GLOBAL_RANK         | PS_WORLD_SIZE          | hostname           |
| Open MPI | OMPI_COMM_WORLD_RANK   | OMPI_COMM_WORLD_SIZE   | hostname           |
| MPICH/PMI| PMI_RANK               | PMI_SIZE               | hostname           |
| Slurm    | SLURM_PROCID           | SLURM_NTASKS           | SLURMD_NODENAME    |

MPI comes before Slurm because ``mpirun`` inside an allocation inherits the batch
script's ``SLURM_PROCID`` (always 0). The coordinator is ``--coordinator`` /
``PS_COORDINATOR`` if given, else, under Slurm, the first host of
``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) with port ``PS_PORT`` (5700).
Under MPI there is no node list, so PS_COORDINATOR must be set.

Not here: starting the role (``common/launch/role.py`` execs ``python -m paramserver`` or
``python -m worker``); the rank a worker gets is still confirmed by the coordinator.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass

DEFAULT_PORT = 5700
SOURCES = (("explicit", "PS_GLOBAL_RANK", "PS_WORLD_SIZE"),
           ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
           ("pmi", "PMI_RANK", "PMI_SIZE"),
           ("slurm", "SLURM_PROCID", "SLURM_NTASKS"))


@dataclass
class Placement:
    role: str            # "server" or "worker"
    rank: int            # rank among its role
    global_rank: int     # g in 0..world_size-1
    world_size: int      # N = S + W
    num_servers: int     # S
    num_workers: int     # W
    coordinator: str     # HOST:PORT of server 0
    node: str            # this node's name (SLURMD_NODENAME under Slurm: every netns host says "vm")
    source: str          # which launcher's variables gave the rank

    def to_dict(self) -> dict:
        return asdict(self)


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compact host list -> host names: ``psh[1-3],gpu[01-02,7],login`` ->
    psh1 psh2 psh3 gpu01 gpu02 gpu7 login (zero padding kept, as Slurm does)."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", spec):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"cannot read the host list {spec!r} (range {r!r})")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    return hosts


def _int(env, name):
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"environment variable {name}={env[name]!r} is not an integer") from None


def derive(env=None, num_servers: int | None = None, num_workers: int | None = None,
           coordinator: str = "") -> Placement:
    """This process's placement from ``env`` (default ``os.environ``); raises
    ``ValueError`` saying which variable is missing or inconsistent."""
    env = os.environ if env is None else env
    for source, rank_var, size_var in SOURCES:
        if rank_var in env:
            break
    else:
        raise ValueError("no global rank in the environment: start this under srun or mpirun, or set "
                         "PS_GLOBAL_RANK and PS_WORLD_SIZE (looked for "
                         + ", ".join(r for _, r, _ in SOURCES) + ")")
    if size_var not in env:
        raise ValueError(f"{rank_var} is set but {size_var} is not")
    g, n = _int(env, rank_var), _int(env, size_var)
    S = num_servers if num_servers is not None else (_int(env, "PS_NUM_SERVERS") if "PS_NUM_SERVERS" in env else 1)
    W = num_workers if num_workers is not None else (_int(env, "PS_NUM_WORKERS") if "PS_NUM_WORKERS" in env else n - S)
    if not 0 <= g < n:
        raise ValueError(f"{rank_var}={g} is outside 0..{n - 1} ({size_var}={n})")
    if S < 1 or W < 1 or S + W != n:
        raise ValueError(f"{n} processes ({size_var}) cannot hold {S} server(s) and {W} worker(s): "
                         "need S >= 1, W >= 1 and S + W equal to the number of processes")
    node = env.get("SLURMD_NODENAME", "") if source == "slurm" else ""
    node = node or socket.gethostname()
    coord = coordinator or env.get("PS_COORDINATOR", "")
    if not coord:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError(f"no coordinator address: set PS_COORDINATOR=HOST:PORT (the host of global rank 0; "
                             f"{source} gives no node list)")
        port = _int(env, "PS_PORT") if "PS_PORT" in env else DEFAULT_PORT
        coord = f"{expand_hostlist(nodelist)[0]}:{port}"
    role, rank = ("server", g) if g < S else ("worker", g - S)
    return Placement(role, rank, g, n, S, W, coord, node, source)
