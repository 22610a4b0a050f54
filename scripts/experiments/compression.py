"""Experiment: the small GPT trained with each gradient compression, the same steps each.

    python scripts/experiments/compression.py              # ~6 minutes on 2 cores
    python scripts/experiments/compression.py --runs none,topk1,topk1-noef --steps 300
    python scripts/experiments/compression.py --replot runs/compression-X   # redraw only

Runs ``ps-local`` once per scheme (2 servers, 2 workers, BSP, the ps-train model and
optimizer) on the same data and seed, for the same number of steps:
- ``none``: float32 gradients;
- ``fp16``: float16 (half the bytes);
- ``int8``: stochastic 8-bit, a scale per 512 values (QSGD-style, about a quarter);
- ``topk1``: the 1% largest entries of each chunk, as (uint32 index, bfloat16 value),
  with error feedback and DGC's momentum correction (1/66.7 of the bytes: 6 bytes a kept
  entry against 4 a float);
- optional: ``topk1-noef`` (the same without error feedback), ``topk1-servermom`` (the
  momentum on the servers instead), ``topk1-adamw`` and ``none-adamw`` (AdamW on the
  servers), ``randk1`` (1% drawn at random), ``bf16``.
A run that diverges (a worker's gradient turns to NaN or Inf, which the servers
refuse, and the job stops) is reported as diverged, with its curve up to then; any
other failure stops the experiment. It then writes ``docs/img/compression.png``: validation loss against steps and against
the bytes the workers pushed (all of them: the metrics' ``bytes_pushed``, the arrays'
bytes on the wire, compressed where they are, without the msgpack headers of a hundred
or two bytes a message), ``results.json`` in the run folder, and a table on stdout: bytes
pushed, the ratio to uncompressed, final validation loss and its distance to the
uncompressed run's.

Not here: the schemes (``common/wire/compress.py``), the wire (``worker/client.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The optimizer of every run: SGD with momentum 0.9, as in Deep Gradient Compression. For
# the dense schemes the servers run it; for top-k and random-k the workers keep the
# momentum (DGC's momentum correction, --compress-momentum: the velocity is compressed,
# with error feedback) and the servers run plain SGD, which without compression is the
# same arithmetic. (With the servers' momentum, or with AdamW, top-k 1% learns much
# more slowly: docs/wire.md measures both.) No clipping: the servers would clip the sum
# of many steps' entries that error feedback sends at once, and what is clipped away is
# lost (DGC clips on the workers instead).
LR = ["--lr", "0.1", "--min-lr", "0.001", "--grad-clip", "0"]
MOMENTUM = ["--optimizer", "momentum", "--momentum", "0.9", *LR]
CORRECTED = ["--optimizer", "sgd", "--compress-momentum", "0.9", *LR]
# name -> (label, flags)
RUNS = {
    "none": ("no compression (float32)", ["--compress", "none", *MOMENTUM]),
    "fp16": ("fp16", ["--compress", "fp16", *MOMENTUM]),
    "bf16": ("bf16", ["--compress", "bf16", *MOMENTUM]),
    "int8": ("int8, stochastic (QSGD-style)", ["--compress", "int8", *MOMENTUM]),
    "topk1": ("top-k 1% + error feedback", ["--compress", "topk", "--compress-ratio", "0.01", *CORRECTED]),
    "topk1-noef": ("top-k 1%, no error feedback", ["--compress", "topk", "--compress-ratio", "0.01",
                                                   "--error-feedback", "off", *CORRECTED]),
    "topk1-servermom": ("top-k 1% + error feedback, momentum on the servers",
                        ["--compress", "topk", "--compress-ratio", "0.01", *MOMENTUM]),
    "topk1-adamw": ("top-k 1% + error feedback, AdamW", ["--compress", "topk", "--compress-ratio", "0.01",
                                                          "--optimizer", "adamw", "--lr", "3e-3"]),
    "none-adamw": ("no compression, AdamW", ["--compress", "none", "--optimizer", "adamw", "--lr", "3e-3"]),
    "randk1": ("random-k 1% + error feedback", ["--compress", "randk", "--compress-ratio", "0.01", *CORRECTED]),
}
DEFAULT_RUNS = "none,fp16,int8,topk1"
COLORS = {"none": "black", "fp16": "tab:blue", "bf16": "tab:cyan", "int8": "tab:green", "topk1": "tab:red",
          "topk1-noef": "tab:orange", "randk1": "tab:purple", "topk1-servermom": "tab:brown",
          "topk1-adamw": "tab:pink", "none-adamw": "tab:gray"}


DIVERGED = "holds NaN or Inf; refused"     # the servers' refusal of a non-finite push (paramserver/shard.py)


def run(name, out: Path, args) -> bool:
    """One ps-local job; False if it diverged (stopped on a non-finite gradient)."""
    cmd = [sys.executable, "-m", "common.launch.local", "--servers", str(args.servers), "--workers", str(args.workers),
           "--steps", str(args.steps), "--out", str(out), "--no-progress", "--eval-interval", str(args.eval_interval),
           "--log-interval", str(args.eval_interval), "--threads", "1", "--sample-bytes", "0", "--seed", "0",
           *RUNS[name][1]]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0 and DIVERGED in done.stdout + done.stderr:
        print(f"  {name}: diverged (a non-finite gradient) after {time.monotonic() - t0:.0f} s", flush=True)
        return False
    if done.returncode != 0:
        sys.exit(f"{name}: ps-local failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    print(f"  {name}: done in {time.monotonic() - t0:.0f} s", flush=True)
    return True


def collect(name, out: Path, diverged: bool = False) -> dict:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    vals = [r for r in records if r.get("val_loss") is not None]
    last = records[-1]
    return {"name": name, "label": RUNS[name][0], "final_val_loss": vals[-1]["val_loss"], "diverged": diverged,
            "bytes_pushed": last["bytes_pushed"], "bytes_pulled": last["bytes_pulled"], "steps": last["step"],
            "elapsed_s": last.get("elapsed_s"),
            "curve": [{"step": r["step"], "val_loss": r["val_loss"], "bytes_pushed": r.get("bytes_pushed", 0)}
                      for r in vals]}


def plot(results: list, png: Path, args):
    try:
        import matplotlib
    except ImportError:
        sys.exit("the figure needs matplotlib: pip install -e '.[plots]' (the runs are kept; redraw with --replot)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True)
    base = next((r for r in results if r["name"] == "none"), None)
    for r in results:
        style = dict(color=COLORS.get(r["name"]), marker="o", markersize=3, linewidth=1.5)
        curve = r["curve"]
        if r.get("diverged"):                # up to where it passed its start (then it left the axes)
            curve = [p for p in curve if p["val_loss"] <= curve[0]["val_loss"] + 0.5]
        steps = [p["step"] for p in curve]
        ys = [p["val_loss"] for p in curve]
        mbs = [p["bytes_pushed"] / 1e6 for p in curve]
        ratio = f", {base['bytes_pushed'] / r['bytes_pushed']:.1f}x fewer bytes" if base and r is not base and not r.get("diverged") else ""
        end = f"diverged at step {r['steps']}" if r.get("diverged") else f"{r['final_val_loss']:.3f}"
        a.plot(steps, ys, label=f"{r['label']}: {end}", **style)
        pushed = [(m, y) for m, y in zip(mbs, ys) if m > 0]          # (step 0 has pushed nothing)
        b.plot([m for m, _ in pushed], [y for _, y in pushed], label=f"{r['label']}{ratio}", **style)
    a.set_xlabel("step")
    a.set_ylabel("validation loss (nats per byte)")
    a.set_title("against steps (legend: final validation loss)", fontsize=10)
    b.set_xscale("log")
    b.set_xlabel("MB pushed by the workers (the arrays on the wire; log scale)")
    b.set_title("against bytes pushed", fontsize=10)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Gradient compression: the small GPT, {args.workers} workers, {args.servers} servers, BSP, "
                 f"{args.steps} steps, SGD with momentum 0.9", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def table(results) -> str:
    base = next((r for r in results if r["name"] == "none"), results[0])
    lines = ["| scheme | MB pushed | fewer bytes than float32 | final val loss | vs float32 |", "|---|---|---|---|---|"]
    for r in results:
        if r.get("diverged"):
            lines.append(f"| {r['label']} | {r['bytes_pushed'] / 1e6:.1f} (to step {r['steps']}) | - | diverged: "
                         f"{r['final_val_loss']:.4g} at step {r['steps']} | - |")
            continue
        lines.append(f"| {r['label']} | {r['bytes_pushed'] / 1e6:.1f} | {base['bytes_pushed'] / r['bytes_pushed']:.1f}x | "
                     f"{r['final_val_loss']:.4f} | {100 * (r['final_val_loss'] / base['final_val_loss'] - 1):+.2f}% |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="steps of every run (default: 600)")
    ap.add_argument("--workers", type=int, default=2, help="workers W (default: 2)")
    ap.add_argument("--servers", type=int, default=2, help="servers (default: 2)")
    ap.add_argument("--eval-interval", type=int, default=50, help="validation every this many steps (default: 50)")
    ap.add_argument("--runs", default=DEFAULT_RUNS, help=f"which runs, of {','.join(RUNS)} (default: {DEFAULT_RUNS})")
    ap.add_argument("--out", default="", help="folder of the runs (default: runs/compression-<time>)")
    ap.add_argument("--png", default="", help="the figure (default: docs/img/compression.png for the default runs, "
                    "docs/img/compression_<runs>.png otherwise)")
    ap.add_argument("--replot", default="", help="only redraw from the runs in this folder")
    args = ap.parse_args(argv)
    names = [n for n in args.runs.split(",") if n]
    if any(n not in RUNS for n in names) or len(set(names)) < len(names):
        ap.error(f"--runs: each of {', '.join(RUNS)} at most once")
    out = Path(args.replot or args.out or time.strftime("runs/compression-%Y%m%d-%H%M%S"))
    if args.replot:
        saved = json.loads((out / "results.json").read_text())
        for k in ("steps", "workers", "servers"):
            setattr(args, k, saved["settings"][k])
        diverged = {r["name"]: r.get("diverged", False) for r in saved["results"]}
    else:
        print(f"{len(names)} runs of {args.workers} workers x {args.steps} steps; run folders in {out}", flush=True)
        diverged = {name: not run(name, out / name, args) for name in names}
    results = [collect(n, out / n, diverged.get(n, False)) for n in names]
    if not args.png:
        tag = "" if ",".join(names) == DEFAULT_RUNS else "_" + "_".join(names)
        args.png = str(ROOT / f"docs/img/compression{tag}.png")
    settings = {k: getattr(args, k) for k in ("steps", "workers", "servers", "eval_interval")}
    (out / "results.json").write_text(json.dumps({"settings": settings, "command": sys.argv, "results": results},
                                                 indent=1) + "\n")
    plot(results, Path(args.png), args)
    print(table(results))
    print(f"figure: {args.png}; results: {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
