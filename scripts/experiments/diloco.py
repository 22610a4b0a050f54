"""Experiment: DiLoCo against BSP and local SGD, in validation loss and in bytes moved.

    python scripts/experiments/diloco.py                 # ~12 minutes on 2 cores
    sudo python scripts/experiments/diloco.py --netns    # + the 20 Mbit/s hosts (~6 minutes more)
    python scripts/experiments/diloco.py --replot runs/diloco-X   # redraw only

Every run trains the same small GPT (2 blocks, 64 channels, 64-byte context, about
120k parameters) with 4 workers of 8 sequences each on the same data, for the same
number of steps (``--steps``, 1000 by default: 1000 x 4 x 8 x 64 = 2.05M tokens), with one
set of hyper-parameters: ps-local's defaults (AdamW, lr 3e-3, warmup 60, cosine to 3e-4
at the last step, clip 1.0) as BSP's optimizer and as the inner optimizer of local SGD
and DiLoCo; DiLoCo's outer Nesterov at lr 0.7, momentum 0.9 (the paper's); top-k at its
default 1% of each chunk. The runs:

    BSP; local SGD (H = 10, 50); DiLoCo (H = 10, 50, 100);
    DiLoCo H = 50 with int8 pushes and int8 pulls;
    DiLoCo H = 50 with top-k pushes (error feedback) and int8 pulls.

It prints a table (final validation loss, bytes pushed = every frame the workers sent,
bytes pulled = every frame they received, headers included, their total and its ratio
to BSP's, wall time), checks the issue's targets (and prints each figure), and draws
``docs/img/diloco.png``: validation loss against the total bytes (log scale) and
against the steps.

With ``--netns`` (root; holds the cluster lock while the hosts exist) it also runs BSP
(``--netns-steps``) and DiLoCo H = 50 (twice as many steps) on five namespace hosts,
the server on psh1 and a worker on each of psh2..psh5, every host's egress limited to
20 Mbit/s by ``tc`` (docs/lesson8_cluster.md), and draws ``docs/img/diloco_20mbit.png``:
validation loss against wall time; it prints how long each took to reach BSP's final
validation loss, and their ratio.

Not here: the modes (``paramserver/steps.py``, ``worker/mode_loops.py``), compression
(``common/wire/compress.py``, ``common/wire/pull_compress.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts" / "cluster"
LOCK = Path("/tmp/paramserver-cluster.lock")

MODEL = ["--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--block-size", "64", "--batch-size", "8",
         "--eval-batches", "8", "--sample-bytes", "0"]
DILOCO = ["--mode", "diloco", "--local-steps"]
# name -> (label, flags)
RUNS = {
    "bsp": ("BSP", ["--mode", "bsp"]),
    "local10": ("local SGD H=10", ["--mode", "local-sgd", "--local-steps", "10"]),
    "local50": ("local SGD H=50", ["--mode", "local-sgd", "--local-steps", "50"]),
    "diloco10": ("DiLoCo H=10", [*DILOCO, "10"]),
    "diloco50": ("DiLoCo H=50", [*DILOCO, "50"]),
    "diloco100": ("DiLoCo H=100", [*DILOCO, "100"]),
    "diloco50-int8": ("DiLoCo H=50, int8 both ways", [*DILOCO, "50", "--compress", "int8", "--compress-pull", "int8"]),
    "diloco50-topk": ("DiLoCo H=50, top-k push, int8 pull",
                      [*DILOCO, "50", "--compress", "topk", "--compress-pull", "int8"]),
}
COLORS = {"bsp": "black", "local10": "tab:olive", "local50": "tab:green", "diloco10": "tab:cyan",
          "diloco50": "tab:blue", "diloco100": "tab:purple", "diloco50-int8": "tab:orange", "diloco50-topk": "tab:red"}


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


def run_local(name: str, out: Path, args) -> None:
    cmd = [sys.executable, "-m", "common.launch.local", "--servers", "1", "--workers", str(args.workers),
           "--steps", str(args.steps), "--out", str(out), "--no-progress", "--eval-interval", str(args.eval_interval),
           "--threads", "1", "--shm", "off", *MODEL, *RUNS[name][1]]
    # --shm off: every byte goes through the sockets and is counted, as between hosts; with
    # ps-local's default (auto) the float32 vectors of one machine go through shared memory,
    # which no byte counter sees (a compressed message always takes the socket)
    check(subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True), name)


def check(done, name):
    if done.returncode != 0:
        sys.exit(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def collect(name: str, out: Path, W: int) -> dict:
    """The figures of one run folder: the curve, and the bytes every worker sent and received."""
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    workers = [json.loads((out / f"worker-{r}.json").read_text()) for r in range(W)]
    vals = [r for r in records if r.get("val_loss") is not None]
    pushed, pulled = sum(w["bytes_sent"] for w in workers), sum(w["bytes_received"] for w in workers)
    t0 = min(w["t_start"] for w in workers)
    return {"name": name, "label": RUNS[name][0], "final_val_loss": vals[-1]["val_loss"],
            "pushed": pushed, "pulled": pulled, "total": pushed + pulled,
            "wall_s": max(w["t_end"] for w in workers) - t0,
            "curve": [{"step": r["step"], "val_loss": r["val_loss"], "elapsed_s": r["elapsed_s"],
                       "bytes": r.get("bytes_sent", 0) + r.get("bytes_received", 0)} for r in vals]}


def table(results: list[dict]) -> str:
    bsp = next(r for r in results if r["name"] == "bsp")
    lines = [f"{'run':38s} {'val loss':>9s} {'vs BSP':>7s} {'pushed MB':>10s} {'pulled MB':>10s} {'total MB':>9s} "
             f"{'BSP/run':>8s} {'wall s':>7s}"]
    for r in results:
        lines.append(f"{r['label']:38s} {r['final_val_loss']:9.4f} {r['final_val_loss'] / bsp['final_val_loss'] - 1:+7.1%} "
                     f"{r['pushed'] / 1e6:10.2f} {r['pulled'] / 1e6:10.2f} {r['total'] / 1e6:9.2f} "
                     f"{bsp['total'] / r['total']:7.0f}x {r['wall_s']:7.0f}")
    return "\n".join(lines)


def targets(results: list[dict]) -> list[str]:
    """The issue's acceptance targets, each with its measured figure."""
    by = {r["name"]: r for r in results}
    bsp, d50 = by["bsp"], by["diloco50"]

    def rel(r):
        return r["final_val_loss"] / bsp["final_val_loss"] - 1

    out = [f"DiLoCo H=50 within 2% of BSP: {rel(d50):+.2%} -> {'met' if rel(d50) <= 0.02 else 'MISSED'}",
           f"DiLoCo H=50 moves >= 50x fewer bytes: {bsp['total'] / d50['total']:.0f}x -> "
           f"{'met' if bsp['total'] / d50['total'] >= 50 else 'MISSED'}",
           f"DiLoCo H=50 below local SGD H=50: {d50['final_val_loss']:.4f} vs {by['local50']['final_val_loss']:.4f} -> "
           f"{'met' if d50['final_val_loss'] < by['local50']['final_val_loss'] else 'MISSED'}"]
    for name in ("diloco50-int8", "diloco50-topk"):
        r = by[name]
        ok = bsp["total"] / r["total"] >= 500 and rel(r) <= 0.03
        out.append(f"{r['label']}: {bsp['total'] / r['total']:.0f}x fewer bytes (target >= 500x), {rel(r):+.2%} "
                   f"vs BSP (target within 3%) -> {'met' if ok else 'MISSED'}")
    return out


def plot_bytes(results: list[dict], png: Path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for r in results:
        style = dict(color=COLORS[r["name"]], marker="o", markersize=3, linewidth=1.5)
        pts = [p for p in r["curve"] if p["bytes"] > 0]
        a.plot([p["bytes"] for p in pts], [p["val_loss"] for p in pts],
               label=f"{r['label']}: {r['total'] / 1e6:.1f} MB", **style)
        b.plot([p["step"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]],
               label=f"{r['label']}: {r['final_val_loss']:.3f}", **style)
    a.set_xscale("log")
    a.set_xlabel("bytes moved by the workers, both ways, headers included (log)")
    a.set_ylabel("validation loss (nats per byte)")
    a.legend(title="total bytes", fontsize=8)
    b.set_xlabel(f"step (each of the {args.workers} workers' batches)")
    b.legend(title="final validation loss", fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(f"DiLoCo, local SGD and BSP: {args.workers} workers, {args.steps} steps, the same tokens", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


# --- the 20 Mbit/s hosts ---------------------------------------------------------------------

@contextlib.contextmanager
def cluster_lock():
    """The namespace hosts are one per machine: held for as long as they exist (unless the
    caller holds it for us and says so: PS_CLUSTER_LOCK_HELD=1, as tests/test_docs.py does)."""
    if os.environ.get("PS_CLUSTER_LOCK_HELD") == "1":
        yield
        return
    fd = os.open(LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def sh(*argv):
    done = subprocess.run(["bash", *map(str, argv)], capture_output=True, text=True)
    check(done, " ".join(map(str, argv)))


def netns_runs(out: Path, args) -> dict:
    """BSP and DiLoCo H=50 on psh1 (server) + psh2..5 (workers), every egress at ``args.rate``."""
    hosts = out / "hosts.txt"
    hosts.write_text("psh1 servers=1 addr=10.200.0.1\n" +
                     "".join(f"psh{i} workers=1 addr=10.200.0.{i}\n" for i in range(2, 2 + args.workers)))
    results = {}
    with cluster_lock():
        sh(CLUSTER / "netns_down.sh")
        try:
            sh(CLUSTER / "netns_up.sh", 1 + args.workers)
            for i in range(1, 2 + args.workers):
                sh(CLUSTER / "netns_link.sh", "rate", f"psh{i}", args.rate)
            for name, steps in (("bsp", args.netns_steps), ("diloco50", 2 * args.netns_steps)):
                folder = out / f"netns-{name}"
                cmd = [sys.executable, "-m", "common.launch.ssh", "--hostfile", str(hosts),
                       "--rsh", f"bash {CLUSTER / 'netns_rsh.sh'}", "--remote-dir", str(ROOT), "--out", str(folder),
                       "--steps", str(steps), "--eval-interval", str(args.eval_interval), *MODEL, *RUNS[name][1]]
                t0 = time.monotonic()
                check(subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True), f"netns {name}")
                print(f"  20 Mbit/s {name}: done in {time.monotonic() - t0:.0f} s", flush=True)
                results[name] = collect(name, folder, args.workers)
        finally:
            sh(CLUSTER / "netns_down.sh")
    return results


def time_to_reach(r: dict, loss: float) -> float | None:
    return next((p["elapsed_s"] for p in r["curve"] if p["val_loss"] <= loss), None)


def netns_report(results: dict, args) -> list[str]:
    bsp, d = results["bsp"], results["diloco50"]
    goal = bsp["final_val_loss"]
    tb, td = time_to_reach(bsp, goal), time_to_reach(d, goal)
    lines = [f"20 Mbit/s: BSP {args.netns_steps} steps ends at {goal:.4f} after {tb:.0f} s; DiLoCo H=50 "
             f"({2 * args.netns_steps} steps) ends at {d['final_val_loss']:.4f} after "
             f"{d['curve'][-1]['elapsed_s']:.0f} s"]
    if td is None:
        lines.append("DiLoCo H=50 did not reach BSP's final validation loss -> MISSED")
    else:
        lines.append(f"DiLoCo H=50 reaches it after {td:.0f} s: {tb / td:.1f}x less wall time than BSP -> "
                     f"{'met' if td < tb else 'MISSED'}")
    return lines


def plot_netns(results: dict, png: Path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name, r in results.items():
        ax.plot([p["elapsed_s"] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], marker="o",
                markersize=3, color=COLORS[name], label=f"{r['label']}: {r['wall_s']:.0f} s")
    ax.axhline(results["bsp"]["final_val_loss"], color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title(f"{args.workers} worker hosts and a server host, each linked at {args.rate}", fontsize=10)
    ax.legend(title="job wall time", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000, help="steps of every run (a multiple of 100)")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--runs", default=",".join(RUNS), help="which runs, comma-separated (default: all)")
    p.add_argument("--netns", action="store_true", help="also the 20 Mbit/s namespace hosts (root)")
    p.add_argument("--netns-steps", type=int, default=200, help="BSP's steps there (DiLoCo runs twice as many)")
    p.add_argument("--rate", default="20mbit", help="every host's egress rate there")
    p.add_argument("--out", default="", help="run folder (default: runs/diloco-<time>)")
    p.add_argument("--img", default=str(ROOT / "docs" / "img"), help="where the figures go")
    p.add_argument("--replot", default="", help="redraw from this folder's results.json, run nothing")
    args = p.parse_args(argv)
    if args.replot:
        out = Path(args.replot)
        saved = json.loads((out / "results.json").read_text())
        results, netns = saved["runs"], saved.get("netns") or {}
    else:
        out = Path(args.out or ROOT / "runs" / time.strftime("diloco-%Y%m%d-%H%M%S"))
        out.mkdir(parents=True, exist_ok=True)
        results, netns = [], {}
        for name in args.runs.split(","):
            t0 = time.monotonic()
            run_local(name, out / name, args)
            results.append(collect(name, out / name, args.workers))
            print(f"  {name}: done in {time.monotonic() - t0:.0f} s (with start-up)", flush=True)
        if args.netns:
            netns = netns_runs(out, args)
        (out / "results.json").write_text(json.dumps({"runs": results, "netns": netns}, indent=1))
    print(table(results))
    if {"bsp", "local50", "diloco50", "diloco50-int8", "diloco50-topk"} <= {r["name"] for r in results}:
        print("\n".join(targets(results)))
    img = Path(args.img)
    plot_bytes(results, img / "diloco.png", args)
    if netns:
        print("\n".join(netns_report(netns, args)))
        plot_netns(netns, img / "diloco_20mbit.png", args)
    print(f"results: {out / 'results.json'}; figures in {img}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
