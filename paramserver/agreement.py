"""How the servers agree, at every synchronous step, on the set of workers it averages.

BSP promises that every shard of step t is averaged over the SAME workers. With a
fixed membership that is free: each server waits for every worker. Once workers can
die and be dropped, it is not: a worker killed between its push to server 0 and its
push to server 1 leaves server 0 with its gradient and server 1 without, and if
server 0 applied the step at once the two shards would be averaged over different
sets. So no server applies a step alone. Each one, once it has a push from every
worker of its view (or knows a peer lacks the missing ones), proposes the set of
workers it holds, and the servers exchange their proposals (the NORM message, which
carries the share of the squared gradient norm for global clipping as well):

    mine := the workers I hold a push from, minus those some peer's proposal lacks
            (a worker is named with its session: two processes of one rank differ)
    on a peer's proposal P:   mine := mine & P;  if mine shrank, re-average, send it again
    done when every peer's latest proposal equals mine

Proposals only shrink (so one that arrives after a smaller one from the same peer is
stale and ignored: the order of arrival does not matter), and each is a subset of its
sender's pushes, so every server ends with the same set: the intersection of what the servers hold, i.e. the workers
whose push reached every server (the proof is in docs/failures.md). In the common
case (nobody died) every proposal is the full view and one exchange suffices: the
S(S-1) small messages of the norm exchange that clipping needed anyway. A push left
out of the set is answered ``dropped`` after the step; its worker goes on from the
new parameters.

Restarts: a server keeps the last step it agreed on (``last``) and answers a peer
still at that step (its first proposal to us may have died with our previous self);
a server restarted from a checkpoint marks its first proposal ``fresh`` so that its
peers answer with theirs, which it may have lost. Answers are marked ``echo`` and
never answered, so two servers cannot keep each other talking.

With backup workers (``--backup-workers``) each server takes its first W - b pushes
and only the norms are exchanged (the sets are not compared); see docs/consistency.md.
Not here: sockets, gradients (``shard.py``), the view (``membership.py``).
"""
from __future__ import annotations


class Agreement:
    def __init__(self, rank: int, num_servers: int, by_set: bool = True):
        self.rank = rank
        self.peers = [s for s in range(num_servers) if s != rank]
        self.by_set = by_set                   # False: backup workers, norms only
        self.step = 0
        self.mine: frozenset | None = None     # this server's proposal (None: not complete yet)
        self.sumsq = 0.0                       # its share of the squared norm, over ``mine``
        self.heard: dict[int, tuple] = {}      # peer -> (its latest proposal or None, its sumsq)
        self.last: tuple | None = None         # (step, workers, sumsq) of the last step agreed on
        self.fresh = False                     # the next proposal asks the peers to answer

    def begin(self, step: int):
        """This server is now at ``step``: nothing proposed, nothing heard."""
        self.step, self.mine, self.sumsq, self.heard = step, None, 0.0, {}

    def allowed(self) -> frozenset | None:
        """The workers every peer heard from so far holds (None: no limit yet)."""
        sets = [w for w, _ in self.heard.values() if w is not None]
        return frozenset.intersection(*sets) if self.by_set and sets else None

    def complete(self, pushed, view) -> bool:
        """Can this server propose? ``pushed``: the (rank, session) of the pushes it holds;
        ``view``: {rank: session} of the live workers. Every worker of the view has pushed,
        or is missing from some peer's proposal already (waiting would change nothing)."""
        allowed = self.allowed()
        have = {r for r, _ in pushed}
        ok = {r for r, _ in allowed} if allowed is not None else None
        return all(r in have or (ok is not None and r not in ok) for r in view)

    def propose(self, pushed) -> frozenset:
        """This server's proposal: the (rank, session) of the pushes it holds, within what
        every peer heard from so far holds."""
        allowed = self.allowed()
        self.mine = frozenset(pushed) if allowed is None else frozenset(pushed) & allowed
        return self.mine

    def ranks(self) -> list[int]:
        """The ranks of this server's proposal, in order."""
        return sorted(r for r, _ in self.mine)

    def receive(self, peer: int, workers, sumsq: float) -> bool:
        """A peer's proposal for this step (``workers``: [[rank, session], ...]); True when
        it shrank ours (re-average, resend)."""
        theirs = frozenset(map(tuple, workers)) if (self.by_set and workers is not None) else None
        before = self.heard.get(peer, (None, 0.0))[0]
        if theirs is not None and before is not None and theirs > before:
            return False                    # an older proposal overtaken by a newer one: proposals only shrink
        self.heard[peer] = (theirs, float(sumsq))
        if self.mine is None or theirs is None or self.mine <= theirs:
            return False
        self.mine = self.mine & theirs
        return True

    def done(self) -> bool:
        if self.mine is None or any(p not in self.heard for p in self.peers):
            return False
        return not self.by_set or all(w == self.mine for w, _ in self.heard.values())

    def global_sumsq(self) -> float:
        """The squared norm of the whole averaged gradient: every server's share, in rank order."""
        shares = {p: s for p, (_, s) in self.heard.items()}
        shares[self.rank] = self.sumsq
        return sum(shares[s] for s in sorted(shares))

    def waiting_for(self) -> list[int]:
        """The peers whose agreeing proposal has not arrived (for deadline errors)."""
        return [p for p in self.peers if p not in self.heard
                or (self.by_set and self.heard[p][0] != self.mine)]

    def finish(self):
        """The step is agreed: remember it for late peers; the caller moves on."""
        self.last = (self.step, [list(p) for p in sorted(self.mine)], self.sumsq)
        self.fresh = False

    def state(self) -> dict:
        return {"last": list(self.last) if self.last else None}

    def load(self, state: dict):
        last = state.get("last")
        self.last = (int(last[0]), [[int(r), int(s)] for r, s in last[1]], float(last[2])) if last else None
        self.fresh = True
