"""Pulls a server cannot answer yet: before the parameters exist, or before a version.

A worker may pull before worker 0's INIT reached this server (it started first, or
this server restarted): the pull waits for the parameters. A pull may also ask for a
``min_version`` this server has not reached (a worker that rejoins, or one ahead of a
restarted server): it waits for that version. Both queues are bounded, per sender (4
pulls of one connection: a worker has one at a time) and in all (64 per worker of the
job), so that a peer flooding a queue is refused without keeping a worker's pull out;
a pull sent again (the same sender and request id) is held once. Every entry has a
deadline (``--timeout``): when it passes, the pull is refused with the reason.

Not here: pulls that wait for the consistency model (ssp holds a read while its
worker is too far ahead: ``modes.AsyncServing``).
"""
from __future__ import annotations

from dataclasses import dataclass

from common.wire.protocol import ProtocolError


@dataclass
class WaitingPull:
    identity: bytes
    rid: int
    since: float                            # when it arrived (the clock of the server)
    min_version: int = 0                    # the version it waits for (0: the initial parameters)


PER_SENDER = 4            # waiting pulls one connection may have in a queue
PER_WORKER = 64           # the whole queue's bound, per worker of the job


class PullQueue:
    def __init__(self, replier, num_workers: int, timeout: float):
        self.replier = replier
        self.limit = PER_WORKER * num_workers
        self.timeout = timeout
        self.before_init: list[WaitingPull] = []
        self.for_version: list[WaitingPull] = []

    def wait_for_init(self, identity: bytes, rid: int, now: float):
        if _admit(self.before_init, identity, rid, self.limit, "for the initial parameters"):
            self.before_init.append(WaitingPull(identity, rid, now))

    def wait_for_version(self, identity: bytes, rid: int, version: int, now: float):
        if _admit(self.for_version, identity, rid, self.limit, "for a version"):
            self.for_version.append(WaitingPull(identity, rid, now, version))

    def initialized(self):
        """The parameters arrived: answer every pull that waited for them."""
        for p in self.before_init:
            self.replier.params(p.identity, p.rid)
        self.before_init.clear()

    def reached(self, version: int):
        """This server is at ``version``: answer the pulls that waited for it."""
        ready = [p for p in self.for_version if p.min_version <= version]
        self.for_version = [p for p in self.for_version if p.min_version > version]
        for p in ready:
            self.replier.params(p.identity, p.rid)

    def oldest(self) -> float | None:
        """When the oldest pull waiting for a version arrived (None: none waits)."""
        return min((p.since for p in self.for_version), default=None)

    def expire(self, now: float, version: int):
        """Refuse the pulls that waited longer than the deadline, saying what for."""
        for p in [p for p in self.for_version if now - p.since > self.timeout]:
            self.replier.error(p.identity, p.rid, f"version {p.min_version} not reached within "
                                                  f"{self.timeout:.0f} s (at {version})")
        self.for_version = [p for p in self.for_version if now - p.since <= self.timeout]
        for p in [p for p in self.before_init if now - p.since > self.timeout]:
            self.replier.error(p.identity, p.rid, f"the parameters were not initialized within "
                                                  f"{self.timeout:.0f} s (worker 0 sends them)")
        self.before_init = [p for p in self.before_init if now - p.since <= self.timeout]

    def take_all(self) -> list[tuple[bytes, int]]:
        """(identity, rid) of every waiting pull, and forget them (the job stops)."""
        held = [(p.identity, p.rid) for p in self.for_version + self.before_init]
        self.for_version, self.before_init = [], []
        return held


def _admit(queue: list[WaitingPull], identity: bytes, rid: int, limit: int, what: str) -> bool:
    """Whether a pull joins ``queue``: False if it is there already (sent again); raises
    when its sender, or the queue, holds as many as it may."""
    mine = [p for p in queue if p.identity == identity]
    if any(p.rid == rid for p in mine):
        return False
    if len(mine) >= PER_SENDER:
        raise ProtocolError(f"too many pulls of this connection are waiting {what} ({PER_SENDER} at most)")
    if len(queue) >= limit:
        raise ProtocolError(f"too many pulls are waiting {what} ({limit} at most)")
    return True
