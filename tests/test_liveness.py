"""Heartbeats and views: a dead worker is dropped and BSP goes on with the rest, every shard
of a step averaged over the same workers; a restarted worker, or one that stalled and was
dropped, rejoins and trains; exactly-once pushes; ps-status shows the heartbeats."""
import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np

from common.wire import codec
from common.cluster import JobConfig
from common.layout import Layout
from common.wire.protocol import PUSH
from tests.cluster import ENV, Servers, run_threads
from tests.jobs import Job
from worker.client import PSClient

LAYOUT = Layout([("w", (6,)), ("b", (2,))])
BEAT = dict(heartbeat=0.2, heartbeat_misses=5)
FLAGS = ["--optimizer", "sgd", "--lr", "0.5", "--heartbeat", "0.2", "--heartbeat-misses", "5"]


def test_a_worker_that_dies_between_its_pushes_is_left_out_of_the_step_on_every_server(tmp_path):
    """Worker 1 pushes its gradient to server 0, not to server 1, and dies. Server 0 must
    not average it in alone: after the drop both shards step with worker 0's gradient only."""
    with Servers(2, 2, str(tmp_path), FLAGS, timeout=20) as servers:
        ready = threading.Barrier(2)

        def worker(rank):
            c = PSClient(servers.cluster(rank, **BEAT))
            c.register(LAYOUT, "float64")
            params = np.zeros(LAYOUT.size)
            if rank == 0:
                c.init(params)
            c.pull(params)
            if rank == 1:                    # half a push, then death (heartbeats stop)
                g = np.full(LAYOUT.size, 3.0)
                b, e = c.chunks[0][0]
                c.links[0].send(codec.encode(PUSH, c.name, step=0, rid=999, arrays=[g[b:e]], ranges=[(b, e)],
                                             session=c.session))
                ready.wait(10)
                c.close()
                return None
            ready.wait(10)
            c.push_pull(np.ones(LAYOUT.size), params, 0)
            version = c.version
            c.done()
            c.close()
            return params, version
        params, version = run_threads(worker, 2, timeout=60)[0]
        assert version == 1
        np.testing.assert_array_equal(params, np.full(LAYOUT.size, -0.5))   # 0 - 0.5 * 1, on both shards
        assert servers.wait() == [0, 0]
        assert "dropped worker 1" in servers.log(0)


def test_a_restarted_worker_rejoins_with_its_shard_and_trains(tmp_path):
    steps = 120
    with Job(tmp_path, S=2, W=2, steps=steps, timeout=10, worker_args=["--straggler", "0:0.04"]) as job:
        job.start()
        job.until(lambda: job.step() >= 10, 60, "step 10")
        job.kill("worker-1")
        job.until(lambda: "dropped worker 1" in job.log("server-0"), 30, "worker 1 dropped")
        job.worker(1)
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        w1 = job.worker_json(1)
        assert 10 < w1["joined_at"] < steps and w1["iterations"] == steps - w1["joined_at"]
        assert "shard 2/2" in job.log("worker-1")                       # rank 1's data, as before
        assert f"joining the job at version {w1['joined_at']}" in job.log("worker-1")
        server = job.server_json(0)
        assert [d["rank"] for d in server["dropped_workers"]] == [1]
        assert [d["rank"] for d in server["rejoined_workers"]] == [1]
        assert int(server["applied_by_worker"]["1"]) > w1["iterations"] - 2   # it was averaged in again
        assert [r["step"] for r in job.metrics()][-1] == steps
        wire = [r["bytes_pushed"] for r in job.metrics() if "bytes_pushed" in r]
        assert wire == sorted(wire)             # the job's total: the dead worker's bytes stay in it


def test_a_stalled_worker_is_dropped_then_registers_again_by_itself(tmp_path):
    # 300 steps of at least 0.03 s: after its wake-up the worker has seconds to rejoin before the job ends
    with Job(tmp_path, S=2, W=2, steps=300, timeout=10, worker_args=["--straggler", "0:0.03"]) as job:
        job.start()
        job.until(lambda: job.step() >= 10, 60, "step 10")
        os.kill(job.procs["worker-1"].pid, signal.SIGSTOP)            # a stall: alive, silent
        try:
            job.until(lambda: "dropped worker 1" in job.log("server-0"), 30, "worker 1 dropped")
            at = job.step()
            job.until(lambda: job.step() >= at + 5, 30, "the job going on without it")
        finally:
            os.kill(job.procs["worker-1"].pid, signal.SIGCONT)
        codes = job.wait(120)
        assert all(c == 0 for c in codes.values()), codes
        assert "was dropped from the job" in job.log("worker-1") and job.worker_json(1)["rejoins"] == 1
        assert "worker 1 joined the running job" in job.log("server-0")


def test_ps_status_shows_heartbeats_and_the_view(tmp_path):
    with Job(tmp_path, S=2, W=2, steps=400, timeout=10, worker_args=["--straggler", "0:0.02"]) as job:
        job.start()
        job.until(lambda: job.step() >= 5, 60, "step 5")
        job.kill("worker-1")
        job.until(lambda: "dropped worker 1" in job.log("server-0"), 30, "worker 1 dropped")
        done = subprocess.run([sys.executable, "-m", "common.launch.status", "--coordinator", job.coordinator, "--json",
                               "--interval", "0.3"], capture_output=True, text=True, env=ENV, timeout=60)
        assert done.returncode == 0, done.stderr
        rows = {(r["role"], r["rank"]): r for r in json.loads(done.stdout)["rows"]}
        assert rows[("worker", 0)]["heartbeat"] < 2 and not rows[("worker", 0)]["dropped"]
        assert rows[("worker", 1)]["heartbeat"] > 1 and rows[("worker", 1)]["dropped"]
        assert rows[("server", 1)]["heartbeat"] < 2 and rows[("server", 0)]["heartbeat"] is None
        text = subprocess.run([sys.executable, "-m", "common.launch.status", "--coordinator", job.coordinator,
                               "--interval", "0.3"], capture_output=True, text=True, env=ENV, timeout=60).stdout
        assert "view 2 (workers [0])" in text and "dropped" in text


def _joined(servers, rank, layout, job=None, shm="off"):
    """Through sockets unless ``shm``: these tests read answers off the client's link with the codec."""
    return servers.joined(rank, layout, job, shm=shm, **BEAT)


def _push_threes_when(event, c, params):
    """Once ``event`` is set, push a gradient of 3s for step 0, and finish."""
    assert event.wait(20)
    c.push_pull(np.full(params.size, 3.0), params, 0)
    c.done()
    c.close()
    return params


def test_a_push_sent_twice_is_applied_once(tmp_path):
    """The same push (same session and request id) sent three times while its step waits,
    and again after the step was applied: one update; the waiting copies get one answer
    (on the connection they came from last), the late copy is answered again."""
    with Servers(1, 2, str(tmp_path), FLAGS + ["--out", tmp_path / "out"], timeout=20) as servers:
        copies_in = threading.Event()

        def worker(rank):
            c, params = _joined(servers, rank, LAYOUT)
            if rank == 1:
                return _push_threes_when(copies_in, c, params)
            link = c.links[0]

            def answer():
                assert link.poll(20000), "no answer"
                return codec.decode(link.recv())
            push = codec.encode(PUSH, c.name, step=0, rid=77, arrays=[np.ones(LAYOUT.size)],
                                ranges=[(0, LAYOUT.size)], session=c.session)
            for _ in range(3):
                link.send(push)
            link.send(codec.encode("pull", c.name, rid=78))      # answered after the copies were read (in order)
            first = answer()
            assert first.rid == 78 and first.meta["version"] == 0
            copies_in.set()                                     # now worker 1 pushes: the step completes
            applied = answer()
            link.send(push)                                     # a copy of a push already applied
            again = answer()
            assert not link.poll(500), "more answers than pushes"
            c.done()
            c.close()
            return applied, again
        (applied, again), params1 = run_threads(worker, 2, timeout=60)
        for a in (applied, again):
            assert a.rid == 77 and a.meta["version"] == 1
            np.testing.assert_array_equal(a.arrays[0], np.full(LAYOUT.size, -1.0))   # 0 - 0.5 * (1 + 3) / 2
        np.testing.assert_array_equal(params1, np.full(LAYOUT.size, -1.0))
        assert servers.wait() == [0]
        metrics = json.loads((tmp_path / "out" / "server-0.json").read_text())
        assert metrics["version"] == 1 and metrics["repeated_pushes"] == 1


def test_refusals_are_counted_in_the_written_metrics(tmp_path):
    with Servers(1, 1, str(tmp_path), FLAGS + ["--out", tmp_path / "out"], timeout=20) as servers:
        c = PSClient(servers.cluster(0, **BEAT))
        c.register(LAYOUT, "float64")
        c.init(np.zeros(LAYOUT.size))
        for bad in ([b"\xc1garbage"], codec.encode("barrier", "worker:0", rid=3, name="x")):
            c.links[0].send([bytes(f) for f in bad])
            assert c.links[0].poll(10000) and codec.decode(c.links[0].recv()).cmd == "error"
        c.done()
        c.close()
        assert servers.wait() == [0]
        assert json.loads((tmp_path / "out" / "server-0.json").read_text())["refused"] == 2


def test_a_push_in_chunks_sent_twice_is_applied_once(tmp_path):
    """Plain BSP with two chunks on the server: worker 0 pushes its step in two messages and
    sends the first one twice while the step waits, then once more after it was applied.
    One update; every message is answered with the chunks it carried; the late copy is
    answered again and not applied."""
    layout = Layout([("w", (1 << 18,))])            # 2 MiB of float64: two chunks of 1 MiB with --chunk-mb 0.5
    flags = FLAGS + ["--chunk-mb", "0.5", "--out", tmp_path / "out"]
    with Servers(1, 2, str(tmp_path), flags, timeout=20) as servers:
        copies_in = threading.Event()

        def worker(rank):
            c, params = _joined(servers, rank, layout, JobConfig(chunk_mb=0.5))
            if rank == 1:
                return _push_threes_when(copies_in, c, params)
            chunks = c.chunks[0]
            assert len(chunks) == 2, chunks
            link = c.links[0]

            def answer():
                assert link.poll(20000), "no answer"
                return codec.decode(link.recv())

            def push(rid, r):
                return codec.encode(PUSH, c.name, step=0, rid=rid, arrays=[np.ones(r[1] - r[0])], ranges=[r],
                                    session=c.session)
            first, second = push(77, chunks[0]), push(78, chunks[1])
            link.send(first)
            link.send(first)
            link.send(second)
            link.send(codec.encode("pull", c.name, rid=79))      # answered after the pushes were read
            assert answer().rid == 79
            copies_in.set()                                     # now worker 1 pushes: the step completes
            answers = {a.rid: a for a in (answer(), answer())}
            link.send(first)                                    # a copy of a message already applied
            again = answer()
            assert not link.poll(500), "more answers than messages"
            c.done()
            c.close()
            return answers, again, chunks
        (answers, again, chunks), params1 = run_threads(worker, 2, timeout=60)
        assert sorted(answers) == [77, 78]
        for a, r in [(answers[77], chunks[0]), (answers[78], chunks[1]), (again, chunks[0])]:
            assert a.meta["version"] == 1 and a.ranges == [tuple(r)]
            np.testing.assert_array_equal(a.arrays[0], np.full(r[1] - r[0], -1.0))   # 0 - 0.5 * (1 + 3) / 2
        assert again.rid == 77
        np.testing.assert_array_equal(params1, np.full(layout.size, -1.0))
        assert servers.wait() == [0]
        metrics = json.loads((tmp_path / "out" / "server-0.json").read_text())
        assert metrics["version"] == 1 and metrics["repeated_pushes"] == 1
