"""Stand-ins for what surrounds the server's and the client's parts, so that each part
is driven in a unit test without processes or sockets (the fixtures of tests/conftest.py
hand them out).

- ``Router``, ``Peer``: a server's ROUTER and a DEALER to a peer server, recording what
  the replier sends (decoded again, so a test reads messages, not bytes);
- ``Clock``: a time the test moves by hand;
- ``Replies``: the replier as the coordinator sees it (``reply``, ``error``), recording;
- ``Link``, ``LinkPoller``: a worker's DEALER to a server and its poller: a test queues
  the answers and counts lost connections;
- ``push_message``, ``worker_meta``: a decoded PUSH, a worker's REGISTER meta.

Each records what a real one would have sent; none decides anything, so a test that
passes with them passes on the part's own logic.
"""
from __future__ import annotations

import numpy

from common.cluster import ClusterConfig
from common.layout import gpt_layout
from common.wire import codec
from common.wire.protocol import OK, PUSH


def decoded(frames):
    """A message as the receiver reads it, from the frames a sender made."""
    return codec.decode([bytes(memoryview(f)) for f in frames])


class Router:
    """Records what the replier sends: (identity, decoded message)."""
    def __init__(self):
        self.sent = []

    def send(self, identity, frames):
        self.sent.append((identity, decoded(frames)))
        return True


class Peer:
    """A DEALER to another server: records the decoded messages."""
    def __init__(self):
        self.sent = []

    def send(self, frames):
        self.sent.append(decoded(frames))

    def connections(self):
        return (1, 0)


class Clock:
    """A clock a test sets by hand (``clock.t += 6``)."""
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self):
        return self.t


class Replies:
    """The replier as the coordinator uses it: every answer recorded as (identity, cmd, rid, meta)."""
    def __init__(self):
        self.sent = []

    def reply(self, identity, cmd, rid, **meta):
        self.sent.append((identity, cmd, rid, meta))

    def error(self, identity, rid, text):
        self.sent.append((identity, "ERROR", rid, {"message": text}))

    def to(self, identity) -> list:
        return [(cmd, meta) for ident, cmd, _, meta in self.sent if ident == identity]


def push_message(rank, step, grad, rid=1, chunks=((0, 4), (4, 8)), **meta):
    """Worker ``rank``'s PUSH of ``grad`` for ``step``, chunk by chunk, decoded."""
    arrays = [grad[b:e].astype(numpy.float32) for b, e in chunks]
    return decoded(codec.encode(PUSH, f"worker:{rank}", step=step, rid=rid, arrays=arrays, ranges=list(chunks),
                                **meta))


LAYOUT = gpt_layout(vocab_size=11, block_size=4, n_layer=1, n_embd=8)


def worker_meta(rank=-1, host="h1", pid=100, layout=LAYOUT, dtype="float32", **extra) -> dict:
    """What a worker sends with REGISTER: who it is and its model's layout."""
    return dict(role="worker", rank=rank, host=host, pid=pid, layout=layout.table(), layout_hash=layout.hash(),
                dtype=dtype, **extra)


def server_meta(rank, addr=None, host="h0", pid=10, **extra) -> dict:
    return dict(role="server", rank=rank, host=host, pid=pid, addr=addr or f"tcp://h0:{5700 + rank}", **extra)


class Link:
    """A worker's DEALER stand-in: records what is sent, answers what the test queues."""
    def __init__(self, endpoint):
        self.endpoint, self.sent, self.inbox, self.lost, self.why = endpoint, [], [], 0, None

    def send(self, frames):
        self.sent.append([bytes(memoryview(f)) for f in frames])

    def connections(self):
        return (1, self.lost)

    def refused(self):
        return self.why

    def diagnose(self):
        return "connected"

    def poll(self, timeout_ms=0):
        return bool(self.inbox)

    def recv_placed(self, place):
        frames = self.inbox.pop(0)
        place(frames[0])
        return frames, None

    def recv(self):
        return self.inbox.pop(0)


class LinkPoller:
    def __init__(self, links):
        self.links = links

    def poll(self, timeout_ms):
        return [link for link in self.links if link.inbox]


def requests_over_links(servers=2, timeout=0.3, check_job=lambda: None):
    """A worker's ``Requests`` whose links to the servers are ``Link``s."""
    from worker.requests import Requests
    cluster = ClusterConfig(rank=0, num_servers=servers, num_workers=1, coordinator="127.0.0.1:1", timeout=timeout)
    req = Requests(cluster, b"worker:0/test", lambda: "worker:0", check_job=check_job)
    req.coordinator.close()
    req.links = [Link(f"tcp://s{s}") for s in range(servers)]
    req.addrs = [link.endpoint for link in req.links]
    req.poller = LinkPoller(req.links)
    return req


def answer(rid, ranges, values, version, cmd=OK, sender="server:0", **meta):
    """A server's answer frames to request ``rid``: chunk ``ranges`` filled with ``values``."""
    arrays = [numpy.full(e - b, v, numpy.float64) for (b, e), v in zip(ranges, values)]
    return [bytes(memoryview(f)) for f in codec.encode(cmd, sender, rid=rid, arrays=arrays, ranges=list(ranges),
                                                         version=version, **meta)]


def rid_of(frames):
    """The request id of sent frames."""
    return codec.decode(frames).rid


PLACEMENT = [[0, 4, 0], [4, 8, 1], [8, 12, 0]]      # chunks [begin, end, server] of a 12-element vector


def client_parts(timeout=0.3, check_job=lambda: None):
    """(Requests over ``Link``s to 2 servers, the ChunkMap of PLACEMENT, an AnswerReader)."""
    from worker.answers import AnswerReader, ChunkMap
    chunks = ChunkMap(PLACEMENT, 2)
    return requests_over_links(2, timeout, check_job), chunks, AnswerReader(chunks, 2, one_version=True)
