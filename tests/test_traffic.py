"""The server's per-peer counters stay bounded by the job's size, whatever senders claim."""
from paramserver.traffic import Traffic


def test_counters_keep_only_the_jobs_processes():
    t = Traffic(num_servers=2, num_workers=3)
    for i in range(1000):                                   # a flood of made-up senders and connections
        t.received(b"id%d" % i, f"worker:{i}", 10, i, "push")
        t.received(b"x%d" % i, "tool:status", 5, 0, "status")
    t.received(b"w1-again", "worker:1", 7, 3, "push", "10.0.0.2")   # worker 1 reconnected
    t.sent(b"w1-again", 100)
    t.sent(b"id1", 50)                                      # its old connection is forgotten
    assert sorted(t.peers) == ["worker:0", "worker:1", "worker:2"]
    assert len(t.by_identity) == 3 and t.bytes_in == 1000 * 15 + 7 and t.bytes_out == 150
    w1 = t.peers["worker:1"]
    assert (w1.messages, w1.bytes_in, w1.bytes_out, w1.step, w1.address) == (2, 17, 100, 3, "10.0.0.2")
