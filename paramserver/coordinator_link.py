"""A server's line to the coordinator (servers s > 0): registration, heartbeats, control.

- ``register``: REGISTER to the coordinator (with the versions of its checkpoints when
  resuming), sent again if the connection was lost and came back; the JOB answer is
  returned, an ERROR or the deadline (``--timeout``) raises ``ServerError``;
- ``heartbeat``: one every ``--heartbeat`` seconds; the answers and VIEW messages carry
  the view; SHUTDOWN ends the job (``failed``: with an error);
- ``watch``: a coordinator whose heartbeat answers stop is waited for up to ``--timeout``
  (restarted with ``--resume``, it rejoins the running job); past it, it is gone, and so
  is the job: the text says so.

The ZeroMQ guide's Paranoid Pirate, seen from the worker's side of the queue.
Not here: what the coordinator decides (``coordinator.py``), the view (``view.py``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from common.wire.protocol import ERROR, HEARTBEAT, JOB, OK, REGISTER, SHUTDOWN, VIEW
from paramserver.errors import ServerError

log = logging.getLogger("server")


@dataclass
class Control:
    """What a message from the coordinator asks of the server."""
    kind: str                                   # "view", "stop", "fail" (SHUTDOWN failed), "error" or "ignore"
    text: str = ""
    number: int = 0                             # view: its number and [[rank, session], ...]
    pairs: list | None = None
    servers: list | None = None                 # view: every server's address now (one may have moved)


class CoordinatorLink:
    def __init__(self, cluster, dealer, replier):
        self.cluster, self.dealer, self.replier = cluster, dealer, replier
        self.heard = time.monotonic()           # when the coordinator last answered
        self.last_beat = 0.0                    # when this server last sent a heartbeat (s > 0)
        self.waiting = False                    # the coordinator is silent: waiting for it (said once)

    def register(self, meta: dict, decode) -> dict:
        """Send REGISTER until the coordinator answers with the job (its meta is returned).
        ``decode(frames, who)``: the server's decoder (None for a malformed message)."""
        c, dealer = self.cluster, self.dealer
        self.replier.to_coordinator(REGISTER, rid=1, **meta)
        sent_on = dealer.connections()[0]
        deadline = time.monotonic() + c.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(f"the coordinator at {c.coordinator} has not answered this server's registration "
                                  f"for {c.timeout:.0f} s ({dealer.diagnose()}); is server 0 running, and are all "
                                  "processes started?")
            why = dealer.refused()                        # a refused handshake never answers
            if why:
                raise ServerError(f"cannot talk to the coordinator at {c.coordinator}: {why}")
            if dealer.connections()[0] > max(sent_on, 1):   # reconnected: the request may be lost
                self.replier.to_coordinator(REGISTER, rid=1, **meta)
                sent_on = dealer.connections()[0]
            if dealer.poll(min(left, 0.5) * 1000):
                msg = decode(dealer.recv(), "the coordinator")
                if msg is None:
                    continue
                if msg.cmd == ERROR:
                    raise ServerError(f"the coordinator refused this server: {msg.meta['message']}")
                if msg.cmd == JOB:
                    self.heard = time.monotonic()
                    return msg.meta

    def heartbeat(self, version: int, session: int):
        """A heartbeat to the coordinator when one is due."""
        if self.cluster.heartbeat <= 0:
            return
        now = time.monotonic()
        if now - self.last_beat >= self.cluster.heartbeat:
            self.last_beat = now
            self.replier.to_coordinator(HEARTBEAT, step=version, session=session, version=version)

    def report(self, session: int, text: str):
        """This server cannot go on: the coordinator stops the job with ``text``."""
        self.replier.to_coordinator(HEARTBEAT, session=session, error=text)

    def control(self, msg) -> Control:
        """A message from the coordinator: a heartbeat's answer, a view, the end."""
        if msg.cmd in (OK, VIEW):
            self.heard = time.monotonic()
            if self.waiting:
                self.waiting = False
                log.warning("the coordinator answers again")
            if "workers" in msg.meta and "view" in msg.meta:
                return Control("view", number=msg.meta["view"], pairs=msg.meta["workers"],
                               servers=msg.meta.get("servers"))
            return Control("ignore")
        if msg.cmd == SHUTDOWN and msg.meta.get("failed"):
            return Control("fail", msg.meta.get("reason", ""))
        if msg.cmd == SHUTDOWN:
            return Control("stop", msg.meta.get("reason", ""))
        if msg.cmd == ERROR:
            return Control("error", msg.meta["message"])
        return Control("ignore", f"ignored {msg.cmd} from the coordinator")

    def watch(self, now: float) -> str | None:
        """Why the coordinator counts as gone (None: it is not): heartbeats unanswered for
        the silence of a worker while its connection is lost, or for the job's timeout."""
        c = self.cluster
        if c.heartbeat <= 0:
            return None
        quiet = now - self.heard
        if quiet > c.timeout:
            return (f"the coordinator (server 0 at {c.coordinator}) has not answered heartbeats for "
                    f"{quiet:.1f} s ({self.dealer.diagnose()}): it is dead or cut off, and the job cannot go on "
                    "without it; resume the whole job from the checkpoints (docs/failures.md)")
        if quiet > c.silence_s and not self.waiting:
            self.waiting = True
            log.warning("the coordinator (server 0 at %s) has not answered heartbeats for %.1f s (%s); waiting up "
                        "to --timeout (%.0f s) for it: restarted with --resume, it rejoins the job", c.coordinator,
                        quiet, self.dealer.diagnose(), c.timeout)
        return None
