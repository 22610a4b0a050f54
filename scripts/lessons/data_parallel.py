"""Lesson 2: W workers of batch b through real servers == one process of batch W*b.

    python scripts/lessons/data_parallel.py --out docs/img/lesson2_data_parallel.png

1. The identity, at the initial weights: the mean of the W workers' gradients, each the
   mean over its own b sequences, equals the gradient of the big batch of W*b. And why
   the batches must be the same size: with unequal ones the plain mean is wrong, the
   mean weighted by batch size is right again.
2. The run: S real server processes (``python -m paramserver``) and W workers (threads
   of this script, each with its own ``PSClient`` and GPT) train a small GPT in float64
   with SGD; beside them one process trains the same GPT on the big batches. After
   every step the script compares the two sets of parameters.

Worker r's batch at step k is rows [r*b, (r+1)*b) of the big batch of step k, so both
sides see the same bytes (a real job gives each worker its own shard of the data).

Not here: float32 (the sums' order changes the last bits, so float32 runs drift apart
slowly while staying statistically alike), other consistency models (lesson 4).
"""
import argparse
import subprocess
import sys
import threading

import numpy as np

from common.cluster import ClusterConfig
from common.optim import OptimConfig, clip_scale, lr_at, make_optimizer
from common.wire.transport import free_port
from worker.client import PSClient
from worker.data import BatchSampler, DataConfig, load_data
from worker.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=32)


def gradient(model, idx, targets):
    model.zero_grad()
    loss = model.forward(idx, targets)
    model.backward()
    return loss, model.grads.copy()


def identity(batches, W, b):
    """Part 1: mean of per-worker gradients vs the big batch's gradient."""
    model = GPT(CFG, dtype=np.float64, seed=0)
    idx, tgt = batches[0]
    _, g_big = gradient(model, idx, tgt)
    g_workers = [gradient(model, idx[r * b:(r + 1) * b], tgt[r * b:(r + 1) * b])[1] for r in range(W)]
    g_mean = sum(g_workers) / W
    print(f"1. at the initial weights, {W} workers x {b} sequences vs one batch of {W * b}:")
    print(f"   max |mean of the workers' gradients - big-batch gradient| = {np.abs(g_mean - g_big).max():.1e}"
          f"   (largest entry {np.abs(g_big).max():.1e})")
    # unequal batches: worker 0 gets 1 sequence, the other(s) the rest
    cuts = [0, 1] + [1 + (W * b - 1) * (r + 1) // (W - 1) for r in range(W - 1)] if W > 1 else [0, b]
    sizes = [cuts[r + 1] - cuts[r] for r in range(W)]
    g_uneq = [gradient(model, idx[cuts[r]:cuts[r + 1]], tgt[cuts[r]:cuts[r + 1]])[1] for r in range(W)]
    plain = sum(g_uneq) / W
    weighted = sum(g * m for g, m in zip(g_uneq, sizes)) / sum(sizes)
    print(f"   with unequal batches {sizes}: plain mean off by {np.abs(plain - g_big).max():.1e}, "
          f"mean weighted by batch size off by {np.abs(weighted - g_big).max():.1e}")
    return np.abs(g_mean - g_big).max()


def start_servers(S, W, optim: OptimConfig):
    port = free_port()
    flags = ["--optimizer", optim.optimizer, "--lr", str(optim.lr), "--grad-clip", str(optim.grad_clip),
             "--warmup-steps", str(optim.warmup_steps), "--lr-decay-steps", str(optim.lr_decay_steps)]
    procs = [subprocess.Popen([sys.executable, "-m", "paramserver", "--rank", str(s), "--num-servers", str(S),
                               "--num-workers", str(W), "--coordinator", f"127.0.0.1:{port}",
                               "--bind", f"tcp://127.0.0.1:{port if s == 0 else '*'}", "--timeout", "60",
                               "--log-level", "WARNING", *flags]) for s in range(S)]
    return procs, f"127.0.0.1:{port}"


def distributed(batches, S, W, b, optim):
    """Part 2, the job: W worker threads through S server processes; parameters after every step."""
    procs, coord = start_servers(S, W, optim)
    history, losses, errors = [None] * W, [], []

    def worker(rank):
        try:
            model = GPT(CFG, dtype=np.float64, seed=0)
            client = PSClient(ClusterConfig(rank=rank, num_servers=S, num_workers=W, coordinator=coord, timeout=60))
            client.register(model.layout, "float64")
            if rank == 0:
                client.init(model.params)
            model.params[:] = np.nan                      # from here on, every value comes from the servers
            client.pull(model.params)
            mine = []
            for k, (idx, tgt) in enumerate(batches):
                rows = slice(rank * b, (rank + 1) * b)
                model.zero_grad()
                loss = model.forward(idx[rows], tgt[rows])
                model.backward()
                reply = client.push_pull(model.grads, model.params, k, loss=loss)
                mine.append(model.params.copy())
                if rank == 0:
                    losses.append(reply["loss"])          # the servers' mean over the workers
            client.done()
            client.close()
            history[rank] = mine
        except BaseException as e:                        # reported below, after the servers stop
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(W)]
    try:
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    if errors:
        raise errors[0]
    for r in range(1, W):
        assert all(np.array_equal(a, c) for a, c in zip(history[0], history[r])), "workers disagree"
    return losses, history[0]


def single_process(batches, optim):
    """Part 2, the reference: one process, the big batch, the same optimizer and clipping."""
    model = GPT(CFG, dtype=np.float64, seed=0)
    opt = make_optimizer(optim, model.num_params(), np.float64, model.layout.decay_ranges())
    losses, params = [], []
    for k, (idx, tgt) in enumerate(batches):
        loss, g = gradient(model, idx, tgt)
        opt.step(model.params, model.grads, lr_at(optim, k), clip_scale(float(np.linalg.norm(g)), optim.grad_clip))
        losses.append(loss)
        params.append(model.params.copy())
    return losses, params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="W (default 2)")
    p.add_argument("--servers", type=int, default=2, help="S (default 2)")
    p.add_argument("--batch", type=int, default=8, help="b, sequences per worker per step (default 8)")
    p.add_argument("--steps", type=int, default=60, help="steps (default 60)")
    p.add_argument("--lr", type=float, default=0.3, help="SGD learning rate (default 0.3)")
    p.add_argument("--out", default="", help="PNG to draw into (default: none)")
    args = p.parse_args(argv)
    W, S, b = args.workers, args.servers, args.batch

    data = load_data(DataConfig(), rank=0, num_workers=1)
    sampler = BatchSampler(data.train, W * b, CFG.block_size, seed=0)
    batches = [sampler.next_batch() for _ in range(args.steps)]
    gap0 = identity(batches, W, b)

    optim = OptimConfig(optimizer="sgd", lr=args.lr, grad_clip=1.0)
    print(f"2. {args.steps} steps of SGD (lr {args.lr}, global-norm clipping at 1.0), float64:")
    print(f"   {W} workers x {b} sequences through {S} server processes, vs one process x {W * b} sequences")
    ref_loss, ref_params = single_process(batches, optim)
    dist_loss, dist_params = distributed(batches, S, W, b, optim)
    diffs = [np.abs(a - c).max() for a, c in zip(ref_params, dist_params)]
    print(f"   {'step':>6s} {'loss, one process':>18s} {'loss, W workers':>16s} {'max |theta_1 - theta_W|':>24s}")
    for k in sorted({0, 1, 2, args.steps // 4, args.steps // 2, args.steps - 1}):
        print(f"   {k + 1:6d} {ref_loss[k]:18.12f} {dist_loss[k]:16.12f} {diffs[k]:24.1e}")
    theta0 = GPT(CFG, dtype=np.float64, seed=0).params
    moved = [np.abs(q - theta0).max() for q in ref_params]
    print(f"   largest parameter change over the run {max(moved):.2f}; largest difference between the two runs "
          f"{max(diffs):.1e}")
    print("   the same up to the rounding of float64 sums taken in another order (about 1e-16 relative)")
    if args.out:
        draw(ref_loss, dist_loss, diffs, moved, W, b, S, args.out)
        print(f"figure: {args.out}")
    return 0 if max(diffs) < 1e-9 and gap0 < 1e-12 else 1


def draw(ref_loss, dist_loss, diffs, moved, W, b, S, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = np.arange(1, len(ref_loss) + 1)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(steps, ref_loss, "-", lw=3, alpha=0.5, label=f"one process, batch {W * b}")
    ax.plot(steps, dist_loss, "k.", ms=5, label=f"{W} workers x batch {b}, {S} servers")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title("the same loss, step by step", fontsize=10)
    ax.legend(fontsize=8)
    bx.semilogy(steps, moved, "-", lw=2, color="C2", label="max |θ − θ at step 0|: how far training moved")
    bx.semilogy(steps, np.maximum(diffs, 1e-20), "o-", ms=3, color="C0",
                label="max |θ one process − θ workers|")
    bx.axhline(np.finfo(np.float64).eps, color="gray", ls="--", lw=0.8)
    bx.text(1, np.finfo(np.float64).eps / 6, "float64 machine epsilon", fontsize=8, color="gray")
    bx.set_ylim(1e-18, 10)
    bx.legend(fontsize=8, loc="center right")
    bx.set_xlabel("step")
    bx.set_ylabel("largest difference in any parameter")
    bx.set_title("the same parameters, up to rounding", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
