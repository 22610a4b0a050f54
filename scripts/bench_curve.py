"""What CurveZMQ encryption costs: push+pull round trips through a real server, plain vs --curve.

    python scripts/bench_curve.py                 # 4 MiB and 32 MiB of float32, 1 server, 1 worker
    python scripts/bench_curve.py --mib 1 16 64 --rounds 20

For each size, one server is started plain and one with ``--curve`` (keys made by
``ps-keys`` in a temporary folder); a worker pushes a gradient of that size and gets the
parameters back, ``--rounds`` times, in alternation between the two jobs so machine noise
hits both alike. Prints the median round-trip time and goodput (bytes pushed + pulled per
second) of each, and the ratio curve/plain; the last line is one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
import numpy as np  # noqa: E402

from common.cluster import ClusterConfig  # noqa: E402
from common.wire.transport import free_port, generate_keys  # noqa: E402
from common.layout import Layout  # noqa: E402
from worker.client import PSClient  # noqa: E402


def start_job(n, curve, logdir):
    port = free_port()
    cmd = [sys.executable, "-m", "paramserver", "--rank", "0", "--num-servers", "1", "--num-workers", "1",
           "--coordinator", f"127.0.0.1:{port}", "--bind", f"tcp://127.0.0.1:{port}", "--optimizer", "sgd",
           "--lr", "0", "--log-level", "WARNING"] + (["--curve", curve] if curve else [])
    proc = subprocess.Popen(cmd, stdout=open(os.path.join(logdir, f"server-{port}.log"), "w"),
                            stderr=subprocess.STDOUT)
    client = PSClient(ClusterConfig(rank=0, coordinator=f"127.0.0.1:{port}", curve=curve or "", timeout=60))
    layout = Layout([("x", (n,))])
    client.register(layout, "float32")
    params, grads = np.zeros(n, np.float32), np.ones(n, np.float32)
    client.init(params)
    return proc, client, params, grads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=float, nargs="+", default=[4, 32], help="vector sizes in MiB (default: 4 32)")
    ap.add_argument("--rounds", type=int, default=15, help="timed round trips per job and size (default: 15)")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = os.path.join(tmp, "keys")
        generate_keys(keys)
        for mib in args.mib:
            n = int(mib * (1 << 20)) // 4
            jobs = {"plain": start_job(n, "", tmp), "curve": start_job(n, keys, tmp)}
            times = {k: [] for k in jobs}
            step = {k: 0 for k in jobs}
            for r in range(args.rounds + 2):
                for name, (_, client, params, grads) in jobs.items():
                    t0 = time.perf_counter()
                    client.push_pull(grads, params, step[name])
                    dt = time.perf_counter() - t0
                    step[name] += 1
                    if r >= 2:                       # the first rounds warm buffers and connections
                        times[name].append(dt)
            for proc, client, _, _ in jobs.values():
                client.done()
                client.close()
                proc.wait(timeout=30)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"mib": mib, "plain_ms": med["plain"] * 1e3, "curve_ms": med["curve"] * 1e3,
                   "plain_gbps": 2 * n * 4 / med["plain"] / 1e9, "curve_gbps": 2 * n * 4 / med["curve"] / 1e9,
                   "ratio_curve_over_plain_goodput": med["plain"] / med["curve"]}
            results.append(row)
            print(f"{mib:6.1f} MiB each way: plain {row['plain_ms']:8.1f} ms ({row['plain_gbps']:.2f} GB/s), "
                  f"curve {row['curve_ms']:8.1f} ms ({row['curve_gbps']:.2f} GB/s); "
                  f"goodput with CurveZMQ = {row['ratio_curve_over_plain_goodput']:.2f}x plain")
    print(json.dumps({"bench": "curve", "results": results}))


if __name__ == "__main__":
    main()
