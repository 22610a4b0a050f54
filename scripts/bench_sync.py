"""One BSP gradient sync of config B (43 MB of float32) with 2 workers: the parameter
server against torch.distributed's gloo all-reduce of the same bytes, on 127.0.0.1.

    python scripts/bench_sync.py                  # S = 2 servers, 9 rounds
    python scripts/bench_sync.py --servers 1 --rounds 15 --chunk-mb 2

Ours: S server processes (``python -m paramserver``, SGD) and 2 worker processes; in a
sync each worker pushes its whole gradient and gets the new parameters back
(``PSClient.push_pull``: one message per server each way; the servers average the two
gradients chunk by chunk, step SGD and answer). Two such jobs run side by side: one
through the sockets (``--shm off``) and one through shared memory (``--shm auto``: the
bytes lie in /dev/shm segments, the messages carry the headers; ``common/wire/shm.py``);
with ``--no-ipc`` only the first (shared memory goes with the Unix sockets). Gloo: 2 processes, ``all_reduce`` (sum) of a float32 tensor of the same
size. Every process of both jobs stays up for the whole run; a round times one sync of
each job, in alternating order: this script tells both processes of a job "go" at once
and each times its part from there; a sync's time is the slower of the two. The figure
is the median over rounds; the ratios are ours / gloo (targets: <= 1.3 through sockets,
<= 0.8 through shared memory), each the median of the rounds' ratios. Gloo is skipped
(with a message) where torch is not installed. Also printed, per job: the CPU time its
processes used during its syncs (user and system, every thread; our servers and the
raw servers included), divided by the rounds, and its processes' page faults per sync
(Linux /proc): with 2 cores for 4 or 6 processes, a sync lasts at least its CPU time / 2. Prints one line per job and, last, one JSON line.

Not the same work: gloo leaves each rank with the summed gradient (no average, no
optimizer step, each rank would still apply its own); ours leaves each worker with the
new parameters. Threads: one BLAS/torch thread per process.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                                    # run from a clone without installing
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
CONFIG_B = dict(vocab_size=256, block_size=256, n_layer=6, n_embd=384)


def layout_b():
    from common.layout import gpt_layout
    return gpt_layout(**CONFIG_B)


# --- the processes -------------------------------------------------------------------------

def ours_worker(rank: int, coordinator: str, num_servers: int, chunk_mb: float, ipc: bool, shm: str):
    """A worker: registers, then one push_pull per "go" line on stdin; prints its seconds."""
    import numpy as np
    from common.cluster import ClusterConfig, JobConfig
    from worker.client import PSClient
    layout = layout_b()
    client = PSClient(ClusterConfig(rank=rank, num_servers=num_servers, num_workers=2, coordinator=coordinator,
                                    timeout=120, ipc=ipc, shm=shm), JobConfig(chunk_mb=chunk_mb))
    client.register(layout, "float32")
    params = np.zeros(layout.size, np.float32)
    grads = np.random.default_rng(rank).standard_normal(layout.size).astype(np.float32) * 1e-3
    if rank == 0:
        client.init(params)
    client.pull(params)
    print("ready", flush=True)
    step = 0
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        client.push_pull(grads, params, step)
        print(time.perf_counter() - t0, flush=True)
        step += 1
    client.done()
    client.close()


def gloo_worker(rank: int, port: int):
    """A gloo rank: one all_reduce of config B's gradient size per "go" line; prints its seconds."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    t = torch.randn(layout_b().size) * 1e-3
    dist.all_reduce(t)                                     # warm: connections and buffers
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        dist.all_reduce(t)
        print(time.perf_counter() - t0, flush=True)
    dist.destroy_process_group()


RAW_SERVER = """
import sys, zmq
ctx = zmq.Context.instance()
r = ctx.socket(zmq.ROUTER)
r.bind(sys.argv[1])
print(r.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
waiting, answers = {}, {}
while True:
    ident, key, frame = r.recv_multipart(copy=False)
    n = len(frame.buffer)
    if n == 0:
        break
    waiting.setdefault(key.bytes, []).append(ident.bytes)
    if len(waiting[key.bytes]) == 2:                  # both workers pushed this chunk: answer both
        buf = answers.setdefault(n, bytearray(n))
        for who in waiting.pop(key.bytes):
            r.send_multipart([who, key.bytes, buf], copy=False)
"""


def raw_worker(rank: int, addrs: list, chunk_mb: float):
    """The same messages as ours with raw pyzmq: a chunk out, the same bytes back, no header,
    no copies, no arithmetic (each raw server answers a chunk once both workers sent it)."""
    import numpy as np
    import zmq
    from common.placement import place_chunks
    layout = layout_b()
    placement = place_chunks(layout, len(addrs), chunk_mb)
    socks = []
    for a in addrs:
        d = zmq.Context.instance().socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(a)
        socks.append(d)
    grads = np.ones(layout.size, np.float32)
    poller = zmq.Poller()
    for d in socks:
        poller.register(d, zmq.POLLIN)
    print("ready", flush=True)
    step = 0
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        for i, (b, e, s) in enumerate(placement):
            socks[s].send_multipart([f"{step}:{i}".encode(), memoryview(grads[b:e]).cast("B")], copy=False)
        left = len(placement)
        while left:
            for d, _ in poller.poll(60_000):
                while d.poll(0):
                    d.recv_multipart(copy=False)
                    left -= 1
        print(time.perf_counter() - t0, flush=True)
        step += 1
    for d in socks:
        d.send_multipart([b"x", b""])
        d.close()


# --- the controller ------------------------------------------------------------------------

OURS = {"off": "ours", "auto": "ours-shm"}                 # --shm -> the job's name

def proc_usage(pids) -> list:
    """[user s, system s, minor faults] summed over the processes ``pids`` (Linux /proc;
    a process that cannot be read counts nothing)."""
    total = [0.0, 0.0, 0]
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total[0] += int(f[11]) / tick
        total[1] += int(f[12]) / tick
        total[2] += int(f[7])
    return total


class Job:
    """Processes that each time their part of a sync when told "go"."""

    def __init__(self, name, cmds, logdir):
        self.name = name
        self.extra: list[int] = []             # pids whose CPU counts for this job too (its servers)
        self.procs = [subprocess.Popen(c, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       stderr=open(os.path.join(logdir, f"{name}-{i}.log"), "w"))
                      for i, c in enumerate(cmds)]
        for p in self.procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"{name}: a process did not start (see the logs in {logdir}): {line!r}")

    def usage(self) -> list:
        """[user s, system s, minor faults] summed over the job's processes and ``extra``."""
        return proc_usage([p.pid for p in self.procs] + self.extra)

    def sync(self) -> float:
        for p in self.procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return max(float(p.stdout.readline()) for p in self.procs)

    def close(self):
        for p in self.procs:
            try:
                p.stdin.write("stop\n")
                p.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.wait(timeout=60)


def start_ours(servers: int, chunk_mb: float, logdir: str, ipc: bool, shm: str):
    from common.wire.transport import free_port
    port = free_port()
    coord = f"127.0.0.1:{port}"
    server_procs = []
    for s in range(servers):
        bind = f"tcp://{coord}" if s == 0 else "tcp://127.0.0.1:*"
        server_procs.append(subprocess.Popen(
            [sys.executable, "-m", "paramserver", "--rank", str(s), "--num-servers", str(servers), "--num-workers", "2",
             "--coordinator", coord, "--bind", bind, "--optimizer", "sgd", "--lr", "1e-6", "--chunk-mb", str(chunk_mb),
             "--timeout", "120", "--log-level", "WARNING", "--ipc" if ipc else "--no-ipc"],
            env=ENV, stdout=open(os.path.join(logdir, f"server-{shm}-{s}.log"), "w"), stderr=subprocess.STDOUT))
    me = [sys.executable, __file__]
    job = Job(OURS[shm], [me + ["--role", "ours", "--rank", str(r), "--coordinator", coord, "--servers", str(servers),
                                "--chunk-mb", str(chunk_mb), "--shm", shm] + ([] if ipc else ["--no-ipc"])
                          for r in range(2)], logdir)
    job.extra = [p.pid for p in server_procs]
    return job, server_procs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", type=int, default=2, help="parameter servers S (default: 2)")
    ap.add_argument("--rounds", type=int, default=9, help="alternating rounds (default: 9)")
    ap.add_argument("--chunk-mb", type=float, default=4.0, help="the job's chunk size in MiB (default: 4)")
    ap.add_argument("--ipc", action=argparse.BooleanOptionalAction, default=True,
                    help="our workers reach the servers of their host through Unix sockets, as a job on one host does "
                         "by default (--no-ipc: TCP loopback, like gloo) (default: on)")
    ap.add_argument("--raw", action="store_true",
                    help="also time raw pyzmq sending our messages (the same chunks to the same servers and the "
                         "same bytes back, nothing else): the wire's own bound")
    ap.add_argument("--shm", default="auto", help=argparse.SUPPRESS)
    ap.add_argument("--role", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "ours":
        return ours_worker(args.rank, args.coordinator, args.servers, args.chunk_mb, args.ipc, args.shm)
    if args.role == "gloo":
        return gloo_worker(args.rank, args.port)
    if args.role == "raw":
        return raw_worker(args.rank, args.coordinator.split(","), args.chunk_mb)

    from common.wire.transport import free_port
    nbytes = layout_b().size * 4
    try:
        import torch.distributed  # noqa: F401
        have_torch = True
    except ImportError:
        have_torch = False
        print("torch is not installed: gloo is skipped, only our time is measured")
    with tempfile.TemporaryDirectory() as logdir:
        jobs, server_procs = [], []
        try:
            for shm in ("off", "auto") if args.ipc else ("off",):
                job, procs = start_ours(args.servers, args.chunk_mb, logdir, args.ipc, shm)
                jobs.append(job)
                server_procs += procs
            if have_torch:
                port = free_port()
                jobs.append(Job("gloo", [[sys.executable, __file__, "--role", "gloo", "--rank", str(r),
                                          "--port", str(port)] for r in range(2)], logdir))
            if args.raw:
                jobs.append(start_raw(args, logdir, server_procs))
            times, used = run_rounds(jobs, args.rounds)
        finally:
            for job in jobs:
                job.close()
            for p in server_procs:
                p.wait(timeout=60)
    report(args, nbytes, times, used)


def start_raw(args, logdir: str, server_procs: list):
    raw_servers = [subprocess.Popen([sys.executable, "-c", RAW_SERVER,
                                     f"ipc://{logdir}/raw-{s}.ipc" if args.ipc else "tcp://127.0.0.1:*"],
                                    env=ENV, stdout=subprocess.PIPE, text=True)
                   for s in range(args.servers)]
    server_procs += raw_servers
    addrs = [p.stdout.readline().strip() for p in raw_servers]
    job = Job("raw", [[sys.executable, __file__, "--role", "raw", "--rank", str(r), "--coordinator",
                       ",".join(addrs), "--chunk-mb", str(args.chunk_mb)] for r in range(2)], logdir)
    job.extra = [p.pid for p in raw_servers]
    return job


def run_rounds(jobs: list, rounds: int):
    """Each job syncs once per round, in an order that turns each round: {name: [seconds]},
    {name: [user s, system s, page faults]} summed over the rounds."""
    for job in jobs:
        job.sync()                                   # warm
    times = {job.name: [] for job in jobs}
    used = {job.name: [0.0, 0.0, 0] for job in jobs}
    for r in range(rounds):
        k = r % len(jobs)
        for job in jobs[k:] + jobs[:k]:
            u0 = job.usage()
            times[job.name].append(job.sync())
            used[job.name] = [a + b - c for a, b, c in zip(used[job.name], job.usage(), u0)]
    return times, used


LABELS = {"ours": "ours through sockets", "ours-shm": "ours through shared memory",
          "raw": "raw pyzmq, our messages, no work", "gloo": "gloo all_reduce (2 ranks)"}
TARGETS = {"ours": 1.3, "ours-shm": 0.8}


def report(args, nbytes: int, times: dict, used: dict):
    n = args.rounds
    print(f"one BSP sync of config B's gradients ({nbytes / 1e6:.1f} MB float32), 2 workers, 127.0.0.1, "
          f"{args.servers} server(s), chunks of {args.chunk_mb:g} MiB, {'Unix sockets' if args.ipc else 'TCP'}; "
          f"median of {n} rounds; load average {os.getloadavg()[0]:.2f}")
    result = {"bench": "sync", "bytes": nbytes, "servers": args.servers, "chunk_mb": args.chunk_mb, "ipc": args.ipc,
              "rounds": n, "load": os.getloadavg()[0], "ms": {}, "cpu_ms": {}, "faults_per_sync": {}, "ratio": {}}
    for name, ts in times.items():
        u = used[name]
        med = statistics.median(ts) * 1e3
        print(f"  {LABELS[name] + ':':<38} {med:6.1f} ms  (rounds: {', '.join(f'{t * 1e3:.0f}' for t in ts)}); "
              f"CPU {1e3 * (u[0] + u[1]) / n:.0f} ms per sync (user {1e3 * u[0] / n:.0f}, system "
              f"{1e3 * u[1] / n:.0f}), {u[2] / n:.0f} page faults per sync")
        result["ms"][name] = med
        result["cpu_ms"][name] = {"user": 1e3 * u[0] / n, "system": 1e3 * u[1] / n}
        result["faults_per_sync"][name] = u[2] / n
    for name in ("ours", "ours-shm"):
        if name in times and "gloo" in times:
            ratio = statistics.median(o / g for o, g in zip(times[name], times["gloo"]))
            result["ratio"][name] = ratio
            print(f"ratio {name}/gloo: {ratio:.2f} (target <= {TARGETS[name]})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
