"""paramserver/coordinator.py alone: server 0's second hat, driven without sockets.

A recording replier (tests/standins.py ``Replies``) stands in for the only sender, and
``ServerHooks`` record what the coordinator asks of server 0. What a user relies on:
once everyone registered, every member gets the job (server 0 through its hook); a
worker silent for --heartbeat-misses beats is dropped and every server learns the new
view; a server silent past --timeout stops the job, naming it and its address, and the
other servers are told; heartbeats from outside the job are refused; the job ends when
the last worker is done; a job that cannot start tells everyone who registered why.
"""
import time
from types import SimpleNamespace

import pytest

from common.cluster import ClusterConfig
from common.wire.protocol import JOB, OK, SHUTDOWN, VIEW, ProtocolError
from paramserver.coordinator import Coordinator, ServerHooks
from paramserver.errors import ServerError
from tests.standins import server_meta, worker_meta


class Hooks:
    """What server 0 was asked: its job, views, failures."""
    def __init__(self):
        self.jobs, self.views, self.failed = [], [], []

    def make(self):
        return ServerHooks(placement=lambda layout, S: [[0, layout.size, 0]], start_job=self.jobs.append,
                           version=lambda: 0, on_view=lambda n, pairs: self.views.append((n, pairs)),
                           fail_all=self.failed.append, servers_rejoin=True, mode="bsp")


def msg(meta, rid=1, sender=""):
    return SimpleNamespace(meta=meta, rid=rid, sender=sender)


def coordinator(replies, servers=2, workers=2, heartbeat=1.0, misses=3, timeout=20.0):
    hooks = Hooks()
    cluster = ClusterConfig(rank=0, num_servers=servers, num_workers=workers, heartbeat=heartbeat,
                            heartbeat_misses=misses, timeout=timeout)
    return Coordinator(cluster, {"optimizer": "sgd"}, {"mode": "bsp"}, replies, hooks.make()), hooks


def started(replies, **kw):
    c, hooks = coordinator(replies, **kw)
    c.on_register(b"", msg(server_meta(0)))                        # server 0 itself
    for s in range(1, c.members.num_servers):
        c.on_register(b"s%d" % s, msg(server_meta(s)))
    for r in range(c.members.num_workers):
        c.on_register(b"w%d" % r, msg(worker_meta(r, pid=r + 1)))
    return c, hooks


def test_everyone_gets_the_job_once_the_last_one_registered(replies):
    c, hooks = coordinator(replies)
    c.on_register(b"", msg(server_meta(0)))
    c.on_register(b"w0", msg(worker_meta(0, pid=1)))
    c.on_register(b"s1", msg(server_meta(1)))
    assert replies.sent == [] and not hooks.jobs                   # worker 1 is missing
    c.on_register(b"w1", msg(worker_meta(-1, pid=2), rid=7))
    assert [j["rank"] for j in hooks.jobs] == [0]                  # server 0's own job, through its hook
    assert {ident: (cmd, rid, meta["rank"]) for ident, cmd, rid, meta in replies.sent} == {
        b"s1": (JOB, 0, 1), b"w0": (JOB, 0, 0), b"w1": (JOB, 0, 1)}


def test_a_silent_worker_is_dropped_and_every_server_learns_the_view(replies):
    c, hooks = started(replies)
    replies.sent.clear()
    now = time.monotonic()
    c.liveness.beat("worker", 0, now + 10)
    c.liveness.beat("server", 1, now + 10)
    c.tick(now + 2.0)                                              # 2 s < 3 beats of 1 s: nothing yet
    assert 1 in c.members.live and not replies.sent
    c.tick(now + 10.5)                                             # worker 1 silent for 10 s
    assert sorted(c.members.live) == [0] and c.members.view == 2
    assert hooks.views == [(2, [[0, c.members.live[0]]])]
    assert replies.to(b"s1") == [(VIEW, {"view": 2, "workers": [[0, c.members.live[0]]]})]
    c.on_heartbeat(b"w1", msg({"session": 123}, sender="worker:1"))
    kind, answer = replies.to(b"w1")[-1]
    assert kind == OK and answer["view"] == 2 and answer["member"] is False     # it learns it is out


def test_a_server_silent_past_the_timeout_stops_the_job_naming_it(replies):
    c, hooks = started(replies, timeout=20.0)
    replies.sent.clear()
    now = time.monotonic()
    for r in (0, 1):
        c.liveness.beat("worker", r, now + 30)
    c.tick(now + 10)                                               # silent, but within --timeout: a warning
    assert not c.failure and 1 in c.warned
    c.tick(now + 25)
    assert "server 1 at tcp://h0:5701 has sent no heartbeat" in c.failure
    assert replies.to(b"s1") == [(SHUTDOWN, {"reason": c.failure, "failed": True})]
    assert hooks.failed == [f"the job is stopping: {c.failure}"]
    c.on_heartbeat(b"w0", msg({}, sender="worker:0"))
    assert "the job is stopping" in replies.to(b"w0")[-1][1]["message"]
    with pytest.raises(ServerError, match="server 1"):
        c.tick(c.stop_at + 0.1)


@pytest.mark.parametrize("sender, identity, why", [
    ("worker:5", b"w5", "not a member of this job"),
    ("nobody:0", b"x", "not a member of this job"),
    ("server:1", b"impostor", "on a connection that did not register it"),
])
def test_heartbeats_from_outside_the_job_are_refused(replies, sender, identity, why):
    c, _ = started(replies)
    with pytest.raises(ProtocolError, match=why):
        c.on_heartbeat(identity, msg({}, sender=sender))


def test_the_job_ends_when_the_last_worker_is_done(replies):
    c, _ = started(replies)
    replies.sent.clear()
    assert not c.on_done(0) and not c.finished
    assert c.on_done(1) and c.finished
    assert replies.to(b"s1") == [(SHUTDOWN, {"reason": "every worker is done"})]


def test_a_job_that_cannot_start_tells_everyone_who_registered(replies):
    c, _ = coordinator(replies, servers=2, workers=1)
    c.on_register(b"", msg(server_meta(0, versions=[50])))
    c.on_register(b"s1", msg(server_meta(1, versions=[100])))
    with pytest.raises(ServerError, match="no checkpoint of a common version"):
        c.on_register(b"w0", msg(worker_meta(0)))
    assert {ident for ident, cmd, _, _ in replies.sent if cmd == "ERROR"} == {b"s1", b"w0"}
