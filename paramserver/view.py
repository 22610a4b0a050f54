"""The view: which workers are alive, as a server knows it from the coordinator.

The coordinator numbers its views 1, 2, 3, ... and sends each to every server (VIEW,
and with every heartbeat answer): the live workers, each with its session (the
incarnation of its process, so two processes of one rank differ). A server keeps the
newest it has seen; an older one arriving late changes nothing. The synchronous steps
wait for the workers of the view; asp/ssp stop waiting for a worker that left it.

Not here: deciding who is alive (``coordinator.py``, ``liveness.py``).
"""
from __future__ import annotations

import logging

from common.wire.protocol import session_list

log = logging.getLogger("server")


class WorkerView:
    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.workers: dict[int, int] = {}       # live worker rank -> session: whom the steps wait for
        self.number = 0

    def update(self, number: int, pairs) -> tuple[set, set] | None:
        """Take view ``number`` (``pairs``: [[rank, session], ...], checked); returns the
        ranks (gone, new), or None when it is not newer than the one held."""
        if number <= self.number:
            return None
        view = session_list(pairs, self.num_workers, "view: workers")
        gone, new = set(self.workers) - set(view), set(view) - set(self.workers)
        self.workers, self.number = view, number
        if number > 1 and (gone or new):
            log.info("view %d: workers %s%s%s", number, sorted(view), f"; dropped {sorted(gone)}" if gone else "",
                     f"; joined {sorted(new)}" if new else "")
        return gone, new

    def session(self, rank: int) -> int | None:
        return self.workers.get(rank)

    def pairs(self) -> list[list[int]]:
        return [[r, s] for r, s in sorted(self.workers.items())]
