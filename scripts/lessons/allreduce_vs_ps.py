"""Lesson 10: one step's gradient exchange, parameter server against all-reduce, timed.

    python scripts/lessons/allreduce_vs_ps.py --workers 2 4 --out runs/lesson10/results.json

Four ways for W workers to average a gradient of --size float32 (M = 4 * size bytes):

- ``ps-apart``: S = W servers, each on a host of its own (BytePS's spare CPU machines);
  a worker pushes M and pulls M; a server takes in W M / S and sends out as much;
- ``ps-beside``: a server on every worker's host (S = W, BytePS's colocated mode): the
  part of a push to the worker's own server never leaves its host;
- ``ring``: the hand-written ring all-reduce, ``scripts/lessons/ring_allreduce.py``;
- ``gloo``: torch.distributed's ``all_reduce`` over gloo (skipped where torch is missing).

Where: as root with ``ip`` and ``tc``, every process runs on a network-namespace host
(``scripts/cluster/netns_up.sh``, psh1..psh2W at 10.200.0.1..) whose outgoing link is
limited to --rate by ``tc`` (``netns_link.sh rate``); the script holds the cluster lock
(/tmp/paramserver-cluster.lock) from bringing the hosts up to tearing them down.
Otherwise (or with --local) everything runs on 127.0.0.1 over TCP at full speed.

Per setting it starts every process, waits until each has registered and done one
warm-up exchange, reads every host's sent-bytes counter (netns: the kernel's count for
the host's link, packet headers included), tells all to go, and times --rounds
exchanges. A round's time is the slowest rank's; the figure is the median. Printed per
setting: that time, what the mathematics predicts for a link of --rate
(the busiest host's bytes out / rate), the bytes the busiest host sent per round, as
counted on its link and as the formula says, and the payload each worker's own code
counted. Writes the results as JSON (--out) and the figure (--figure).

Not here: compute (a training step is compute plus this exchange, the same in all four);
compression; failures (the lesson discusses them).
"""
import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
CLUSTER = ROOT / "scripts" / "cluster"
LOCK = "/tmp/paramserver-cluster.lock"
SETTINGS = ("ps-apart", "ps-beside", "ring", "gloo")


def formula_bytes_out(setting: str, world: int, nbytes: int) -> float:
    """Bytes the busiest host sends per exchange (payload), by the lesson's formulas."""
    if setting == "ps-apart":                   # a worker pushes M; a server answers W workers M / S each
        return nbytes
    return 2 * (world - 1) * nbytes / world     # ring, gloo's ring, and a server beside every worker


def predicted_seconds(setting: str, world: int, nbytes: int, bits_per_s: float) -> float:
    """The exchange's time on links of ``bits_per_s``: each phase takes the busiest host's
    bytes of that phase. Our servers answer once every worker's whole push is in, so a PS
    exchange is a push phase, then an answer phase; with servers apart they use different
    links (the workers', then the servers'), which each sit idle half the time."""
    if setting == "ps-apart":
        return 8 * (nbytes + world * nbytes / world) / bits_per_s
    return 8 * formula_bytes_out(setting, world, nbytes) / bits_per_s


# --- the processes -------------------------------------------------------------------------

def ps_worker(rank: int, world: int, servers: int, coordinator: str, size: int, rounds: int, chunk_mb: float) -> dict:
    """A worker: registers, one warm-up push_pull, "ready", then ``rounds`` timed ones on "go"."""
    import numpy as np
    from common.cluster import ClusterConfig, JobConfig
    from common.layout import Layout
    from scripts.lessons.ring_allreduce import seeded_gradient
    from worker.client import PSClient
    client = PSClient(ClusterConfig(rank=rank, num_servers=servers, num_workers=world, coordinator=coordinator,
                                    timeout=120, ipc=False), JobConfig(chunk_mb=chunk_mb))
    client.register(Layout([("grad", (size,))]), "float32")
    params, grads = np.zeros(size, np.float32), seeded_gradient(rank, size)
    if rank == 0:
        client.init(params)
    client.pull(params)
    client.push_pull(grads, params, 0)
    print("ready", flush=True)
    sys.stdin.readline()
    pushed, pulled, seconds = client.bytes_pushed, client.bytes_pulled, []
    for step in range(1, rounds + 1):
        t0 = time.perf_counter()
        client.push_pull(grads, params, step)
        seconds.append(time.perf_counter() - t0)
    out = {"rank": rank, "seconds": seconds, "bytes_sent": (client.bytes_pushed - pushed) / rounds,
           "bytes_received": (client.bytes_pulled - pulled) / rounds}
    client.done()
    client.close()
    return out


def gloo_rank(rank: int, world: int, master: str, size: int, rounds: int) -> dict:
    """A gloo rank: one warm-up all_reduce, "ready", then ``rounds`` timed ones (sum, / W) on "go"."""
    import torch
    import torch.distributed as dist
    from scripts.lessons.ring_allreduce import seeded_gradient
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world)
    grad = torch.from_numpy(seeded_gradient(rank, size))
    dist.all_reduce(grad.clone())
    print("ready", flush=True)
    sys.stdin.readline()
    seconds = []
    for _ in range(rounds):
        t = grad.clone()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        t /= world
        seconds.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    return {"rank": rank, "seconds": seconds, "bytes_sent": None}


# --- where the processes run ---------------------------------------------------------------

class Hosts:
    """Where rank i runs: namespace host psh(i+1) at 10.200.0.(i+1) (``netns=True``), or 127.0.0.1."""

    def __init__(self, netns: bool):
        self.netns = netns

    def addr(self, i: int) -> str:
        return f"10.200.0.{i + 1}" if self.netns else "127.0.0.1"

    def port(self, n: int) -> int:
        """A port for the ``n``-th setting (a namespace host is fresh: the ports are its own)."""
        from common.wire.transport import free_port
        return 5700 + n if self.netns else free_port()

    def popen(self, i: int, cmd: list, log):
        env = dict(ENV, GLOO_SOCKET_IFNAME="eth0" if self.netns else "lo")
        prefix = ["ip", "netns", "exec", f"psh{i + 1}"] if self.netns else []
        return subprocess.Popen(prefix + cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True)

    def sent_bytes(self, n: int) -> list[int] | None:
        """Each host's bytes sent on its link so far (netns), or None (127.0.0.1)."""
        if not self.netns:
            return None
        out = []
        for i in range(n):
            link = json.loads(subprocess.run(["ip", "-n", f"psh{i + 1}", "-j", "-s", "link", "show", "eth0"],
                                             capture_output=True, text=True, check=True).stdout)
            out.append(link[0]["stats64"]["tx"]["bytes"])
        return out


@contextlib.contextmanager
def namespace_hosts(n: int, rate: str):
    """psh1..n up with every outgoing link limited to ``rate``, under the cluster lock (unless
    PS_CLUSTER_LOCK_HELD=1 says the caller holds it: the docs test); torn down after."""
    held = os.environ.get("PS_CLUSTER_LOCK_HELD") == "1"
    fd = os.open(LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    if not held:
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        subprocess.run(["bash", str(CLUSTER / "netns_down.sh")], capture_output=True)
        subprocess.run(["bash", str(CLUSTER / "netns_up.sh"), str(n)], capture_output=True, check=True)
        for i in range(1, n + 1):
            subprocess.run(["bash", str(CLUSTER / "netns_link.sh"), "rate", f"psh{i}", rate],
                           capture_output=True, check=True)
        yield
    finally:
        subprocess.run(["bash", str(CLUSTER / "netns_down.sh")], capture_output=True)
        if not held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --- one setting ---------------------------------------------------------------------------

def commands(setting: str, world: int, hosts: Hosts, size: int, rounds: int, n: int, chunk_mb: float):
    """([(host, server command)], [(host, rank command)]) of a setting; ``n`` numbers its ports."""
    me, py = [sys.executable, __file__], sys.executable
    common = ["--world", str(world), "--size", str(size), "--rounds", str(rounds)]
    if setting == "ring":
        peers = ",".join(f"tcp://{hosts.addr(r)}:{hosts.port(n)}" for r in range(world))
        ring = str(ROOT / "scripts" / "lessons" / "ring_allreduce.py")
        return [], [(r, [py, ring, "--rank", str(r), "--peers", peers, "--size", str(size), "--rounds",
                         str(rounds), "--wait-go"]) for r in range(world)]
    if setting == "gloo":
        master = f"{hosts.addr(0)}:{hosts.port(n)}"
        return [], [(r, me + ["--role", "gloo", "--rank", str(r), "--coordinator", master] + common)
                    for r in range(world)]
    first = world if setting == "ps-apart" else 0          # the servers' hosts: their own, or the workers'
    coord = f"{hosts.addr(first)}:{hosts.port(n)}"
    servers = [(first + s, [py, "-m", "paramserver", "--rank", str(s), "--num-servers", str(world),
                            "--num-workers", str(world), "--coordinator", coord, "--bind",
                            f"tcp://{coord}" if s == 0 else f"tcp://{hosts.addr(first + s)}:*", "--optimizer",
                            "sgd", "--lr", "1e-6", "--timeout", "120", "--log-level", "WARNING", "--no-ipc",
                            "--chunk-mb", str(chunk_mb)])
               for s in range(world)]
    return servers, [(r, me + ["--role", "ps-worker", "--rank", str(r), "--coordinator", coord,
                               "--servers", str(world), "--chunk-mb", str(chunk_mb)] + common) for r in range(world)]


def run_setting(setting: str, world: int, hosts: Hosts, size: int, rounds: int, n: int, logdir: str,
                chunk_mb: float) -> dict:
    """Starts a setting's processes, times ``rounds`` exchanges; its figures (see the docstring)."""
    servers, ranks = commands(setting, world, hosts, size, rounds, n, chunk_mb)
    used = 1 + max(h for h, _ in servers + ranks)
    logs = [open(os.path.join(logdir, f"{setting}-{world}-{i}.log"), "w") for i in range(len(servers + ranks))]
    procs = [hosts.popen(h, cmd, log) for (h, cmd), log in zip(servers + ranks, logs)]
    workers = procs[len(servers):]
    try:
        for r, p in enumerate(workers):
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"{setting}, W = {world}: rank {r} did not start; its log: {logs[len(servers) + r].name}")
        before = hosts.sent_bytes(used)
        for p in workers:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [json.loads(p.stdout.readline()) for p in workers]
        after = hosts.sent_bytes(used)
        for p in procs:
            p.wait(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    per_round = [max(o["seconds"][i] for o in outs) for i in range(rounds)]
    sent = [o["bytes_sent"] for o in outs if o.get("bytes_sent") is not None]
    return {"setting": setting, "workers": world, "ms": 1e3 * statistics.median(per_round),
            "rounds_ms": [round(1e3 * t, 2) for t in per_round],
            "link_bytes": max(b - a for a, b in zip(before, after)) / rounds if before else None,
            "formula_bytes": formula_bytes_out(setting, world, 4 * size),
            "payload_sent": statistics.mean(sent) if sent else None}


def bits_per_second(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[:-len(unit)]) * scale
    raise SystemExit(f"--rate {rate!r}: expected a number and kbit, mbit or gbit (tc's units), e.g. 100mbit")


# --- the table and the figure ----------------------------------------------------------------

def table(results: list[dict], size: int, where: str) -> str:
    lines = [f"a gradient of {size:,} float32 (M = {4 * size:,} bytes), {where}; median of the rounds",
             f"{'W':>2}  {'setting':<10} {'ms':>8} {'predicted':>10} {'bytes out, busiest host':>24} "
             f"{'formula':>10} {'payload/worker':>15}"]
    for r in results:
        pred = f"{r['predicted_ms']:.1f}" if r.get("predicted_ms") is not None else "-"
        link = f"{r['link_bytes']:,.0f}" if r["link_bytes"] is not None else "-"
        pay = f"{r['payload_sent']:,.0f}" if r["payload_sent"] is not None else "-"
        lines.append(f"{r['workers']:>2}  {r['setting']:<10} {r['ms']:>8.1f} {pred:>10} {link:>24} "
                     f"{r['formula_bytes']:>10,.0f} {pay:>15}")
    return "\n".join(lines)


def draw(results: list[dict], title: str, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    worlds = sorted({r["workers"] for r in results})
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in results)]
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(settings)
    for j, s in enumerate(settings):
        rows = [next((r for r in results if r["setting"] == s and r["workers"] == w), None) for w in worlds]
        xs = [i + (j - (len(settings) - 1) / 2) * width for i in range(len(worlds))]
        ax_t.bar(xs, [r["ms"] if r else 0 for r in rows], width, label=s)
        ax_b.bar(xs, [(r["link_bytes"] or r["payload_sent"] or 0) / 1e6 if r else 0 for r in rows], width, label=s)
        for x, r in zip(xs, rows):
            if r and r.get("predicted_ms") is not None:
                ax_t.plot([x - width / 2, x + width / 2], [r["predicted_ms"]] * 2, "k-", lw=2)
            if r:
                ax_b.plot([x - width / 2, x + width / 2], [r["formula_bytes"] / 1e6] * 2, "k-", lw=2)
    for ax, label in ((ax_t, "ms per exchange (black: predicted)"),
                      (ax_b, "MB out of the busiest host (black: formula)")):
        ax.set_xticks(range(len(worlds)), [f"W = {w}" for w in worlds])
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="values of W (default: 2 4)")
    ap.add_argument("--size", type=int, default=366_432, help="float32 entries of the gradient "
                    "(default: 366,432, lesson 3's GPT)")
    ap.add_argument("--rounds", type=int, default=7, help="timed exchanges per setting (default: 7)")
    ap.add_argument("--rate", default="100mbit", help="every host's outgoing link, tc's units (default: 100mbit)")
    ap.add_argument("--local", action="store_true", help="127.0.0.1 even as root")
    ap.add_argument("--chunk-mb", type=float, default=4.0, help="the PS's chunks, MiB (a server answers once "
                    "every worker's push of all its chunks is in, so the chunks do not overlap push and answer) "
                    "(default: 4)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--figure", type=Path, help="draw the figure here (PNG)")
    for hidden in ("--role", "--coordinator"):
        ap.add_argument(hidden, default="", help=argparse.SUPPRESS)
    for hidden in ("--rank", "--world", "--servers"):
        ap.add_argument(hidden, type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role:
        role = {"ps-worker": lambda: ps_worker(args.rank, args.world, args.servers, args.coordinator, args.size,
                                               args.rounds, args.chunk_mb),
                "gloo": lambda: gloo_rank(args.rank, args.world, args.coordinator, args.size, args.rounds)}
        print(json.dumps(role[args.role]()), flush=True)
        return
    netns = not args.local and os.geteuid() == 0 and all(
        subprocess.run(["which", c], capture_output=True).returncode == 0 for c in ("ip", "tc"))
    settings = [s for s in args.settings if s != "gloo" or _have_gloo()]
    rate = bits_per_second(args.rate) if netns else None
    where = (f"namespace hosts, every outgoing link limited to {args.rate}" if netns
             else "127.0.0.1, TCP, full speed")
    hosts = Hosts(netns)
    results = []
    with (namespace_hosts(2 * max(args.workers), args.rate) if netns else contextlib.nullcontext()), \
            tempfile.TemporaryDirectory() as logdir:
        for w in args.workers:
            for n, s in enumerate(settings):
                r = run_setting(s, w, hosts, args.size, args.rounds, n, logdir, args.chunk_mb)
                r["predicted_ms"] = 1e3 * predicted_seconds(s, w, 4 * args.size, rate) if rate else None
                print(f"  W = {w}, {s}: {r['ms']:.1f} ms", flush=True)
                results.append(r)
    text = table(results, args.size, where)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"where": where, "size": args.size, "results": results}, indent=1))
    if args.figure:
        draw(results, text.splitlines()[0], args.figure)


def _have_gloo() -> bool:
    try:
        import torch.distributed as dist
        return dist.is_gloo_available()
    except ImportError:
        print("torch is not installed: gloo is skipped")
        return False


if __name__ == "__main__":
    main()
