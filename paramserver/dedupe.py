"""Exactly once: a resent push is applied at most once.

A worker resends a request when its connection to a server broke and came back (the
server may have restarted, or a link flapped): the request may or may not have
arrived the first time. Retries make delivery at-least-once; this table makes the
effect exactly-once. A push is named by (worker rank, session, request id): the
session is the worker process's incarnation (the coordinator gives a new one at every
registration, ``membership.py``), the request id its count of requests. For each
worker the server remembers the last push it applied (all its messages, when it came
chunk by chunk) and the answer's fields; a push with that name is answered again
(the current parameters, which a synchronous step cannot have moved past: the worker's next push is needed for that) and changes
nothing. A resent push still waiting for its step just takes the new connection for
its answer (``server.py``). The table is part of the server's checkpoint, so a server
restarted from it still recognises a push it applied before it died.

Not here: sockets, the steps themselves.
"""
from __future__ import annotations


class Applied:
    def __init__(self):
        self.last: dict[int, dict] = {}       # worker rank -> {"session", "rid", "step", "version", "meta"}
        self.repeats = 0                      # resent pushes answered without applying them again

    def find(self, rank: int, session: int, rid: int) -> dict | None:
        """The record of this exact push if it was applied, else None."""
        rec = self.last.get(rank)
        if rec is not None and rec["session"] == session and (rec["rid"] == rid or rid in rec.get("rids", ())):
            self.repeats += 1
            return rec
        return None

    def record(self, rank: int, session: int, rid: int, step: int, version: int, meta: dict, rids=None):
        """Push ``rid`` of ``rank`` (session ``session``) for ``step`` was applied; the
        server is now at ``version``; ``meta`` is what its answer said besides the parameters.
        ``rids``: every request id of the push when it came in several messages (chunks)."""
        self.last[rank] = {"session": session, "rid": rid, "step": step, "version": version, "meta": meta}
        if rids:
            self.last[rank]["rids"] = list(rids)

    def state(self) -> list:
        return [dict(rec, rank=rank) for rank, rec in sorted(self.last.items())]

    def load(self, state: list):
        self.last = {int(rec["rank"]): {k: v for k, v in rec.items() if k != "rank"} for rec in state}
