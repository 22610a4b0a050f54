"""Hello, parameter server: a linear model y = x.w + b trained by 2 workers through 2 real servers.

    python scripts/hello_ps.py

The servers know nothing of the model: they hold a flat vector of 5 numbers (w, b),
average the workers' gradients and take SGD steps. Each worker owns half the data.
"""
import subprocess, sys, threading
import numpy as np
from common.cluster import ClusterConfig
from common.layout import Layout
from common.wire.transport import free_port
from worker.client import PSClient

S, W, STEPS, LR = 2, 2, 200, 0.1
coord = f"127.0.0.1:{free_port()}"
servers = [subprocess.Popen([sys.executable, "-m", "paramserver", "--rank", str(s), "--num-servers", str(S),
                             "--bind", f"tcp://127.0.0.1:{coord.split(':')[1] if s == 0 else '*'}",
                             "--num-workers", str(W), "--coordinator", coord, "--optimizer", "sgd",
                             "--lr", str(LR), "--log-level", "WARNING"]) for s in range(S)]
layout = Layout([("w", (4,)), ("b", (1,))])               # the whole "model": 5 numbers
rng = np.random.default_rng(0)
true_w, true_b = np.array([2.0, -1.0, 0.5, 3.0]), 0.7
X = rng.normal(size=(1000, 4))
y = X @ true_w + true_b + 0.01 * rng.normal(size=1000)

def worker(rank):
    client = PSClient(ClusterConfig(rank=rank, num_servers=S, num_workers=W, coordinator=coord))
    client.register(layout, "float64")
    params, grads = np.zeros(layout.size), np.zeros(layout.size)
    w, b = layout.views(params)["w"], layout.views(params)["b"]
    if rank == 0:
        client.init(params)
    client.pull(params)
    Xr, yr = X[rank::W], y[rank::W]                      # this worker's half of the data
    for step in range(STEPS):
        err = Xr @ w + b - yr                            # dL/dpred of L = mean(err^2) / 2
        grads[:4], grads[4] = Xr.T @ err / len(yr), err.mean()
        reply = client.push_pull(grads, params, step, loss=float((err ** 2).mean() / 2))
        if rank == 0 and step % 50 == 0:
            print(f"step {step:3d}  loss {reply['loss']:.5f}")
    client.done()
    if rank == 0:
        print(f"learned w = {np.round(w, 3)}, b = {b[0]:.3f}  (true w = {true_w}, b = {true_b})")

threads = [threading.Thread(target=worker, args=(r,)) for r in range(W)]
[t.start() for t in threads]; [t.join() for t in threads]
sys.exit(max(p.wait(timeout=30) for p in servers))
