"""The worker's heartbeat thread (worker/heartbeat.py) on its own, against a coordinator
that is not there."""
import socket
import time
from types import SimpleNamespace

from worker.heartbeat import Heartbeat


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stop_ends_the_thread_even_when_the_coordinator_never_took_a_beat():
    # Nobody listens: the socket queues beats until its queue is full. A blocking
    # send then waited forever and stop() could not end the thread (two such threads
    # were found alive in the test process minutes after their test had finished).
    client = SimpleNamespace(name="worker:0", session=1, version=0, identity=b"w0", curve=None,
                             cluster=SimpleNamespace(coordinator=f"tcp://127.0.0.1:{_unused_port()}"))
    hb = Heartbeat(client, interval=0.0005, silence=60.0, timeout=60.0)
    hb.start()
    try:
        deadline = time.monotonic() + 120            # a queue of beats at 0.5 ms each; wide for a loaded machine
        while hb.unsent == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hb.unsent > 0, f"the queue never filled: {hb.sent} beats queued in 120 s"
        assert hb.sent > 0                           # what was queued before the queue was full
    finally:
        hb.stop()
    hb.join(timeout=30)
    assert not hb.is_alive(), "stop() did not end the heartbeat thread"
    assert hb.answers == 0 and hb.error == ""
