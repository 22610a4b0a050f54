"""The server's only sender: every message a server sends is encoded and sent here.

Answers to requests (``reply``, ``error``, ``params``) go out on the server's ROUTER to
the peer that asked; the step agreement's proposals (``norm``) go to the other servers
on one DEALER each; heartbeats and registration (``to_coordinator``) go to server 0.
Every byte sent to a peer is counted for ``ps-status`` (``traffic.py``).

Answers with parameters are sent without a copy (``Shard.param_views``) unless the
consistency model lets an update come before an answer leaves (asp, ssp, late pushes
of backup workers): then they are sent from a per-version copy (``Shard.param_snapshot``);
``snapshot`` says which, chosen once with the mode. Where the parameters live in a
shared-memory segment (``shm``, not with ``snapshot``), a peer of this host that
named its own segment (``shm.peers.readers``) gets a header naming where each chunk
lies in it, and no frames (``common/wire/shm.py``).

Not here: what is sent when (the serving objects, ``steps.py`` and ``modes.py``), the
bytes of a message (``common/wire/codec.py``), sockets (``common/wire/transport.py``).
"""
from __future__ import annotations

import logging

from common.wire import codec
from common.wire.protocol import ERROR, NORM, OK
from paramserver.traffic import Traffic, frames_nbytes

log = logging.getLogger("server")


class Replier:
    def __init__(self, name: str, router, traffic: Traffic, coordinator=None, snapshot: bool = False):
        """``router``: the server's ROUTER; ``coordinator``: a DEALER to server 0 (None on
        server 0); ``snapshot``: answer with parameters from a per-version copy."""
        self.name = name
        self.router = router
        self.traffic = traffic
        self.coordinator = coordinator
        self.snapshot = snapshot
        self.shard = None                       # set once the job started (``serve``)
        self.peers: dict[int, object] = {}      # server rank -> DEALER (the step agreement)
        self.shm = None                         # --shm: the segment shard.params lives in, and its readers

    def serve(self, shard, peers: dict, shm=None):
        """The job started: answers carry ``shard``'s parameters; ``peers`` get proposals;
        ``shm`` (``common.wire.shm.SharedMemory``, or None): the segment ``shard.params``
        lives in, through which the peers in ``shm.peers.readers`` are answered."""
        self.shard, self.peers, self.shm = shard, peers, shm

    # --- answers on the ROUTER --------------------------------------------------------
    def reply(self, identity: bytes, cmd: str, rid: int, arrays=(), ranges=None, at=None, **meta):
        frames = codec.encode(cmd, self.name, rid=rid, arrays=arrays, ranges=ranges, at=at, **meta)
        sent = self.router.send(identity, frames)
        self.traffic.sent(identity, frames_nbytes(frames))
        if not sent:
            log.warning("could not answer %s: the peer is gone or not reading", identity[:24])

    def error(self, identity: bytes, rid: int, text: str):
        self.reply(identity, ERROR, rid, message=text)

    def params(self, identity: bytes, rid: int, chunks=None, **meta):
        """Answer with this shard's parameters (or those of the chunk indices ``chunks``)."""
        shard = self.shard
        arrays, _ = shard.param_snapshot() if self.snapshot else shard.param_views()
        self._answer(identity, rid, range(len(arrays)) if chunks is None else chunks, arrays, shard.version, meta)

    def chunks(self, identity: bytes, rid: int, chunks, version: int, **meta):
        """Answer with the live (just updated) parameters of the chunk indices ``chunks``."""
        self._answer(identity, rid, chunks, self.shard.param_views()[0], version, meta)

    def _answer(self, identity: bytes, rid: int, ids, arrays, version: int, meta: dict):
        """The chunks ``ids`` of ``arrays`` (every chunk's values) at ``version``: with
        --compress-pull as the change against what the asker holds; through shared memory
        to a reader of this host; else as frames."""
        shard = self.shard
        arrays, ranges = [arrays[c] for c in ids], [shard.chunks[c] for c in ids]
        if shard.pull is not None:
            arrays, ranges, encs, dtypes = shard.pull.answer(identity, ids, arrays, version)
            self.reply(identity, OK, rid, arrays=arrays, ranges=ranges, encs=encs, dtypes=dtypes, version=version,
                       **meta)
            return
        if self.shm is None or self.snapshot or identity not in self.shm.peers.readers:
            self.reply(identity, OK, rid, arrays=arrays, ranges=ranges, version=version, **meta)
            return
        size = shard.dtype.itemsize
        at = [shard.locate(b, e).start * size for b, e in ranges]
        self.reply(identity, OK, rid, arrays=arrays, ranges=ranges, at=at, shm=self.shm.segment.name,
                   version=version, **meta)

    def note_request(self, identity: bytes, meta: dict):
        """A pull or push: with --compress-pull, remember which version its sender holds."""
        if self.shard is not None and self.shard.pull is not None:
            self.shard.pull.note(identity, meta)

    # --- to the other servers and to the coordinator ----------------------------------
    def norm(self, peers, step: int, **meta):
        """The step agreement's proposal (or echo) to each server rank of ``peers``."""
        frames = codec.encode(NORM, self.name, step=step, **meta)
        for p in peers:
            self.peers[p].send(frames)
            self.traffic.sent(b"", frames_nbytes(frames))               # (totals only)

    def peer_link(self, peer: int) -> int:
        """How many times the link to server ``peer`` was (re)established."""
        return self.peers[peer].connections()[0]

    def to_coordinator(self, cmd: str, **meta):
        frames = codec.encode(cmd, self.name, **meta)
        self.coordinator.send(frames)
        self.traffic.sent(b"", frames_nbytes(frames))
