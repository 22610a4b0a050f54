"""What a server has seen of each peer: the last message, its step, bytes each way.

The server counts, per sender (``worker:1``, ``server:2``), the messages and bytes it
received and the bytes it answered with, the last step the peer sent, and when it was
last heard from (the job's liveness signal until heartbeats exist: a worker in BSP
sends at least one push per step). ``ps-status`` reads these through a STATUS request
twice, a moment apart, and turns the differences into bytes per second.

Not here: sockets; what counts as a dead peer (nothing is dropped on silence yet).
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class PeerCounters:
    sender: str
    address: str = ""          # where its connection comes from, as the transport saw it
    messages: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    step: int = -1
    last_cmd: str = ""
    last_seen: float = 0.0     # wall-clock time.time() of its last message


class Traffic:
    """Counters for the job's own processes only: ``worker:0..W-1``, ``server:0..S-1`` and
    ``worker:?`` (a worker registering before it has a rank). Any other sender (ps-status
    is ``tool:status``; a fuzzer may claim anything) counts in the totals alone, so the
    state stays bounded by the size of the job whatever peers send."""

    def __init__(self, num_servers: int, num_workers: int):
        self.known = {f"server:{r}" for r in range(num_servers)} | {f"worker:{r}" for r in range(num_workers)}
        self.known.add("worker:?")
        self.peers: dict[str, PeerCounters] = {}
        self.by_identity: dict[bytes, str] = {}
        self.identity_of: dict[str, bytes] = {}
        self.bytes_in = self.bytes_out = 0

    def received(self, identity: bytes, sender: str, nbytes: int, step: int, cmd: str, address: str = ""):
        self.bytes_in += nbytes
        if sender not in self.known:
            return
        p = self.peers.get(sender)
        if p is None:
            p = self.peers[sender] = PeerCounters(sender)
        old = self.identity_of.get(sender)
        if old != identity:                     # a reconnected peer: forget its old connection
            self.by_identity.pop(old, None)
            self.by_identity[identity] = sender
            self.identity_of[sender] = identity
        p.messages += 1
        p.bytes_in += nbytes
        p.step = max(p.step, step)
        p.last_cmd, p.last_seen = cmd, time.time()
        p.address = address or p.address

    def sent(self, identity: bytes, nbytes: int):
        self.bytes_out += nbytes
        sender = self.by_identity.get(identity)
        if sender is not None:
            self.peers[sender].bytes_out += nbytes

    def table(self) -> list[dict]:
        return [dict(vars(p)) for p in sorted(self.peers.values(), key=lambda p: p.sender)]


def frames_nbytes(frames) -> int:
    return sum(memoryview(f).nbytes for f in frames)
