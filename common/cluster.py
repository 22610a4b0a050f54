"""Where a process sits in the job: role, rank, sizes, addresses, deadlines.

Every role is started by the same kind of command (``python -m paramserver`` or
``python -m worker``) with these flags, or with the environment variables named
below, so that a launcher (``ps-local``, Slurm, ssh, mpirun) only has to fill them in.
Flags win over the environment, the environment over the defaults.

| flag              | variable        | meaning                                             |
|-------------------|-----------------|-----------------------------------------------------|
| --rank            | PS_RANK         | rank among its role; -1 lets the coordinator choose |
| --num-servers     | PS_NUM_SERVERS  | S, the number of servers                            |
| --num-workers     | PS_NUM_WORKERS  | W, the number of workers                            |
| --coordinator     | PS_COORDINATOR  | HOST:PORT of server 0, the one address known first  |
| --bind            | PS_BIND         | where a server listens (tcp://*:PORT)               |
| --advertise       | PS_ADVERTISE    | the address peers use to reach that server          |
| --interface       | PS_INTERFACE    | advertise this interface's address (eth0, ib0)      |
| --subnet          | PS_SUBNET       | advertise this host's address inside this subnet    |
| --timeout         | PS_TIMEOUT      | seconds any wait may last before it fails           |
| --curve           | PS_CURVE        | CurveZMQ key folder (ps-keys): encrypt, authenticate |
| --heartbeat       | PS_HEARTBEAT    | seconds between heartbeats to the coordinator (0 off) |
| --heartbeat-misses| PS_HEARTBEAT_MISSES | heartbeats a worker may miss before it is dropped |

Bind and advertise are separate on purpose: in a container or behind NAT a server
listens on ``tcp://*:PORT`` (or the container's address) while peers must dial the
host's address. The advertised address is, in order: ``--advertise``; the address on
``--interface`` and/or inside ``--subnet`` (``common/wire/addresses.py``); the address of
the interface on the route to the coordinator.

Also here: ``JobConfig``, the settings every process of a job must share (the
coordinator refuses a process whose settings differ), and the default advertised
address: the address of this host's interface on the route to the coordinator.
"""
from __future__ import annotations

import argparse
import os
import socket
import typing
from dataclasses import dataclass

from common.wire.compress import SCHEMES
from common.wire.pull_compress import PULL_SCHEMES
from common.config import add_arguments
from common.optim import OptimConfig
from common.wire.addresses import pick_address
from common.placement import DEFAULT_CHUNK_MB

ENV = {"rank": "PS_RANK", "num_servers": "PS_NUM_SERVERS", "num_workers": "PS_NUM_WORKERS",
       "coordinator": "PS_COORDINATOR", "bind": "PS_BIND", "advertise": "PS_ADVERTISE",
       "timeout": "PS_TIMEOUT", "interface": "PS_INTERFACE", "subnet": "PS_SUBNET", "curve": "PS_CURVE",
       "heartbeat": "PS_HEARTBEAT", "heartbeat_misses": "PS_HEARTBEAT_MISSES", "shm": "PS_SHM"}

MODES = ("bsp", "asp", "ssp", "local-sgd", "diloco")
OUTER_OPTIMIZERS = ("nesterov", "sgd")


@dataclass
class ClusterConfig:
    """This process's place in the job (flags or PS_* environment variables)."""
    FLAG_GROUPS = {"wire": ("curve", "ipc", "shm"), "failures": ("timeout", "heartbeat", "heartbeat_misses")}
    CHOICES = {"shm": ("auto", "off")}
    rank: int = -1                          # rank among its role (-1: the coordinator assigns one; server 0 is the coordinator)
    num_servers: int = 1                    # S, the number of server processes
    num_workers: int = 1                    # W, the number of worker processes
    coordinator: str = "127.0.0.1:5700"     # HOST:PORT of server 0, where every process registers
    bind: str = ""                          # servers: where to listen, e.g. tcp://*:5701 ('' = the coordinator's port on server 0, any free port elsewhere)
    advertise: str = ""                     # servers: the address peers connect to ('' = this host's address on the route to the coordinator, with the bound port)
    timeout: float = 60.0                   # seconds any wait (registration, a step, a reply) may last before it fails naming who is missing
    interface: str = ""                     # servers: advertise the address of this network interface (e.g. eth0, ib0) instead of the route's
    subnet: str = ""                        # servers: advertise this host's address inside this subnet (e.g. 10.0.0.0/24)
    curve: str = ""                         # folder of CurveZMQ keys made by ps-keys: every socket encrypted and authenticated ('' = plain TCP)
    ipc: bool = True                        # a server advertised on 127.0.0.1 also listens on a Unix socket, which processes of its host use instead of TCP
    heartbeat: float = 1.0                  # seconds between the heartbeats every process sends the coordinator (0 = none: a dead worker is then only noticed by the step deadline)
    heartbeat_misses: int = 5               # a worker silent for this many heartbeats is dropped from the job, and the steps go on without it
    shm: str = "auto"                       # auto: a worker and a server of one host (reached through its Unix socket) move array bytes through shared memory under /dev/shm, the message carries the header only (not with --curve: a segment is not encrypted); off: every byte through the socket

    @property
    def silence_s(self) -> float:
        """How long a silent peer is given before it counts as gone (heartbeats * misses)."""
        return self.heartbeat * self.heartbeat_misses if self.heartbeat > 0 else float("inf")

    def __post_init__(self):
        if self.num_servers < 1 or self.num_workers < 1:
            raise ValueError(f"need at least one server and one worker, got S={self.num_servers}, "
                             f"W={self.num_workers}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.shm not in self.CHOICES["shm"]:
            raise ValueError(f"shm must be one of {', '.join(self.CHOICES['shm'])}, got {self.shm!r}")
        if self.heartbeat < 0 or self.heartbeat_misses < 1:
            raise ValueError(f"need heartbeat >= 0 s and heartbeat_misses >= 1, got {self.heartbeat}, "
                             f"{self.heartbeat_misses}")

    @property
    def use_shm(self) -> bool:
        """Shared memory with the processes of this host (--shm auto, and no CurveZMQ)."""
        return self.shm == "auto" and not self.curve

    def curve_keys(self):
        """The CurveZMQ keys of ``--curve``, or None without it."""
        if not self.curve:
            return None
        from common.wire.transport import Curve
        return Curve(self.curve)


@dataclass
class JobConfig:
    """Settings every process of the job must share (checked at registration).

    The consistency models (``paramserver/modes.py`` for the servers' side,
    ``worker/mode_loops.py`` for the workers'; docs/consistency.md for the lesson)."""
    CHOICES = {"mode": MODES, "compress": SCHEMES, "error_feedback": ("on", "off"),
               "outer_optimizer": OUTER_OPTIMIZERS, "compress_pull": PULL_SCHEMES}
    FLAG_GROUPS = {"wire": ("chunk_mb", "compress", "compress_ratio", "error_feedback", "compress_momentum",
                            "compress_pull", "compress_pull_ratio"),
                   "optimizer": ("outer_optimizer", "outer_lr", "outer_momentum")}
    mode: str = "bsp"                       # consistency model: bsp (bulk synchronous), asp (asynchronous), ssp (stale synchronous), local-sgd (local steps, then model averaging), diloco (local steps of the inner optimizer, then an outer optimizer step on the servers)
    staleness: int = 0                      # ssp: a worker may run this many clocks ahead of the slowest live worker (0 = lockstep)
    local_steps: int = 1                    # local-sgd, diloco: optimizer steps each worker takes between two pushes (H)
    outer_optimizer: str = "nesterov"       # diloco: the servers' optimizer on the averaged pseudo-gradient: nesterov (momentum SGD, Nesterov's form) or sgd
    outer_lr: float = 0.7                   # diloco: the outer learning rate (DiLoCo, OpenDiLoCo: 0.7)
    outer_momentum: float = 0.9             # diloco with --outer-optimizer nesterov: the outer momentum (DiLoCo: 0.9)
    backup_workers: int = 0                 # bsp: a step proceeds with the first W - b gradients; later ones are dropped and counted
    chunk_mb: float = DEFAULT_CHUNK_MB      # the flat vector is cut into equal chunks of at most this many MiB, dealt over the servers (see --show-placement)
    compress: str = "none"                  # gradient compression on the push: none, fp16, bf16, int8 (stochastic, QSGD-style), topk or randk (common/wire/compress.py)
    compress_ratio: float = 0.01            # topk/randk: the fraction of each chunk's entries sent
    error_feedback: str = "on"              # with --compress: keep on the worker what was not sent and add it to the next push
    compress_momentum: float = 0.0          # with --compress: momentum applied on the workers before compressing (Deep Gradient Compression's momentum correction; the servers then run --optimizer sgd)
    compress_pull: str = "none"             # compression of the parameters a server answers with: none, bf16, int8, topk (the change against the copy the workers hold, with error feedback on the server; common/wire/pull_compress.py)
    compress_pull_ratio: float = 0.01       # --compress-pull topk: the fraction of each chunk's entries sent

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.staleness < 0 or self.local_steps < 1 or self.backup_workers < 0:
            raise ValueError(f"need staleness >= 0, local_steps >= 1, backup_workers >= 0; got "
                             f"{self.staleness}, {self.local_steps}, {self.backup_workers}")
        # a setting that the chosen mode would ignore is a mistake: say so rather than ignore it
        for name, default, modes in (("staleness", 0, ("ssp",)), ("local_steps", 1, ("local-sgd", "diloco")),
                                     ("backup_workers", 0, ("bsp",)), ("outer_optimizer", "nesterov", ("diloco",)),
                                     ("outer_lr", 0.7, ("diloco",)), ("outer_momentum", 0.9, ("diloco",))):
            if getattr(self, name) != default and self.mode not in modes:
                raise ValueError(f"--{name.replace('_', '-')} applies to --mode {' or '.join(modes)}, not {self.mode}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS or self.compress_pull not in PULL_SCHEMES:
            raise ValueError(f"need outer_optimizer in {OUTER_OPTIMIZERS} and compress_pull in {PULL_SCHEMES}; got "
                             f"{self.outer_optimizer!r}, {self.compress_pull!r}")
        if not (self.outer_lr > 0 and 0 <= self.outer_momentum < 1):
            raise ValueError(f"need outer_lr > 0 and 0 <= outer_momentum < 1; got {self.outer_lr}, "
                             f"{self.outer_momentum}")
        if not 0 < self.compress_pull_ratio <= 1:
            raise ValueError(f"need 0 < compress_pull_ratio <= 1, got {self.compress_pull_ratio}")
        if self.compress_pull_ratio != 0.01 and self.compress_pull != "topk":
            raise ValueError(f"--compress-pull-ratio applies to --compress-pull topk, not {self.compress_pull}")
        if self.outer_optimizer == "sgd" and self.outer_momentum != 0.9:
            raise ValueError("--outer-momentum applies to --outer-optimizer nesterov, not sgd")
        if self.compress not in SCHEMES:
            raise ValueError(f"compress must be one of {', '.join(SCHEMES)}, got {self.compress!r}")
        if self.error_feedback not in ("on", "off"):
            raise ValueError(f"error_feedback must be on or off, got {self.error_feedback!r}")
        if not 0 < self.compress_ratio <= 1 or not self.chunk_mb > 0:
            raise ValueError(f"need 0 < compress_ratio <= 1 and chunk_mb > 0; got {self.compress_ratio}, "
                             f"{self.chunk_mb}")
        if self.compress_ratio != 0.01 and self.compress not in ("topk", "randk"):
            raise ValueError(f"--compress-ratio applies to --compress topk or randk, not {self.compress}")
        if not 0 <= self.compress_momentum < 1:
            raise ValueError(f"compress_momentum must lie in [0, 1), got {self.compress_momentum}")
        if self.compress_momentum and self.mode in ("local-sgd", "diloco"):
            raise ValueError(f"--compress-momentum applies to gradients, not to the parameter changes of {self.mode}")
        if self.compress_momentum and self.compress == "none":
            raise ValueError("--compress-momentum applies with --compress (without, use --optimizer momentum)")
        if self.error_feedback != "on" and self.compress == "none":
            raise ValueError("--error-feedback applies with --compress")

    @property
    def synchronous(self) -> bool:
        """Steps (rounds) that every worker takes together: bsp, local-sgd and diloco."""
        return self.mode in ("bsp", "local-sgd", "diloco")

    @property
    def local(self) -> bool:
        """Workers take H local optimizer steps between two pushes: local-sgd and diloco."""
        return self.mode in ("local-sgd", "diloco")

    def outer_optim(self) -> OptimConfig:
        """diloco: the servers' outer optimizer (no weight decay, no schedule, no clipping:
        the inner optimizer on the workers has those)."""
        return OptimConfig(optimizer="sgd" if self.outer_optimizer == "sgd" else "nesterov", lr=self.outer_lr,
                           momentum=self.outer_momentum)

    def check_workers(self, num_workers: int):
        """What needs W: at least one gradient must make a backup-worker step."""
        if self.backup_workers >= num_workers:
            raise ValueError(f"--backup-workers {self.backup_workers} leaves no gradient for a step "
                             f"of {num_workers} worker(s); use at most {num_workers - 1}")


def add_cluster_arguments(parser: argparse.ArgumentParser):
    """ClusterConfig's flags, with defaults taken from the PS_* environment variables."""
    add_arguments(parser, ClusterConfig, "launch")
    types = typing.get_type_hints(ClusterConfig)
    defaults = {}
    for name, var in ENV.items():
        if var in os.environ:
            try:
                defaults[name] = types[name](os.environ[var])
            except ValueError:
                raise SystemExit(f"environment variable {var}={os.environ[var]!r} is not a valid "
                                 f"{types[name].__name__}") from None
    parser.set_defaults(**defaults)


def host_name() -> str:
    """This host's name as the job reports it: PS_HOST if set (launchers set it), else
    Slurm's SLURMD_NODENAME (network-namespace nodes all share one hostname), else the
    hostname."""
    return os.environ.get("PS_HOST") or os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def server_bind(cfg: ClusterConfig, rank: int) -> str:
    """Where server ``rank`` listens: ``--bind`` if given; else server 0 on the
    coordinator's port and the others on any free port, on every interface."""
    if cfg.bind:
        return cfg.bind
    return f"tcp://*:{cfg.coordinator.rsplit(':', 1)[1]}" if rank == 0 else "tcp://*:*"


def advertised_endpoint(cfg: ClusterConfig, bound_endpoint: str) -> str:
    """The address peers should use for a socket bound at ``bound_endpoint``."""
    if cfg.advertise:
        adv = cfg.advertise if "://" in cfg.advertise else "tcp://" + cfg.advertise
        if adv.rsplit(":", 1)[1] in ("*", "0", ""):
            adv = adv.rsplit(":", 1)[0] + ":" + bound_endpoint.rsplit(":", 1)[1]
        return adv
    host = bound_endpoint.split("://", 1)[1].rsplit(":", 1)[0]
    port = bound_endpoint.rsplit(":", 1)[1]
    if host in ("0.0.0.0", "*", "[::]", "::"):
        host = pick_address(cfg.interface, cfg.subnet,
                            toward=cfg.coordinator.replace("tcp://", "").rsplit(":", 1)[0])
    return f"tcp://{host}:{port}"
