"""One BSP step on one server, chunk by chunk: which worker pushed which chunk, which
chunks are complete, averaged and updated, and which pushes may now be answered.

A worker that overlaps communication with its backward pushes each chunk as soon as
its gradient is final, in several messages per step (``worker/client.py``). The server
averages a chunk the moment every worker has pushed it, updates it as soon as it may
(at once without clipping; after the norm exchange with it), and answers each push
message the moment every chunk it carried is updated, with the new values of those
chunks: the worker's next forward can start on the first layers while the server is
still updating the last (BytePS's priority scheduling, in its simplest form: updates
and answers go in the order of the flat vector, which is the order of the forward).

Everything here is bookkeeping; ``server.py`` moves the bytes and ``shard.py`` does
the arithmetic. Used in plain BSP only: with backup workers a step takes the first
W - b complete pushes, which a per-chunk count cannot see, so those pushes carry all of
a server's chunks at once, as in the other modes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.protocol import ProtocolError


@dataclass
class PushMessage:
    """A push message waiting for its answer."""
    identity: bytes
    rid: int
    rank: int
    chunks: list[int]


@dataclass
class StepAssembly:
    num_chunks: int
    num_workers: int
    have: list = field(default_factory=list)            # chunk -> ranks that pushed it this step
    count: dict = field(default_factory=dict)           # rank -> chunks pushed this step
    complete: set = field(default_factory=set)          # chunks every worker pushed (averaged)
    updated: set = field(default_factory=set)           # chunks updated this step
    waiting: list = field(default_factory=list)         # PushMessages not yet answered
    meta: dict = field(default_factory=dict)            # rank -> its pushes' meta, merged

    def __post_init__(self):
        self.reset()

    def reset(self):
        self.have = [set() for _ in range(self.num_chunks)]
        self.count, self.meta = {}, {}
        self.complete, self.updated = set(), set()
        self.waiting = []

    @property
    def started(self) -> bool:
        return bool(self.count)

    def has(self, rank: int, chunk: int) -> bool:
        return rank in self.have[chunk]

    def check(self, rank: int, chunks):
        """Refuse a chunk this worker already pushed in this step."""
        again = [c for c in chunks if rank in self.have[c]]
        if again:
            raise ProtocolError(f"worker {rank} already pushed chunk(s) {again} in this step")

    def add(self, identity: bytes, rid: int, rank: int, chunks, meta: dict) -> list[int]:
        """Record a push message; returns the chunks it completed (now pushed by every worker)."""
        self.check(rank, chunks)
        done = []
        for c in chunks:
            self.have[c].add(rank)
            if len(self.have[c]) == self.num_workers:
                self.complete.add(c)
                done.append(c)
        self.count[rank] = self.count.get(rank, 0) + len(chunks)
        self.meta[rank] = dict(self.meta.get(rank, {}), **meta)
        self.waiting.append(PushMessage(identity, rid, rank, list(chunks)))
        return done

    def rank_done(self, rank: int) -> bool:
        """Has this worker pushed every chunk of the step?"""
        return self.count.get(rank, 0) == self.num_chunks

    def answerable(self) -> list[PushMessage]:
        """The waiting messages whose chunks are all updated (removed from the waiting list)."""
        ready = [m for m in self.waiting if all(c in self.updated for c in m.chunks)]
        if ready:
            self.waiting = [m for m in self.waiting if m not in ready]
        return ready

    def to_update(self) -> list[int]:
        """Complete chunks not yet updated, in the order of the flat vector."""
        return sorted(self.complete - self.updated)
