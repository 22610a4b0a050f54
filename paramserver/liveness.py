"""Who is still alive, from heartbeats: the coordinator's clock of last messages.

Every worker and every server sends the coordinator a HEARTBEAT every ``--heartbeat``
seconds (workers from a thread of their own, so a long forward/backward does not
silence them; servers from their poll loop). The coordinator notes when it last
heard from each (``beat``); ``silent`` lists those not heard from for longer than a
given time. What follows from silence is decided in ``coordinator.py``: a silent
worker is dropped from the view after ``--heartbeat-misses`` heartbeats, a silent
server is waited for (a restarted one resumes from its checkpoint) until the job's
``--timeout``, and then the job stops naming it. The ZeroMQ guide's Paranoid Pirate
pattern; the trade-off (k misses of h seconds: a death noticed within k*h, a live but
stalled process wrongly declared dead only after k beats in a row) is lesson 7's.

Not here: sockets, the view itself (``membership.py``).
"""
from __future__ import annotations

import time


class Liveness:
    def __init__(self):
        self.last: dict[tuple[str, int], float] = {}     # (role, rank) -> time.monotonic() of its last beat
        self.wall: dict[tuple[str, int], float] = {}     # the same in wall-clock time, for status views

    def beat(self, role: str, rank: int, now: float | None = None):
        self.last[(role, rank)] = time.monotonic() if now is None else now
        self.wall[(role, rank)] = time.time()

    def start(self, members, now: float | None = None):
        """Everyone counts as just heard from (the job starts, or a member (re)joins)."""
        for role, rank in members:
            self.beat(role, rank, now)

    def forget(self, role: str, rank: int):
        self.last.pop((role, rank), None)

    def age(self, role: str, rank: int, now: float | None = None) -> float | None:
        """Seconds since ``(role, rank)`` was last heard from, None if never."""
        t = self.last.get((role, rank))
        return None if t is None else (time.monotonic() if now is None else now) - t

    def silent(self, role: str, ranks, longer_than: float, now: float | None = None) -> list[int]:
        """The ranks of ``role`` among ``ranks`` silent for more than ``longer_than`` seconds."""
        now = time.monotonic() if now is None else now
        return [r for r in ranks if now - self.last.get((role, r), now) > longer_than]

    def table(self) -> dict:
        """{"worker:1": wall-clock time of its last heartbeat, ...} for ps-status."""
        return {f"{role}:{rank}": t for (role, rank), t in sorted(self.wall.items())}
