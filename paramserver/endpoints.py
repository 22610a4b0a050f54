"""A server's sockets: where it listens, the address it advertises, its links to peers.

- the ROUTER every request comes in on, bound at ``--bind`` (a resuming server: the
  address in its checkpoint), advertised at ``--advertise`` or the address this host
  uses toward the coordinator (``common/cluster.py``);
- a server advertised on 127.0.0.1 also listens on a Unix socket that the processes of
  its host use (``--ipc``);
- servers s > 0: a DEALER to the coordinator; every server of a job with S > 1: one
  DEALER to each other server, for the step agreement (through the peer's Unix socket
  when it is on this host);
- with ``--shm auto``, the shared memory the workers of its host reach it by: its own
  segment (the shard's parameters) and theirs (``common/wire/shm.py``).

Not here: sending (``replier.py``), the sockets themselves (``common/wire/transport.py``).
"""
from __future__ import annotations

import logging
import os

from common.cluster import advertised_endpoint, host_name
from common.wire.shm import PeerSegments, Segment, SharedMemory
from common.wire.transport import Dealer, Poller, Router, local_endpoint, reachable_locally

log = logging.getLogger("server")


class ServerEndpoints:
    def __init__(self, cluster, rank: int, bind: str):
        self.cluster = cluster
        self.curve = cluster.curve_keys()             # None without --curve
        self.router = Router(bind, curve=self.curve)
        self.addr = advertised_endpoint(cluster, self.router.endpoint)
        self.ipc = local_endpoint(self.addr, host_name()) if cluster.ipc else ""
        if self.ipc and not self.router.bind_also(self.ipc):
            self.ipc = ""
        self.poller = Poller([self.router])
        self.identity = f"server:{rank}/{os.getpid()}".encode()    # kept across reconnects (ROUTER_HANDOVER)
        self.coordinator = None if rank == 0 else Dealer(cluster.coordinator, identity=self.identity,
                                                          curve=self.curve)
        if self.coordinator:
            self.poller.add(self.coordinator)
        self.peers: dict[int, Dealer] = {}
        self.peer_addrs: list[str] = []               # the peers' TCP addresses, by rank
        self.shm: SharedMemory | None = None          # (share_memory)

    def share_memory(self, rank: int, nbytes: int, worker_nbytes: int, itemsize: int) -> SharedMemory | None:
        """--shm auto: this server's segment of ``nbytes`` (its parameters), and the workers'
        (``worker_nbytes`` each, the flat vector's layout), mapped as they name them; None
        with --shm off or --curve, or where /dev/shm cannot be used (said in the log)."""
        c = self.cluster
        if not c.use_shm:
            return None
        try:
            segment = Segment.create(c.coordinator, "server", rank, nbytes)
        except OSError as e:
            log.warning("no shared memory (%s): the workers of this host get their answers as frames", e)
            return None
        self.shm = SharedMemory(segment, PeerSegments(
            c.coordinator, lambda role, r: worker_nbytes if role == "worker" else 0,
            lambda role, r, b, e: b * itemsize))
        return self.shm

    def connect_peers(self, rank: int, addrs: list, ipc: list) -> dict:
        """One DEALER to every other server (``addrs``; ``ipc``: their Unix sockets, '' for none)."""
        self.peer_addrs = list(addrs)
        for s, addr in enumerate(addrs):
            if s != rank:      # a server of this host through its Unix socket
                near = self.cluster.ipc and reachable_locally(ipc[s])
                self.peers[s] = Dealer(ipc[s] if near else addr, identity=self.identity + b"/peer", curve=self.curve)
        return self.peers

    def move_peers(self, addrs: list) -> list:
        """Follow the peers that moved (restarted on another host) to their new TCP
        addresses; returns [(rank, old, new)] of those that did."""
        moved = []
        for s, addr in enumerate(addrs):
            if s in self.peers and addr != self.peer_addrs[s]:
                self.peers[s].move(addr)
                moved.append((s, self.peer_addrs[s], addr))
                self.peer_addrs[s] = addr
        return moved

    def close(self):
        for s in [self.router, self.coordinator, *self.peers.values()]:
            if s is not None:
                s.close()
        if self.shm is not None:
            self.shm.segment.close()
        if self.ipc:                        # the Unix socket's file, if libzmq left it
            try:
                os.unlink(self.ipc[len("ipc://"):])
            except OSError:
                pass
