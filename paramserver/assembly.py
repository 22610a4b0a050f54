"""One BSP step on one server, chunk by chunk: which worker pushed which chunk, and
which push messages wait for their answer.

A worker that overlaps communication with its backward pushes each chunk as soon as
its gradient is final, in several messages per step (``worker/client.py``). A worker
counts as having pushed the step once every chunk of this server has arrived from it;
then the step runs as any synchronous step (``steps.py``: the servers agree on the set
of workers, average, clip by the global norm). The update then goes chunk by chunk in
the order of the flat vector, which is the order of the forward, and each push message
is answered the moment every chunk it carried is updated, with the new values of those
chunks: the worker's next forward starts on the first layers while the server is still
updating the last (BytePS's priority scheduling, in its simplest form).

Everything here is bookkeeping; ``steps.py`` runs the step and ``shard.py`` does the
arithmetic. Used in plain BSP only: with backup workers a step takes the first W - b
complete pushes, so those pushes carry all of a server's chunks at once, as in the
other modes.
"""
from __future__ import annotations

from dataclasses import dataclass

from common.wire.protocol import ProtocolError


@dataclass
class PushMessage:
    """A push message waiting for its answer."""
    identity: bytes
    rid: int
    rank: int
    session: int
    chunks: list[int]


class StepAssembly:
    def __init__(self, num_chunks: int):
        self.num_chunks = num_chunks
        self.reset()

    def reset(self):
        self.have = [set() for _ in range(self.num_chunks)]   # chunk -> ranks that pushed it this step
        self.count: dict[int, int] = {}                        # rank -> chunks pushed this step
        self.meta: dict[int, dict] = {}                        # rank -> its pushes' meta, merged
        self.session: dict[int, int] = {}                      # rank -> the session that pushed
        self.rids: dict[int, list[int]] = {}                   # rank -> its push messages' request ids
        self.updated: set[int] = set()                         # chunks updated this step
        self.waiting: list[PushMessage] = []                   # messages not yet answered

    @property
    def started(self) -> bool:
        return bool(self.count)

    def find(self, rank: int, session: int, rid: int) -> PushMessage | None:
        """The waiting message with this name (a resend of it), or None."""
        return next((m for m in self.waiting if (m.rank, m.session, m.rid) == (rank, session, rid)), None)

    def check(self, rank: int, chunks):
        """Refuse a chunk this worker already pushed in this step."""
        again = [c for c in chunks if rank in self.have[c]]
        if again:
            raise ProtocolError(f"worker {rank} already pushed chunk(s) {again} in this step")

    def add(self, identity: bytes, rid: int, rank: int, session: int, chunks, meta: dict):
        """Record a push message (``check`` first)."""
        for c in chunks:
            self.have[c].add(rank)
        self.count[rank] = self.count.get(rank, 0) + len(chunks)
        self.meta[rank] = dict(self.meta.get(rank, {}), **meta)
        self.session[rank] = session
        self.rids.setdefault(rank, []).append(rid)
        self.waiting.append(PushMessage(identity, rid, rank, session, list(chunks)))

    def rank_done(self, rank: int) -> bool:
        """Has this worker pushed every chunk of the step?"""
        return self.count.get(rank, 0) == self.num_chunks

    def answerable(self, ranks) -> list[PushMessage]:
        """The waiting messages of ``ranks`` whose chunks are all updated (taken off the list)."""
        ready = [m for m in self.waiting if m.rank in ranks and all(c in self.updated for c in m.chunks)]
        if ready:
            self.waiting = [m for m in self.waiting if m not in ready]
        return ready
