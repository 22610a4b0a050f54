"""What the parameter server adds to a step: 1 server + 1 worker against the single-process
trainer, same model, same batch, same optimizer.

    python scripts/bench_overhead.py                    # config B (43 MB of parameters), 5 rounds
    python scripts/bench_overhead.py --config A --steps 10 --rounds 7
    python scripts/bench_overhead.py --no-overlap       # push and pull after the backward

Single process: ``worker.train.train_step`` (forward, backward, clip by global norm,
AdamW), as ``ps-train`` runs it. Parameter server: one server process (AdamW, the same
clipping) and this process as its worker, running the worker's BSP loop
(``worker/mode_loops.py``): with overlap (the default), the backward pushes each
layer's gradients as soon as they are final, the server averages and, once it has every
chunk and the norm, updates and answers chunk by chunk in the order of the forward,
and the next forward waits for each layer's parameters just before using them. Both
run in alternating rounds of ``--steps`` steps in this process (so they share its BLAS
threads: ``--threads``, default 1; the server gets one thread of its own); the figure
is the median step time over rounds, and the ratio PS / single (target <= 1.05).
Also printed, per step: the CPU time of this process (all its threads: libzmq's I/O
thread and the heartbeat included) and of the server process, and their sum against
the single process's, with the machine's load average: on a machine with a core to
spare the server's work runs beside the worker's; on a loaded one it takes the
worker's cores, and the step time follows the CPU time. Prints one line per side and,
last, one JSON line.
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


def cpu_s(pid=None) -> float:
    """CPU seconds (user + system, every thread) of this process, or of process ``pid``
    (Linux /proc; 0 where it cannot be read)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=["small", "A", "B"], default="B",
                    help="small: ps-train's model, batch 16; A: 4 layers, d 128, ctx 128, batch 16; "
                         "B: 6 layers, d 384, ctx 256, batch 8 (default: B)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round and side (default: 5)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (default: 5)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads of this process (default: 1)")
    ap.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                    help="overlap communication with the backward and the next forward (default: on)")
    ap.add_argument("--chunk-mb", type=float, default=4.0, help="the job's chunk size in MiB (default: 4)")
    args = ap.parse_args(argv)
    if os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads):   # BLAS reads it once, at import: re-exec
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)

    import numpy as np
    from common.cluster import ClusterConfig, JobConfig
    from common.optim import OptimConfig, make_optimizer
    from common.wire.transport import free_port
    from worker.client import PSClient
    from worker.mode_loops import make_loop
    from worker.model import GPT, GPTConfig
    from worker.train import train_step

    shape, B = {"small": (dict(block_size=64, n_layer=3, n_head=4, n_embd=96), 16),
                "A": (dict(block_size=128, n_layer=4, n_head=4, n_embd=128), 16),
                "B": (dict(block_size=256, n_layer=6, n_head=6, n_embd=384), 8)}[args.config]
    mc = GPTConfig(vocab_size=256, **shape)
    oc = OptimConfig(optimizer="adamw", lr=3e-4, weight_decay=0.1, grad_clip=1.0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 256, size=(B, mc.block_size))
    targets = np.roll(idx, -1, axis=1)
    tokens = idx.size

    single = GPT(mc, seed=0)
    optimizer = make_optimizer(oc, single.num_params(), single.dtype, single.layout.decay_ranges())
    k_single = 0

    def single_steps(n):
        nonlocal k_single
        t0, c0 = time.perf_counter(), cpu_s()
        for _ in range(n):
            train_step(single, optimizer, oc, k_single, idx, targets)
            k_single += 1
        cpu["single"].append((cpu_s() - c0) / n)
        return (time.perf_counter() - t0) / n

    job = JobConfig(chunk_mb=args.chunk_mb)
    port = free_port()
    flags = ["--optimizer", "adamw", "--lr", str(oc.lr), "--weight-decay", str(oc.weight_decay), "--grad-clip",
             str(oc.grad_clip), "--chunk-mb", str(args.chunk_mb)]
    logdir = tempfile.mkdtemp(prefix="bench-overhead-")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    server = subprocess.Popen([sys.executable, "-m", "paramserver", "--rank", "0", "--num-servers", "1",
                               "--num-workers", "1", "--coordinator", f"127.0.0.1:{port}", "--bind",
                               f"tcp://127.0.0.1:{port}", "--timeout", "120", "--log-level", "WARNING", *flags],
                              env=env, stdout=open(os.path.join(logdir, "server.log"), "w"), stderr=subprocess.STDOUT)
    model = GPT(mc, seed=0)
    client = PSClient(ClusterConfig(rank=0, coordinator=f"127.0.0.1:{port}", timeout=120), job)
    client.register(model.layout, "float32")
    client.init(model.params)
    client.pull(model.params)
    total = 10 ** 9                                        # the loop's step budget: never reached here
    loop = make_loop(job, client, model, total, 1, overlap=args.overlap)
    waited = []
    cpu = {"single": [], "worker": [], "server": []}             # CPU seconds per step
    loads = []

    def ps_steps(n):
        """The worker's loop body (worker/distributed.py), without data loading and logging."""
        t0, w0, c0, s0 = time.perf_counter(), client.wait_s, cpu_s(), cpu_s(server.pid)
        for _ in range(n):
            loss = model.forward(idx, targets, **loop.forward_hooks())
            model.zero_grad()
            model.backward(**loop.backward_hooks(loss, tokens))
            loop.step(loss, tokens)
        loop.finish()                                     # the last answers in: every step whole
        waited.append((client.wait_s - w0) / n)
        cpu["worker"].append((cpu_s() - c0) / n)
        cpu["server"].append((cpu_s(server.pid) - s0) / n)
        return (time.perf_counter() - t0) / n

    try:
        single_steps(1)
        ps_steps(1)                                       # warm: buffers, pages, connections
        times = {"single": [], "ps": []}
        for r in range(args.rounds):
            order = [("single", single_steps), ("ps", ps_steps)]
            loads.append(os.getloadavg()[0])
            for name, fn in (order if r % 2 == 0 else order[::-1]):
                times[name].append(fn(args.steps))
    finally:
        client.done()
        client.close()
        server.wait(timeout=60)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(p / s for p, s in zip(times["ps"], times["single"]))
    print(f"config {args.config} ({model.num_params() * 4 / 1e6:.1f} MB of parameters), batch {B}x{mc.block_size}, "
          f"AdamW + clipping, {args.threads} BLAS thread(s); median of {args.rounds} rounds of {args.steps} steps")
    print(f"  single process (train_step):      {med['single'] * 1e3:8.1f} ms/step  "
          f"(rounds: {', '.join(f'{t * 1e3:.0f}' for t in times['single'])})")
    print(f"  1 server + 1 worker, overlap {'on ' if args.overlap else 'off'}: {med['ps'] * 1e3:8.1f} ms/step  "
          f"(rounds: {', '.join(f'{t * 1e3:.0f}' for t in times['ps'])}; waiting for answers "
          f"{statistics.median(waited[1:]) * 1e3:.1f} ms/step)")
    c = {k: statistics.median(v[1:]) * 1e3 for k, v in cpu.items()}     # (the warm-up step left out)
    print(f"  CPU ms/step: single {c['single']:.1f}; PS worker {c['worker']:.1f} + server {c['server']:.1f} = "
          f"{c['worker'] + c['server']:.1f} ({(c['worker'] + c['server']) / c['single']:.2f}x); load average at the "
          f"rounds' start: {', '.join(f'{x:.1f}' for x in loads)}")
    print(f"ratio PS / single: {ratio:.3f} (target <= 1.05)")
    print(json.dumps({"bench": "overhead", "config": args.config, "batch": B, "threads": args.threads,
                      "overlap": args.overlap, "chunk_mb": args.chunk_mb, "rounds": args.rounds, "steps": args.steps,
                      "single_ms": med["single"] * 1e3, "ps_ms": med["ps"] * 1e3,
                      "wait_ms": statistics.median(waited[1:]) * 1e3, "cpu_ms": c, "load": loads, "ratio": ratio}))


if __name__ == "__main__":
    main()
