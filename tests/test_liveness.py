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

from common import codec
from common.layout import Layout
from common.protocol import PUSH
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


def test_a_stalled_worker_is_dropped_then_registers_again_by_itself(tmp_path):
    with Job(tmp_path, S=2, W=2, steps=150, timeout=10, worker_args=["--straggler", "0:0.03"]) as job:
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
        done = subprocess.run([sys.executable, "-m", "common.status", "--coordinator", job.coordinator, "--json",
                               "--interval", "0.3"], capture_output=True, text=True, env=ENV, timeout=60)
        assert done.returncode == 0, done.stderr
        rows = {(r["role"], r["rank"]): r for r in json.loads(done.stdout)["rows"]}
        assert rows[("worker", 0)]["heartbeat"] < 2 and not rows[("worker", 0)]["dropped"]
        assert rows[("worker", 1)]["heartbeat"] > 1 and rows[("worker", 1)]["dropped"]
        assert rows[("server", 1)]["heartbeat"] < 2 and rows[("server", 0)]["heartbeat"] is None
        text = subprocess.run([sys.executable, "-m", "common.status", "--coordinator", job.coordinator,
                               "--interval", "0.3"], capture_output=True, text=True, env=ENV, timeout=60).stdout
        assert "view 2 (workers [0])" in text and "dropped" in text
