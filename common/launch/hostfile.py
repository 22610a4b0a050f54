"""The hostfile of ``ps-launch`` and ``ps-preflight``: which host runs which roles.

One host per line; ``#`` starts a comment:

    # HOST   [servers=N] [workers=N] [addr=IP]
    node1    servers=1   addr=10.0.0.1
    node2    workers=2
    node3                                # a bare host name: one worker

``HOST`` is what the ssh command is given. ``addr`` is the address the other hosts
use to reach this one (default: ``HOST`` itself); servers on that host advertise it,
and the coordinator (server 0, on the first host with servers) is ``addr:PORT``.
Ranks follow the file: servers are numbered in the order of the lines, workers too.

Not here: ssh, processes (``common/launch/ssh.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Host:
    name: str                     # what the rsh command gets
    addr: str                     # the address peers use for this host
    servers: list[int] = field(default_factory=list)   # server ranks on this host
    workers: list[int] = field(default_factory=list)   # worker ranks on this host

    @property
    def roles(self) -> list[tuple[str, int]]:
        return [("server", r) for r in self.servers] + [("worker", r) for r in self.workers]


def parse(text: str, where: str = "hostfile") -> list[Host]:
    """Hosts in file order, with their role ranks; ValueError names the bad line."""
    hosts, s_next, w_next = [], 0, 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].split()
        if not line:
            continue
        name, kv = line[0], {}
        for item in line[1:]:
            k, eq, v = item.partition("=")
            if not eq or k not in ("servers", "workers", "addr") or not v:
                raise ValueError(f"{where} line {n}: expected servers=N, workers=N or addr=IP, got {item!r}")
            kv[k] = v
        try:
            ns = int(kv.get("servers", 0))
            nw = int(kv.get("workers", 0 if "servers" in kv else 1))
        except ValueError:
            raise ValueError(f"{where} line {n}: servers= and workers= take whole numbers: {raw.strip()!r}") from None
        if ns < 0 or nw < 0 or ns + nw == 0:
            raise ValueError(f"{where} line {n}: host {name} runs no role ({raw.strip()!r})")
        if any(h.name == name for h in hosts):
            raise ValueError(f"{where} line {n}: host {name} appears twice; give it servers= and workers= on one line")
        hosts.append(Host(name, kv.get("addr", name), list(range(s_next, s_next + ns)),
                          list(range(w_next, w_next + nw))))
        s_next, w_next = s_next + ns, w_next + nw
    if s_next == 0 or w_next == 0:
        raise ValueError(f"{where}: need at least one server and one worker, found {s_next} and {w_next}")
    return hosts


def read(path: str) -> list[Host]:
    with open(path) as f:
        return parse(f.read(), path)


def coordinator(hosts: list[Host], port: int) -> str:
    """HOST:PORT of server 0."""
    return f"{next(h for h in hosts if 0 in h.servers).addr}:{port}"
