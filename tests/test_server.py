"""A live server: it refuses bad input without changing state, and every wait has a deadline."""
import hashlib
import re
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from common.wire import codec
from common.cluster import ClusterConfig
from common.layout import Layout
from common.wire.protocol import PROTOCOL_VERSION
from tests.cluster import SLACK, Servers, run_threads
from worker.client import DeadlineError, PSClient, RemoteError

LAYOUT = Layout([("w", (6,)), ("b", (2,))])


def raw_request(addr, frames, timeout_ms=3000):
    """Send frames from a fresh DEALER, return the decoded answer (or None)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    try:
        sock.send_multipart(frames)
        if sock.poll(timeout_ms):
            return codec.decode(sock.recv_multipart())
        return None
    finally:
        sock.close()


def checksum(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def test_bad_messages_are_refused_and_change_nothing(tmp_path):
    with Servers(1, 1, str(tmp_path), ["--optimizer", "sgd", "--lr", "0.1"]) as servers:
        client = PSClient(servers.cluster(0))
        job = client.register(LAYOUT, "float64")
        addr = job["servers"][0]
        params = np.arange(LAYOUT.size, dtype=np.float64)
        client.init(params)
        before = params.copy()
        good_push = lambda **kw: codec.encode("push", "worker:0", step=kw.pop("step", 0), rid=5,  # noqa: E731
                                              arrays=[kw.pop("a", np.ones(8))], ranges=[kw.pop("r", (0, 8))], **kw)
        header = msgpack.packb({"v": PROTOCOL_VERSION, "cmd": "push", "from": "worker:0", "step": 0, "rid": 5,
                                "arrays": [{"dtype": "float64", "shape": [8], "range": [0, 8]}], "meta": {}})
        cases = {
            "garbage": [b"\xc1\x00\xff"],
            "truncated": [header[:-4], bytes(64)],
            "short frame": [header, bytes(63)],
            "wrong version": [msgpack.packb({**msgpack.unpackb(header), "v": 7}), bytes(64)],
            "unknown command": [msgpack.packb({**msgpack.unpackb(header), "cmd": "format"}), bytes(64)],
            "wrong dtype": good_push(a=np.ones(8, dtype=np.float32)),
            "wrong range": good_push(a=np.ones(4), r=(4, 8)),
            "range not owned": good_push(a=np.ones(8), r=(100, 108)),
            "NaN gradient": good_push(a=np.array([1, 2, np.nan, 4, 5, 6, 7, 8.0])),
            "Inf gradient": good_push(a=np.array([1, 2, np.inf, 4, 5, 6, 7, 8.0])),
            "future step": good_push(step=3),
            "unknown worker": codec.encode("push", "worker:7", rid=5, arrays=[np.ones(8)], ranges=[(0, 8)]),
            "not a worker": codec.encode("push", "evil", rid=5, arrays=[np.ones(8)], ranges=[(0, 8)]),
            "register again": codec.encode("register", "worker:9", rid=5, role="worker", rank=0, host="h", pid=1),
            "done to a": codec.encode("barrier", "worker:0", rid=5, name="x"),
        }
        for name, frames in cases.items():
            reply = raw_request(addr, [bytes(f) for f in frames])
            assert reply is not None and reply.cmd == "error", f"{name}: expected an error reply, got {reply}"
            assert reply.meta["message"], name
        # the server is still serving, and its parameters did not move
        got = np.zeros(LAYOUT.size)
        client.pull(got)
        assert checksum(got) == checksum(before) and client.version == 0
        # and a normal worker then trains: one SGD step moves every parameter by -lr * grad
        client.push_pull(np.ones(LAYOUT.size), got, step=0, loss=1.0)
        np.testing.assert_allclose(got, before - 0.1)
        status = raw_request(addr, [bytes(f) for f in codec.encode("status", "tool:0", rid=1)])
        assert status.meta["status"]["refused"] >= len(cases)
        client.done()
        client.close()
        assert servers.wait() == [0]
        assert "refused" in servers.log(0)


def test_registration_deadline_names_the_missing(tmp_path):
    # two servers and two workers announced; only server 0 and one worker start
    with Servers(1, 2, str(tmp_path), ["--num-servers", "2"], timeout=2.0) as servers:
        client = PSClient(servers.cluster(0, num_servers=2))
        t0 = time.monotonic()
        with pytest.raises((RemoteError, DeadlineError)) as err:
            client.register(LAYOUT, "float64")
        assert time.monotonic() - t0 < 2 + SLACK  # the coordinator's 2 s deadline, plus a busy machine
        assert "server(s) [1]" in str(err.value) and "1 worker(s)" in str(err.value)
        client.close()
        assert servers.wait() == [1]
        assert "registration timed out" in servers.log(0)


def test_client_deadline_names_the_coordinator():
    from common.wire.transport import free_port
    port = free_port()
    client = PSClient(ClusterConfig(rank=0, coordinator=f"127.0.0.1:{port}", timeout=1.0))
    t0 = time.monotonic()
    with pytest.raises(DeadlineError, match=f"coordinator at tcp://127.0.0.1:{port}") as e:
        client.register(LAYOUT, "float64")
    assert "TCP connect: connection refused" in str(e.value)      # and why it cannot be reached
    assert time.monotonic() - t0 < 1 + 5 + SLACK   # timeout plus the registration grace of 5 s
    client.close()


def test_a_missing_worker_is_named_at_the_step_deadline(tmp_path):
    answered = threading.Event()
    with Servers(1, 2, str(tmp_path), ["--optimizer", "sgd"], timeout=2.0) as servers:
        def worker(rank):
            client, params = servers.joined(rank, LAYOUT)
            try:
                if rank == 1:
                    answered.wait(60)           # alive (heartbeats go on), but never pushes
                    return None
                try:
                    with pytest.raises((DeadlineError, RemoteError)) as err:
                        client.push_pull(np.ones(LAYOUT.size), params, 0)
                finally:
                    answered.set()
                return str(err.value)
            finally:
                client.close()
        text = run_threads(worker, 2)[0]
        assert re.search(r"server 0 (\(the coordinator\) )?at tcp://", text), text   # (a deadline, or a refusal)
        assert servers.wait() == [1]
        assert "worker(s) [1] have not pushed" in servers.log(0)


def test_mismatched_layouts_are_refused(tmp_path):
    other = Layout([("w", (5,)), ("b", (2,))])
    with Servers(1, 2, str(tmp_path), timeout=3.0) as servers:
        results = {}

        def register(rank, layout):
            c = PSClient(servers.cluster(rank))
            try:
                c.register(layout, "float64")
                results[rank] = "ok"
            except (RemoteError, DeadlineError) as e:
                results[rank] = str(e)
            c.close()
        t0 = threading.Thread(target=register, args=(0, LAYOUT))
        t0.start()
        register(1, other)
        t0.join(10)
        # whichever registered second (arrival order is up to the network) is refused
        refused = [r for r in results.values() if "layout hash" in r]
        assert len(refused) == 1 and "model configurations differ" in refused[0], results
        servers.wait()
