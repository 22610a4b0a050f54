"""Lesson 3: what the servers see. The flat vector, its shards, and a push on the wire.

    python scripts/lessons/flat_vector.py --out docs/img/lesson3_flat_vector.png

1. The layout: every tensor of the GPT that ``ps-local`` trains is a range of ONE flat
   float32 vector (``common/layout.py``); the table of names, shapes and offsets.
2. The shards: with S servers, server s owns one contiguous range [b_s, e_s) of that
   vector, cut by bytes, so a tensor may be split between two servers: the servers
   never know.
3. The wire: the exact frames of one PUSH from worker 0 to server 1, made by the real
   codec (``common/wire/codec.py``): frame 0 is the msgpack header (its fields are shown),
   frame 1 the raw bytes of the gradient slice, sent without a copy.

Not here: sockets (lesson 3's ``ps-local --trace`` run shows the messages in time).
"""
import argparse
import sys

import numpy as np

from common.wire import codec
from common.wire.protocol import PUSH
from worker.model import GPT, GPTConfig
from worker.train import TRAIN_DEFAULTS

KINDS = {"embeddings": ("wte", "wpe"), "attention": ("attn",), "MLP": ("mlp",), "LayerNorm": ("ln_",)}


def kind(name):
    return next(k for k, keys in KINDS.items() if any(key in name for key in keys))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", type=int, default=2, help="S, for the shards and the message (default 2)")
    p.add_argument("--out", default="", help="PNG to draw the vector and its shards into (default: none)")
    args = p.parse_args(argv)
    S = args.servers

    shape = {k: TRAIN_DEFAULTS[k] for k in ("block_size", "n_layer", "n_head", "n_embd")}
    model = GPT(GPTConfig(**shape), seed=0)
    layout = model.layout
    P = layout.size
    print(f"1. the GPT that ps-local trains by default ({', '.join(f'{k} {v}' for k, v in shape.items())}) is ONE "
          f"vector of P = {P:,} float32 = {4 * P:,} bytes; layout hash {layout.hash()}")
    print(f"   {'offset':>9s} {'end':>9s}  {'tensor':26s} shape")
    for e in layout:
        if e.name.startswith("h.") and not e.name.startswith("h.0."):
            continue                                   # every block repeats block 0's rows
        print(f"   {e.offset:9,d} {e.end:9,d}  {e.name:26s} {e.shape}")
    print(f"   ... blocks h.1 to h.{model.config.n_layer - 1} repeat h.0's rows; ln_f ends at {P:,}")

    ranges = layout.shard_ranges(S)
    print(f"\n2. {S} servers: server s owns [b_s, e_s), equal bytes, boundaries on 64-byte lines")
    for s, (b, e) in enumerate(ranges):
        first = next(t for t in layout if t.end > b)
        last = next(t for t in reversed(layout.entries) if t.offset < e)
        print(f"   server {s}: [{b:,}, {e:,}) = {4 * (e - b):,} bytes, from {first.name} "
              f"(element {b - first.offset:,} of {first.size:,}) to {last.name} "
              f"(element {e - 1 - last.offset:,} of {last.size:,})")

    rng = np.random.default_rng(0)
    model.grads[:] = rng.normal(0, 1e-3, size=P).astype(np.float32)
    b, e = ranges[min(1, S - 1)]
    frames = codec.encode(PUSH, "worker:0", step=12, rid=7, arrays=[model.grads[b:e]], ranges=[(b, e)],
                          loss=3.21, tokens=1024, bytes_pushed=12 * 4 * P, bytes_pulled=12 * 4 * P)
    msg = codec.decode([bytes(f) for f in frames])       # what the server decodes at the door
    print(f"\n3. one PUSH from worker 0 to server {min(1, S - 1)} (step 12), made by common/wire/codec.py:")
    print(f"   frame 0, the msgpack header: {len(frames[0])} bytes, starting {bytes(frames[0][:12]).hex(' ')} ...")
    print(f"      v = 1, cmd = {msg.cmd!r}, from = {msg.sender!r}, step = {msg.step}, rid = {msg.rid}")
    print(f"      arrays = [{{dtype: {msg.dtypes[0]!r}, shape: {list(msg.arrays[0].shape)}, "
          f"range: {list(msg.ranges[0])}}}]")
    print(f"      meta = {msg.meta}")
    print(f"   frame 1, the gradient slice grads[{b:,}:{e:,}]: {len(frames[1]):,} bytes of raw float32, "
          f"= 4 x {e - b:,}")
    shared = np.shares_memory(np.frombuffer(frames[1], dtype=np.float32), model.grads)
    print(f"   frame 1 shares memory with the worker's grads vector (no copy before the socket): {shared}")
    print(f"   decoded again, it equals the slice: {np.array_equal(msg.arrays[0], model.grads[b:e])}")
    print(f"\n   per step, each worker pushes {4 * P:,} bytes (all its shards) and pulls {4 * P:,} back; "
          f"with W workers a server takes in W x {4 * P // S:,} bytes")

    if args.out:
        draw(layout, args.out)
        print(f"figure: {args.out}")
    return 0


def draw(layout, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = dict(zip(KINDS, ("C0", "C1", "C2", "C3")))
    P = layout.size
    fig, ax = plt.subplots(figsize=(12, 3.4))
    rows = [1, 2, 3, 4]
    for y, S in enumerate(rows):
        for e in layout:
            ax.broken_barh([(e.offset / 1e3, e.size / 1e3)], (y - 0.3, 0.6), facecolors=colors[kind(e.name)],
                           edgecolor="white", linewidth=0.3)
        for s, (b, end) in enumerate(layout.shard_ranges(S)):
            ax.plot([b / 1e3, b / 1e3], [y - 0.42, y + 0.42], "k-", lw=2)
            ax.text((b + end) / 2e3, y, f"server {s}", ha="center", va="center", fontsize=8, color="white",
                    fontweight="bold")
    ax.set_yticks(range(len(rows)), [f"S = {S}" for S in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, P / 1e3)
    ax.set_xlabel(f"position in the flat parameter vector (thousands of float32; P = {P:,})")
    ax.set_title("one vector, cut by bytes into S shards (black lines); a tensor may straddle two servers "
                 "(LayerNorms: too thin to see)",
                 fontsize=10)
    ax.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], list(colors), fontsize=8,
              ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.28), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
