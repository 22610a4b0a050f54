"""Lesson 1: the gradient of a GPT's loss, by hand, checked against finite differences.

    python scripts/lessons/gradient_check.py --out docs/img/lesson1_gradcheck.png

A small GPT in float64 (the same ``worker/model.py`` that trains), one batch of real
bytes. Backpropagation (``model.backward()``) gives every partial derivative at once;
the central difference (L(theta + eps e_i) - L(theta - eps e_i)) / (2 eps) gives one
derivative per two forward passes. The script compares the two on a sample of entries
of every tensor, prints the worst relative error per tensor, checks the top of the
chain rule (dL/dlogits = (softmax(logits) - onehot(target)) / N) and draws the
sampled pairs (analytic against numeric: every point on the diagonal).

Not here: training (lesson 1's second command, ``ps-train``), the layer-by-layer checks
(``tests/test_layers.py``).
"""
import argparse
import sys
import time

import numpy as np

from worker.data import BatchSampler, DataConfig, load_data
from worker.model import GPT, GPTConfig


def central_difference(f, x, i, eps=1e-6):
    old = x[i]
    x[i] = old + eps
    up = f()
    x[i] = old - eps
    down = f()
    x[i] = old
    return (up - down) / (2 * eps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-tensor", type=int, default=12, help="entries sampled per tensor (default 12)")
    p.add_argument("--out", default="", help="PNG to draw the comparison into (default: none)")
    args = p.parse_args(argv)

    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg, dtype=np.float64, seed=0)
    data = load_data(DataConfig(), rank=0, num_workers=1)
    idx, targets = BatchSampler(data.train, 4, cfg.block_size, seed=0).next_batch()   # (4, 16) bytes
    N = targets.size
    print(f"a GPT of {model.num_params():,} parameters in float64; one batch of {idx.shape[0]} x "
          f"{idx.shape[1]} bytes: {bytes(idx[0].tolist()).decode('utf-8', 'replace')!r} ...")

    # 1. the loss and every derivative by backpropagation: one forward, one backward
    model.zero_grad()
    loss = model.forward(idx, targets)
    model.backward()
    analytic = model.grads.copy()
    print(f"loss L = -(1/N) sum log p(next byte) = {loss:.6f} nats (N = {N} predictions; ln 256 = {np.log(256):.4f})")

    # 2. the top of the chain rule: dL/dlogits = (softmax - onehot) / N, against finite differences
    logits = model.forward(idx)                                # (B, T, V)
    z = logits[0, 0]
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    by_formula = (probs - np.eye(cfg.vocab_size)[targets[0, 0]]) / N

    def loss_of_logit(v):
        zz = z.copy()
        zz[v] += 1e-6
        up = -np.log(np.exp(zz - zz.max())[targets[0, 0]] / np.exp(zz - zz.max()).sum())
        zz[v] -= 2e-6
        down = -np.log(np.exp(zz - zz.max())[targets[0, 0]] / np.exp(zz - zz.max()).sum())
        return (up - down) / 2e-6 / N
    numeric_top = np.array([loss_of_logit(v) for v in range(cfg.vocab_size)])
    print(f"dL/dlogits at one position: (softmax - onehot)/N vs finite differences, max difference "
          f"{np.abs(by_formula - numeric_top).max():.1e}")

    # 3. a sample of entries of every tensor: backprop vs central differences
    rng = np.random.default_rng(0)
    f = lambda: model.forward(idx, targets)                   # noqa: E731
    pairs, worst, worst_abs, t0 = [], 0.0, 0.0, time.perf_counter()
    print(f"\n{'tensor':24s} {'shape':>10s} {'checked':>7s} {'max |derivative|':>16s} {'max |error|':>12s} "
          f"{'relative':>9s}")
    for e in model.layout:
        picks = rng.choice(e.size, size=min(args.per_tensor, e.size), replace=False) + e.offset
        a = analytic[picks]
        n = np.array([central_difference(f, model.params, i) for i in picks])
        err = np.abs(a - n).max()
        rel = err / max(np.abs(n).max(), 1e-12)
        worst, worst_abs = max(worst, rel), max(worst_abs, err)
        pairs.append((e.name, a, n, rel))
        print(f"{e.name:24s} {str(e.shape):>10s} {len(picks):7d} {np.abs(n).max():16.2e} {err:12.1e} {rel:9.1e}")
    checked = sum(len(a) for _, a, _, _ in pairs)
    print(f"\n{checked} derivatives checked with {2 * checked} extra forward passes in "
          f"{time.perf_counter() - t0:.1f} s; backprop gave all {model.num_params():,} with one backward.")
    print(f"worst error {worst_abs:.1e} absolute, {worst:.1e} relative to the tensor's largest derivative. "
          f"A central difference\nis itself only good to about eps^2 |L'''| + (rounding of L, ~1e-16 L) / eps "
          f"~ 1e-9 here, so backprop is exact to within what the check can see.")

    if args.out:
        draw(pairs, args.out)
        print(f"figure: {args.out}")
    return 0 if worst_abs < 1e-7 else 1


def draw(pairs, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = {"embeddings": ("wte", "wpe"), "LayerNorm": ("ln_",), "attention": ("attn",), "MLP": ("mlp",)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    lim = 0.0
    for kind, keys in kinds.items():
        mine = [(a, n) for name, a, n, _ in pairs if any(k in name for k in keys)]
        a, n = np.concatenate([m[0] for m in mine]), np.concatenate([m[1] for m in mine])
        ax.scatter(n, a, s=12, label=kind, alpha=0.8)
        rel = np.concatenate([np.abs(a - n) / max(np.abs(n).max(), 1e-12) for a, n in mine])
        bx.hist(np.log10(np.maximum(rel, 1e-16)), bins=30, range=(-16, -4), alpha=0.6, label=kind)
        lim = max(lim, np.abs(n).max(), np.abs(a).max())
    ax.plot([-lim, lim], [-lim, lim], "k-", lw=0.6, zorder=0)
    ax.set_xscale("symlog", linthresh=1e-4)                   # small and large derivatives both visible
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("numeric: (L(θ+ε) − L(θ−ε)) / 2ε")
    ax.set_ylabel("analytic: backpropagation")
    ax.set_title("every sampled derivative lies on the diagonal", fontsize=10)
    ax.legend(fontsize=8)
    bx.set_xlabel("log10 |analytic − numeric| / max |numeric| in its tensor")
    bx.set_ylabel("derivatives")
    bx.set_title("how far from the diagonal (float64)", fontsize=10)
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
