"""The worker's heartbeat: a thread that tells the coordinator, every few seconds, that
this worker is alive, and hears back what the job knows.

A worker computes a whole forward/backward without touching its sockets, so its
heartbeats come from a thread of their own, with a socket of its own (ZeroMQ sockets
are not thread-safe: each belongs to one thread). Every ``interval`` seconds it sends
HEARTBEAT {session, version}; the coordinator's answer says whether this worker is
still in the view (``member``: False once it was dropped for silence, e.g. after a
long stall; the client then registers again) or that the job is stopping (an ERROR,
whose reason the client raises at its next wait), which servers the coordinator has
not heard from, and every server's address (one restarted on another host moved). The
thread also watches the coordinator: silent for ``silence`` seconds, it says so and waits
(a coordinator restarted with --resume rejoins the job); silent for ``timeout`` seconds,
it is gone and the job with it.

NumPy releases the GIL in its heavy loops, and Python switches threads every few
milliseconds otherwise, so the beats keep their rhythm while the main thread computes.

Not here: what the coordinator does with the beats (``paramserver/coordinator.py``).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time

from common.wire import codec
from common.wire.protocol import ERROR, HEARTBEAT, OK, ProtocolError
from common.wire.transport import Dealer

log = logging.getLogger("heartbeat")


class Heartbeat(threading.Thread):
    def __init__(self, client, interval: float, silence: float, timeout: float):
        super().__init__(name=f"heartbeat {client.name}", daemon=True)
        self.client = client                    # reads its name, session and version (ints: no lock needed)
        self.interval, self.silence, self.timeout = interval, silence, timeout
        self._halt = threading.Event()
        self.last_answer = time.monotonic()
        self.member = True                      # False: the coordinator dropped this worker's session
        self.view = 0
        self.error = ""                         # why the job is stopping, or why the coordinator counts as dead
        self.sent = self.answers = 0
        self.unsent = 0                         # beats the socket could not queue (the coordinator long gone)
        self.waiting = False                    # the coordinator is silent: waiting for it (said once)
        self.silent: dict[int, str] = {}        # servers the coordinator has not heard from: rank -> address
        self.servers: list[str] = []            # every server's address, as the coordinator last said (a list
                                                # replaced whole: the main thread reads it without a lock)

    def run(self):
        c = self.client
        sock = Dealer(c.cluster.coordinator, identity=f"{c.identity.decode()}/hb".encode(), curve=c.curve)
        rids, sessions = itertools.count(1), {}
        try:
            next_beat = 0.0
            while not self._halt.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    rid, session = next(rids), c.session
                    sessions[rid] = session
                    sessions.pop(rid - 64, None)               # bounded: old beats' answers are stale anyway
                    beat = codec.encode(HEARTBEAT, c.name, step=c.version, rid=rid, session=session,
                                        version=c.version)
                    if sock.send_now(beat):             # never blocks: stop() must always end this thread
                        self.sent += 1
                    else:
                        self.unsent += 1
                    next_beat = now + self.interval
                if sock.poll(min(max(next_beat - now, 0.0), 0.2) * 1000):
                    self._answer(sock.recv(), sessions)
                self._watch(sock)
        except Exception as e:                                  # noqa: BLE001 - told to the main thread
            self.error = self.error or f"the heartbeat thread failed: {type(e).__name__}: {e}"
        finally:
            sock.close(0)

    def _answer(self, frames, sessions):
        try:
            msg = codec.decode(frames)
        except ProtocolError as e:
            log.warning("dropped a malformed heartbeat answer: %s", e)
            return
        self.last_answer = time.monotonic()
        self.answers += 1
        if self.waiting:
            self.waiting = False
            log.warning("%s: the coordinator answers again", self.client.name)
        if msg.cmd == ERROR:
            self.error = msg.meta["message"]
        elif msg.cmd == OK and sessions.get(msg.rid) == self.client.session:
            self.view = msg.meta.get("view", self.view)
            self.member = msg.meta.get("member", True)
            self._silent_servers(msg.meta.get("silent", []))
            self._addresses(msg.meta.get("servers"))

    def _addresses(self, servers):
        """The servers' addresses now (``client.follow_servers`` moves a link to a server that
        came back on another host); a malformed list is dropped."""
        if servers is None:
            return
        if not (isinstance(servers, list) and all(isinstance(a, str) and a.startswith("tcp://") for a in servers)):
            log.warning("dropped a heartbeat answer's malformed list of server addresses: %.200r", servers)
            return
        self.servers = servers

    def _silent_servers(self, silent):
        """The coordinator's list of servers it has not heard from ([[rank, address, seconds]]):
        say when one goes silent (dead, or its link cut) and when it is heard again."""
        if not (isinstance(silent, list) and all(isinstance(x, list) and len(x) == 3 and isinstance(x[0], int)
                                                 and isinstance(x[1], str) and isinstance(x[2], (int, float))
                                                 for x in silent)):
            log.warning("dropped a heartbeat answer's malformed list of silent servers: %.200r", silent)
            return
        now = {rank: addr for rank, addr, _ in silent}
        for rank, addr, age in silent:
            if rank not in self.silent:
                log.warning("%s: the coordinator has not heard from server %d at %s for %.1f s (dead, or its "
                            "link cut?); this worker's requests to it wait up to --timeout (%.0f s)",
                            self.client.name, rank, addr, age, self.timeout)
        for rank, addr in self.silent.items():
            if rank not in now:
                log.warning("%s: server %d at %s is heard from again", self.client.name, rank, addr)
        self.silent = now

    def _watch(self, sock):
        """A silent coordinator is waited for up to --timeout (restarted, it rejoins the job)."""
        quiet = time.monotonic() - self.last_answer
        if not self.error and quiet > self.timeout:
            self.error = (f"the coordinator at {sock.endpoint} has not answered heartbeats for {quiet:.1f} s "
                          f"({sock.diagnose()}): it is dead or cut off, and the job cannot go on without it; "
                          "resume the whole job from the checkpoints (docs/failures.md)")
        elif quiet > self.silence and not self.waiting:
            self.waiting = True
            log.warning("%s: the coordinator at %s has not answered heartbeats for %.1f s (%s); waiting up to "
                        "--timeout (%.0f s) for it", self.client.name, sock.endpoint, quiet, sock.diagnose(),
                        self.timeout)

    def stop(self):
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=2.0)
