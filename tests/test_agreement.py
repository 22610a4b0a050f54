"""The servers' agreement on the workers of a step (paramserver/agreement.py), as pure logic:
whatever the pushes each server holds and whatever order the proposals arrive in, every
server ends with the same set, the workers whose push reached every server."""
import random

from paramserver.agreement import Agreement


def simulate(holds: list[set], view: dict, dead: set, seed: int):
    """Servers holding the pushes ``holds[s]`` (sets of (rank, session)) exchange proposals
    in a random order; the coordinator's view change that drops the ``dead`` workers
    reaches each server at a random moment among the messages. Returns each final set."""
    rng = random.Random(seed)
    S = len(holds)
    agree = [Agreement(s, S) for s in range(S)]
    views = [dict(view) for _ in range(S)]
    for a in agree:
        a.begin(7)
    events = [("view", s) for s in range(S)]           # each server learns the new view once
    done = [False] * S

    def propose(s):
        a = agree[s]
        if a.mine is None and a.complete(holds[s], views[s]):
            a.propose(holds[s])
            events.extend(("msg", s, p, sorted(a.mine)) for p in a.peers)

    for s in range(S):
        propose(s)
    while events:
        ev = events.pop(rng.randrange(len(events)))
        if ev[0] == "view":
            s = ev[1]
            views[s] = {r: v for r, v in views[s].items() if r not in dead}
            if not done[s]:
                propose(s)
        else:
            _, src, dst, workers = ev
            a = agree[dst]
            if done[dst]:
                continue                             # a late proposal of a finished step: ignored
            if a.receive(src, [list(w) for w in workers], 0.0):
                events.extend(("msg", dst, p, sorted(a.mine)) for p in a.peers)
            if a.mine is None:
                propose(dst)
        for s in range(S):
            if not done[s] and agree[s].done():
                done[s] = True
    assert all(done), "a server never finished"
    return [a.mine for a in agree]


def test_every_server_ends_with_the_intersection_of_what_they_hold():
    rng = random.Random(0)
    for trial in range(500):
        S, W = rng.randint(2, 5), rng.randint(1, 6)
        view = {r: 1 for r in range(W)}
        everyone = {(r, 1) for r in range(W)}
        holds = [set(everyone) for _ in range(S)]
        dead = set()
        for r in range(W):                           # some workers died mid-push: reached only some servers
            if rng.random() < 0.4:
                dead.add(r)
                for s in rng.sample(range(S), rng.randint(1, S)):
                    holds[s].discard((r, 1))
        got = simulate(holds, view, dead, trial)
        want = frozenset(set.intersection(*holds))
        assert all(g == want for g in got), (trial, holds, got)


def test_a_server_missing_a_push_does_not_wait_once_a_peer_shows_it_cannot_count():
    a = Agreement(0, 2)
    a.begin(3)
    view = {0: 1, 1: 1}
    assert not a.complete({(0, 1)}, view)                 # waiting for worker 1
    a.receive(1, [[0, 1]], 0.5)                           # server 1 proposes without worker 1
    assert a.complete({(0, 1)}, view)
    assert a.propose({(0, 1)}) == frozenset({(0, 1)}) and a.done()
    assert a.global_sumsq() == 0.5


def test_two_processes_of_one_rank_are_not_mixed():
    a = Agreement(0, 2)
    a.begin(0)
    a.propose({(0, 1), (1, 1)})                            # worker 1's first process
    assert a.receive(1, [[0, 1], [1, 2]], 0.0)            # server 1 holds its replacement's push
    assert a.mine == frozenset({(0, 1)})


def test_the_last_step_survives_a_checkpoint():
    a = Agreement(1, 3)
    a.begin(5)
    a.propose({(0, 4)})
    a.sumsq = 2.0
    a.receive(0, [[0, 4]], 1.0)
    a.receive(2, [[0, 4]], 3.0)
    assert a.done() and a.global_sumsq() == 6.0
    a.finish()
    b = Agreement(1, 3)
    b.load(a.state())
    assert b.last == (5, [[0, 4]], 2.0) and b.fresh
