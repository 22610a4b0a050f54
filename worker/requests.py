"""Requests with deadlines: the one place a worker sends, resends, waits and gives up.

Every request gets an id and is kept, as sent, until its answer arrives; a late answer
to a request no longer waited for is dropped. A wait reads answers until the caller is
satisfied, within ``--timeout`` (plus a grace where a server may hold an answer back
and say why first); when the deadline passes, the error names the servers (or the
coordinator) that did not answer, their addresses and what their links look like.
While waiting it also gives up at once on a server that refused the handshake
(CurveZMQ), raises when the heartbeat thread learned that the job is stopping
(``check_job``), and sends a request again, unchanged, when its connection was lost
since it was sent or it waited ``resend_s`` (the server applies a push at most once).

The ZeroMQ guide's Lazy Pirate, for many requests at once. Used by every wait of
``PSClient``: registration and DONE with the coordinator (``ask_coordinator``), and
init, pull and push with the servers (``send`` + ``wait``).

Not here: what a request carries or where its answer goes (``worker/client.py``),
sockets (``common/wire/transport.py``), bytes (``common/wire/codec.py``).
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from common.trace import NULL_TRACER
from common.wire import codec
from common.wire.protocol import ERROR, PULL, PUSH, ProtocolError
from common.wire.transport import Dealer, Poller, reachable_locally

log = logging.getLogger("client")


class RemoteError(RuntimeError):
    """A server refused a request; the text says which server and why."""


class DeadlineError(TimeoutError):
    """A wait passed its deadline; the text names who did not answer."""


@dataclass
class Request:
    """A request waiting for its answer."""
    server: int
    cmd: str
    step: int
    answers: list          # indices of the chunks whose parameters the answer brings
    frames: list           # the message as sent: sent again, unchanged, after a lost connection
    lost: int              # the link's lost connections when it was last sent
    sent: float            # when it was last sent (monotonic)


class Requests:
    def __init__(self, cluster, identity: bytes, name, check_job, grace: float = 0.0):
        """``name()``: this process's name in headers; ``check_job()`` raises when the job
        is stopping; ``grace``: added to ``--timeout`` in waits for the servers."""
        self.name, self.check_job = name, check_job
        self.timeout, self.grace = cluster.timeout, grace
        self.resend_s = max(5.0, self.timeout / 3)   # also resend what waited this long (a safety net)
        self.curve = cluster.curve_keys()             # None without --curve
        self.coordinator = Dealer(cluster.coordinator, identity=identity, curve=self.curve)
        self.links: list[Dealer] = []                 # one per server, in server rank order
        self.addrs: list[str] = []
        self.poller = Poller()
        self.out: dict[int, Request] = {}             # rid -> request waiting for its answer
        self.rids = itertools.count(1)
        self.resends = 0                              # requests sent again after a lost connection
        self.bytes_sent = 0                           # every frame sent (headers included), resends too
        self.bytes_received = 0                       # every frame received (headers included)
        self.tracer = NULL_TRACER                     # spans: each request sent, wait, pull (answer read)
        self.parsed = (None, None)                    # (frame 0, its header) of the answer being received
        self.local: list[bool] = []                   # per server: reached through its Unix socket (this host)
        self.segments = None                          # --shm: the servers' segments (common/wire/shm.py)
        self.shared_with: set[int] = set()            # servers whose answers came through shared memory

    def connect(self, addrs: list, ipc: list, link_id: bytes, use_ipc: bool):
        """One link per server (``addrs``); a server of this host through its Unix socket."""
        self.addrs = list(addrs)
        for addr, near in zip(addrs, ipc):
            local = use_ipc and reachable_locally(near)
            self.local.append(local)
            link = Dealer(near if local else addr, identity=link_id, curve=self.curve)
            self.links.append(link)
            self.poller.add(link)

    def follow(self, addrs: list):
        """The servers' addresses as the coordinator says now: a server restarted on another
        host is reached there from now on, and what was sent to it is sent again
        (``maybe_resend``: the move counts as a lost connection)."""
        if len(addrs) != len(self.links) or addrs == self.addrs:
            return
        for s, addr in enumerate(addrs):
            if addr != self.addrs[s]:
                log.warning("%s: server %d moved from %s to %s (the coordinator says); its requests go there",
                            self.name(), s, self.addrs[s], addr)
                self.links[s].move(addr)
                self.addrs[s] = addr
                self.shared_with.discard(s)           # frames again, until it answers through shared memory

    def close(self):
        for s in [self.coordinator, *self.links]:
            s.close()

    # --- the coordinator ----------------------------------------------------------------
    def ask_coordinator(self, cmd: str, what: str, sender: str | None = None, timeout: float | None = None,
                        periodic: bool = True, **meta):
        """Send ``cmd`` to the coordinator and return its answer (resent after a lost
        connection, and if ``periodic`` every ``resend_s``)."""
        rid = next(self.rids)
        frames = codec.encode(cmd, sender or self.name(), rid=rid, **meta)
        self.coordinator.send(frames)
        self.bytes_sent += codec.frames_nbytes(frames)
        return self.wait_one(self.coordinator, rid, f"the coordinator at {self.coordinator.endpoint}", what,
                             timeout=timeout, resend=frames, periodic=periodic)

    def wait_one(self, sock, rid, who, what, timeout=None, resend=None, periodic=True):
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        entry = Request(-1, what, 0, [], resend, sock.connections()[1], time.monotonic()) if resend else None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineError(f"{self.name()}: {who} has not answered {what} within "
                                    f"{timeout:.0f} s ({sock.diagnose()}); is it running?")
            why = sock.refused()                          # a refused handshake never answers
            if why:
                raise RemoteError(f"{self.name()}: cannot talk to {who}: {why}")
            self.check_job()
            if entry is not None:
                self.maybe_resend(sock, entry, what.split(" ")[0], periodic=periodic)
            if sock.poll(min(left, 0.5) * 1000):
                frames = sock.recv()
                self.bytes_received += codec.frames_nbytes(frames)
                msg = self.decode(frames, who)
                if msg is None or msg.rid not in (rid, 0):
                    continue
                if msg.cmd == ERROR:
                    raise RemoteError(f"{who} refused {what.split(' ')[0]}: {msg.meta['message']}")
                return msg

    # --- the servers ----------------------------------------------------------------------
    def send(self, s: int, cmd: str, step: int, answers=(), **encode) -> list:
        """Send one request to server ``s`` (``encode``: ``codec.encode``'s arrays, ranges,
        encs, dtypes and meta); its answer brings the chunks ``answers``. Returns the frames."""
        rid = next(self.rids)
        t = self.tracer.now()
        frames = codec.encode(cmd, self.name(), step=step, rid=rid, **encode)
        lost = self.links[s].connections()[1]     # read before the send (a resend compares with it)
        self.links[s].send(frames)
        self.bytes_sent += codec.frames_nbytes(frames)
        self.out[rid] = Request(s, cmd, step, list(answers), frames, lost, time.monotonic())
        self.tracer.add(cmd, t, self.tracer.now(), step=step)
        return frames

    def wait(self, cmd: str, step: int, reader, done=None):
        """Read answers (into ``reader``, see ``receive_ready``) until ``done()`` (default: no
        request outstanding), within the deadline."""
        done = done or (lambda: not self.out)
        if done():
            return
        t_wait = self.tracer.now()
        limit = self.timeout + self.grace
        deadline = time.monotonic() + limit
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                servers = sorted({r.server for r in self.out.values()})
                missing = ", ".join(f"server {s}{' (the coordinator)' if s == 0 else ''} at {self.addrs[s]} "
                                    f"({self.links[s].diagnose()})" for s in servers)
                raise DeadlineError(f"{self.name()}: no answer to {cmd} (step {step}) within "
                                    f"{limit:.0f} s from {missing}; is it running? see its log. If it cannot "
                                    "come back, resume the whole job from the checkpoints (docs/failures.md)")
            self.check_job()
            for s in sorted({r.server for r in self.out.values()}):   # a refused handshake never answers
                why = self.links[s].refused()
                if why:
                    raise RemoteError(f"{self.name()}: cannot talk to server {s} at {self.addrs[s]}: {why}")
            for req in list(self.out.values()):
                self.maybe_resend(self.links[req.server], req, f"{req.cmd} (step {req.step}) to server {req.server}")
            self.receive_ready(min(left, 0.5) * 1000, reader)
        self.tracer.add("wait", t_wait, self.tracer.now(), step=step)

    def receive_ready(self, timeout_ms: float, reader):
        """Read every answer waiting (after up to ``timeout_ms`` for the first). ``reader``
        says where an answer's arrays go (``destinations(req, header)``) and takes it
        (``take(req, msg, nbytes)``); an ERROR raises, naming the server."""
        for link in self.poller.poll(timeout_ms):
            while link.poll(0):
                t = self.tracer.now()
                frames, placed = link.recv_placed(lambda head: self._place(head, reader))
                nbytes = codec.frames_nbytes(frames[1:])             # the arrays (frame 0: the header)
                self.bytes_received += nbytes + len(frames[0])
                msg = self.decode(frames, link.endpoint, placed)
                if msg is None or msg.rid not in self.out:
                    continue
                nbytes = sum(a.nbytes for a in msg.arrays)          # framed or in shared memory
                req = self.out.pop(msg.rid)
                if msg.meta.get("shm"):
                    self.shared_with.add(req.server)
                elif msg.arrays:                # (a restarted server without shared memory)
                    self.shared_with.discard(req.server)
                if msg.cmd == ERROR:
                    raise RemoteError(f"server {req.server} at {self.addrs[req.server]} refused {req.cmd}: "
                                      f"{msg.meta['message']}")
                reader.take(req, msg, nbytes)
                if req.cmd in (PUSH, PULL):     # "pull": reading an answer's parameters into params
                    self.tracer.add("pull", t, self.tracer.now(), step=req.step)

    def _place(self, head, reader):
        """Where the arrays of an answer go: the header is parsed once (and kept for
        ``decode``), the request found, and the reader asked."""
        try:
            h = codec.parse_header(head)
        except ProtocolError:
            return None
        self.parsed = (head, h)
        req = self.out.get(h["rid"])
        return None if req is None else reader.destinations(req, h)

    def maybe_resend(self, sock, req: Request, what, periodic=True):
        """Send ``req``'s very same message again when the connection was lost since it was
        sent (it may have been lost with it), or (if ``periodic``) when it waited
        ``resend_s``; the server answers a repeat without applying it twice."""
        lost_now = sock.connections()[1]
        if lost_now > req.lost or (periodic and time.monotonic() - req.sent > self.resend_s):
            log.info("%s: sending %s again (%s)", self.name(), what,
                     "its connection was lost" if lost_now > req.lost else f"no answer for {self.resend_s:.0f} s")
            sock.send(req.frames)
            self.bytes_sent += codec.frames_nbytes(req.frames)
            req.lost, req.sent = lost_now, time.monotonic()
            self.resends += 1

    def decode(self, frames, who, placed=None):
        head, header = self.parsed
        self.parsed = (None, None)
        header = header if frames and frames[0] is head else None
        try:
            if self.segments is not None:            # --shm: the arrays may lie in the server's segment
                return self.segments.decode(frames, header=header, placed=placed)
            return codec.decode(frames, header=header, placed=placed)
        except ProtocolError as e:
            log.warning("dropped a malformed answer from %s: %s", who, e)
            return None
