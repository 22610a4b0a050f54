"""Push+pull goodput of the parameter server against raw pyzmq moving the same bytes.

    python scripts/bench_wire.py                       # 64 KiB .. 64 MiB, 5 rounds
    python scripts/bench_wire.py --kib 1024 65536 --rounds 9

For each size n, a real server (``python -m paramserver``, SGD, one worker) holds a
float32 vector of n bytes; the worker (this process, ``PSClient``) pushes a gradient
of n bytes and gets the parameters back: one push_pull moves 2n bytes. The baseline is
raw pyzmq in the same shape: a DEALER sends n bytes without a copy to a ROUTER in
another process, which answers with n bytes of its own without a copy; nobody looks at
the bytes. Both run on 127.0.0.1, in alternating rounds, so that the noise of a shared
machine hits them alike; each round times ``--reps`` round trips of each and keeps the
median; the figure is the median over rounds. Goodput = 2n / round-trip time.

Also printed: the minor page faults this process took per MiB received (256 per MiB is
one per 4 KiB page: memory freshly mapped for every message), ours and raw; and where
the time of a round trip goes: the CPU milliseconds of the client (this process) and
of the server process, each split into user (Python, NumPy, copies) and system (the
kernel: TCP or Unix-socket copies, page faults) time, with the server's page faults per
MiB it received (Linux: read from /proc; all threads, libzmq's I/O thread included). A
round trip is mostly serial (the client waits while the server works), so its time
follows its CPU: on a loaded machine it is about the sum; with cores to spare the two
processes' threads overlap in part and it is less.

What ours does that raw pyzmq does not: the msgpack header and its checks, the server's
receive into the gradient slot and the client's into the parameters (one copy each
way, ``recv_into``), the server's optimizer step (SGD: two passes over the vector),
cutting the vector into chunks (``--chunk-mb``, default the job's 4 MiB). Ours goes
through the socket (``--shm off``) unless ``--transport shm``: then through shared
memory (``--shm auto``, the header alone on a Unix socket), against raw pyzmq over a
Unix socket.

Prints one line per size with both goodputs and the ratio ours/raw (target >= 0.8),
and, last, one JSON line.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a clone without installing
import numpy as np  # noqa: E402
import zmq  # noqa: E402  (the baseline only; the product's zmq lives in common/wire/transport.py)

from common.cluster import ClusterConfig, JobConfig  # noqa: E402
from common.layout import Layout  # noqa: E402
from common.wire.transport import free_port  # noqa: E402
from worker.client import PSClient  # noqa: E402

ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH")])))

RAW_SERVER = r"""
import sys, zmq
ctx = zmq.Context.instance()
r = ctx.socket(zmq.ROUTER)
r.bind(sys.argv[1])
answers = {}
while True:
    ident, frame = r.recv_multipart(copy=False)
    n = len(frame.buffer)
    if n == 0:
        break
    if n not in answers:
        answers[n] = bytearray(n)               # the answer's bytes, allocated once per size
    r.send_multipart([ident, answers[n]], copy=False)
"""


class Raw:
    """The baseline: raw pyzmq, n bytes each way, no copies, no header."""

    def __init__(self, logdir, transport):
        port = free_port()
        self.addr = f"tcp://127.0.0.1:{port}" if transport == "tcp" else f"ipc://{logdir}/raw-{port}.ipc"
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, self.addr], env=ENV,
                                     stdout=open(os.path.join(logdir, "raw.log"), "w"), stderr=subprocess.STDOUT)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.addr)
        self.bufs = {}

    def round_trip(self, n):
        buf = self.bufs.setdefault(n, np.ones(n // 4, np.float32))
        self.sock.send(memoryview(buf).cast("B"), copy=False)
        if not self.sock.poll(60_000):
            raise TimeoutError("the raw pyzmq server did not answer")
        self.sock.recv(copy=False)

    def close(self):
        self.sock.send(b"")
        self.proc.wait(timeout=10)
        self.sock.close()


class Ours:
    """One server and this process as its one worker, a float32 vector of n bytes."""

    def __init__(self, n, logdir, chunk_mb, transport):
        port = free_port()
        job = JobConfig(chunk_mb=chunk_mb)
        ipc = transport in ("ipc", "shm")
        cmd = [sys.executable, "-m", "paramserver", "--rank", "0", "--num-servers", "1", "--num-workers", "1",
               "--coordinator", f"127.0.0.1:{port}", "--bind", f"tcp://127.0.0.1:{port}", "--optimizer", "sgd",
               "--lr", "1e-6", "--chunk-mb", str(chunk_mb), "--log-level", "WARNING", "--ipc" if ipc else "--no-ipc"]
        self.proc = subprocess.Popen(cmd, env=ENV, stdout=open(os.path.join(logdir, f"server-{n}.log"), "w"),
                                     stderr=subprocess.STDOUT)
        self.client = PSClient(ClusterConfig(rank=0, coordinator=f"127.0.0.1:{port}", timeout=60, ipc=ipc,
                                             shm="auto" if transport == "shm" else "off"), job)
        self.client.register(Layout([("x", (n // 4,))]), "float32")
        self.params, self.grads = np.zeros(n // 4, np.float32), np.full(n // 4, 1e-3, np.float32)
        self.client.init(self.params)
        self.client.pull(self.params)
        self.step = 0

    def round_trip(self, n):
        self.client.push_pull(self.grads, self.params, self.step)
        self.step += 1

    def close(self):
        self.client.done()
        self.client.close()
        self.proc.wait(timeout=30)


def usage(pid=None):
    """(user s, system s, minor faults) of this process (pid None) or of process ``pid``
    (all threads; zeros where /proc cannot be read)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime, r.ru_stime, r.ru_minflt
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    return int(f[11]) / tick, int(f[12]) / tick, int(f[7])


def timed(fn, n, reps, server_pid):
    """(median seconds of a round trip, page faults of this process per MiB received,
    {client,server}_{user,sys} CPU seconds per round trip, server faults per MiB received)."""
    fn(n)                                           # warm: buffers allocated, pages touched
    times = []
    c0, s0 = usage(), usage(server_pid)
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(n)
        times.append(time.perf_counter() - t0)
    c1, s1 = usage(), usage(server_pid)
    mib = reps * n / (1 << 20)
    cpu = {"client_user": (c1[0] - c0[0]) / reps, "client_sys": (c1[1] - c0[1]) / reps,
           "server_user": (s1[0] - s0[0]) / reps, "server_sys": (s1[1] - s0[1]) / reps,
           "server_faults_per_mib": (s1[2] - s0[2]) / mib}
    return statistics.median(times), (c1[2] - c0[2]) / mib, cpu


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kib", type=int, nargs="+", default=[64, 256, 1024, 4096, 16384, 65536],
                    help="sizes in KiB (default: 64 256 1024 4096 16384 65536)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--mib-per-round", type=float, default=256,
                    help="bytes each side moves per size and round, in MiB: sets the round trips (default: 256)")
    ap.add_argument("--chunk-mb", type=float, default=JobConfig.chunk_mb, help="the job's chunk size (default: 4)")
    ap.add_argument("--transport", choices=["tcp", "ipc", "shm"], default="tcp",
                    help="both sides over TCP loopback, or both over a Unix socket; shm: raw pyzmq over a Unix "
                         "socket, ours through shared memory (what a job on one host uses by default) (default: tcp)")
    args = ap.parse_args(argv)
    sizes = [k * 1024 for k in args.kib]
    with tempfile.TemporaryDirectory() as logdir:
        raw = Raw(logdir, args.transport)
        ours = {n: Ours(n, logdir, args.chunk_mb, args.transport) for n in sizes}
        results = {n: {"ours": [], "raw": []} for n in sizes}
        faults = {n: {"ours": [], "raw": []} for n in sizes}
        cpus = {n: {"ours": [], "raw": []} for n in sizes}
        try:
            for r in range(args.rounds):
                for n in sizes:
                    reps = int(max(5, min(200, args.mib_per_round * (1 << 20) / (2 * n))))
                    order = [("ours", ours[n].round_trip, ours[n].proc.pid), ("raw", raw.round_trip, raw.proc.pid)]
                    for name, fn, pid in (order if r % 2 == 0 else order[::-1]):
                        t, f, cpu = timed(fn, n, reps, pid)
                        results[n][name].append(t)
                        faults[n][name].append(f)
                        cpus[n][name].append(cpu)
        finally:
            for o in ours.values():
                o.close()
            raw.close()
    print(f"push+pull goodput (2 x size per round trip) over {args.transport}, median of {args.rounds} rounds, "
          f"chunks of {args.chunk_mb:g} MiB; raw pyzmq: the same bytes, no header, no copies")
    print(f"{'size':>9}  {'ours GB/s':>9}  {'raw GB/s':>9}  {'ours ms':>8}  {'raw ms':>8}  {'ratio':>6}  "
          f"{'faults/MiB ours':>15}  {'raw':>5}")
    out = []
    for n in sizes:
        t_ours, t_raw = statistics.median(results[n]["ours"]), statistics.median(results[n]["raw"])
        ratios = [r / o for o, r in zip(results[n]["ours"], results[n]["raw"])]
        ratio = statistics.median(ratios)
        f_ours, f_raw = statistics.median(faults[n]["ours"]), statistics.median(faults[n]["raw"])
        out.append({"bytes": n, "ours_gbps": 2 * n / t_ours / 1e9, "raw_gbps": 2 * n / t_raw / 1e9,
                    "ours_ms": t_ours * 1e3, "raw_ms": t_raw * 1e3, "ratio": ratio,
                    "faults_per_mib_ours": f_ours, "faults_per_mib_raw": f_raw})
        label = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
        print(f"{label:>9}  {out[-1]['ours_gbps']:>9.2f}  {out[-1]['raw_gbps']:>9.2f}  {t_ours * 1e3:>8.2f}  "
              f"{t_raw * 1e3:>8.2f}  {ratio:>6.2f}  {f_ours:>15.1f}  {f_raw:>5.1f}")
    print("where a round trip's time goes: CPU ms per round trip (median of rounds), user + system, and the "
          "server's page faults per MiB it received")
    print(f"{'size':>9}  {'':4}  {'client usr':>10}  {'sys':>6}  {'server usr':>10}  {'sys':>6}  {'total':>6}  "
          f"{'wall':>7}  {'faults/MiB server':>17}")
    for o, n in zip(out, sizes):
        label = f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"
        for name in ("ours", "raw"):
            c = {k: statistics.median(x[k] for x in cpus[n][name]) for k in cpus[n][name][0]}
            o[f"cpu_ms_{name}"] = {k: (v * 1e3 if k != "server_faults_per_mib" else v) for k, v in c.items()}
            total = c["client_user"] + c["client_sys"] + c["server_user"] + c["server_sys"]
            print(f"{label if name == 'ours' else '':>9}  {name:4}  {c['client_user'] * 1e3:>10.2f}  "
                  f"{c['client_sys'] * 1e3:>6.2f}  {c['server_user'] * 1e3:>10.2f}  {c['server_sys'] * 1e3:>6.2f}  "
                  f"{total * 1e3:>6.2f}  {o[name + '_ms']:>7.2f}  {c['server_faults_per_mib']:>17.1f}")
    worst = min(o["ratio"] for o in out)
    print(f"ratio ours/raw: worst {worst:.2f}, median {statistics.median(o['ratio'] for o in out):.2f} "
          f"(target >= 0.8)")
    print(json.dumps({"bench": "wire", "transport": args.transport, "rounds": args.rounds, "chunk_mb": args.chunk_mb,
                      "sizes": out,
                      "worst_ratio": worst}))


if __name__ == "__main__":
    main()
