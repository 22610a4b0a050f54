"""Bytes counted as they travel, both ways, headers included (worker/requests.py, paramserver/traffic.py).

A diloco job with compressed pushes and pulls on one server, heartbeats off (they travel on
their own socket, which the worker does not count): every byte the workers say they sent
is a byte the server says it received, and every byte the server answered with is a byte
a worker says it received; the headers are counted (the totals exceed the arrays'); the
answers' ``stats`` carry the job's totals to worker 0's metrics; the server's JSON has
its totals and a row per peer.
"""
import json

import numpy as np

from common.cluster import JobConfig
from common.optim import OptimConfig
from tests.cluster import Servers, run_threads
from tests.test_consistency import CFG, batch, flags, rows_of
from worker.client import PSClient
from worker.mode_loops import make_loop
from worker.model import GPT
from worker.train import compute_gradients


def test_every_byte_is_counted_on_both_sides(tmp_path):
    W, K = 2, 6
    job = JobConfig(mode="diloco", local_steps=2, compress="int8", compress_pull="int8")
    args = [*flags(OptimConfig(optimizer="adamw", lr=0.01), job, tmp_path), "--heartbeat", "0"]
    with Servers(1, W, str(tmp_path), args) as servers:
        def worker(rank):
            model = GPT(CFG, dtype=np.float64, seed=0)
            client = PSClient(servers.cluster(rank, heartbeat=0), job)
            info = client.register(model.layout, "float64")
            if rank == 0:
                client.init(model.params)
            client.pull(model.params)
            loop = make_loop(job, client, model, K, W, info.get("optim"))
            i, stats = 0, {}
            while not loop.finished():
                idx, tgt = batch(i, rows_of(rank))
                stats = loop.step(compute_gradients(model, idx, tgt), idx.size).reply.get("stats", stats)
                i += 1
            client.done()
            client.close()
            return client, stats
        results = run_threads(worker, W)
        assert servers.wait() == [0]
    server = json.loads((tmp_path / "server-0.json").read_text())
    clients = [c for c, _ in results]
    sent, received = sum(c.bytes_sent for c in clients), sum(c.bytes_received for c in clients)
    assert server["bytes_in"] == sent and server["bytes_out"] == received
    for c in clients:
        assert c.bytes_sent > c.bytes_pushed > 0 and c.bytes_received > c.bytes_pulled > 0
    n = clients[0].answers.pull.hat.size
    # the first pull in full (float64), then 3 rounds of int8 changes (plain pulls: 4 n 8 bytes)
    assert n * 8 < clients[1].bytes_pulled < n * 8 + 3 * n * 1.1
    stats = results[0][1]                                           # as of the last push (before it)
    assert 0 < stats["bytes_sent"] < sent and 0 < stats["bytes_received"] < received
    peers = {p["sender"]: p for p in server["peers"]}
    assert sum(peers[f"worker:{r}"]["bytes_in"] for r in range(W)) <= sent
